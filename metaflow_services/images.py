"""One container image per distinct step environment (@pypi, @conda,
requirements.txt), built on the worker's Docker engine the first time a step
needs it and reused afterwards.

An environment image is the step's base image plus exactly the environment's
packages, installed with pip from the configured index. Its tag is a hash of
the base image and the environment, so identical environments share one image
across flows. A build that fails leaves no tagged image (Docker only tags a
finished build; intermediate containers are removed), and concurrent tasks
needing the same image wait for one build (a lock per tag on the worker).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import tarfile
import time
from pathlib import Path

from .config import Settings
from . import wheelhouse
from .errors import ServicesError

IMAGE_REPO = "metaflow-services/env"
LABEL = "metaflow-services.environment"
SPEC_PATH = "/etc/metaflow-services/environment-spec.json"
RESOLVED_PATH = "/etc/metaflow-services/environment.json"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class EnvironmentBuildError(ServicesError):
    """pip could not build the environment; the message holds pip's error."""


def environment_tag(base_image: str, environment: dict) -> str:
    key = json.dumps({"base": base_image, "packages": environment["packages"],
                      "python": environment.get("python")}, sort_keys=True)
    return "%s:%s" % (IMAGE_REPO, hashlib.sha256(key.encode()).hexdigest()[:16])


WHEELS_IN_BUILD = "/tmp/mfs-wheelhouse"


def pip_sources(settings: Settings, wheels: bool) -> list:
    """pip's options for where packages come from. With a wheelhouse and no
    index configured the build is offline: the wheelhouse only."""
    args = []
    if wheels:
        args += ["--find-links", WHEELS_IN_BUILD]
        if not settings.pip_index_url:
            return args + ["--no-index"]
    if settings.pip_index_url:
        args += ["--index-url", settings.pip_index_url]
    if settings.pip_extra_index_url:
        args += ["--extra-index-url", settings.pip_extra_index_url]
    for host in re.split(r"[\s,]+", settings.pip_trusted_host or ""):
        if host:
            args += ["--trusted-host", host]
    # Fewer retries than pip's 5: an index that is unreachable or untrusted
    # says so within a minute, with the hint below, instead of after minutes.
    return args + ["--retries", "2"]


def offline(settings: Settings, wheels) -> bool:
    return bool(wheels) and not settings.pip_index_url


def dockerfile(base_image, environment, settings: Settings, with_cert: bool,
               wheels=None) -> str:
    python = settings.python
    pip = [python, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
           "--no-input", "--progress-bar", "off"] + pip_sources(settings, bool(wheels))
    if with_cert:
        pip += ["--cert", "/etc/metaflow-services/pip-ca.crt"]
    pip += ["-r", "/etc/metaflow-services/requirements.txt"]
    want = environment.get("python")
    check = ""
    if want:
        # @pypi_base(python=...) names the interpreter version; the base image
        # decides which one exists, so say so if they differ.
        check = (
            "%s -c \"import sys; v='%s'.split('.'); have=[str(x) for x in sys.version_info[:len(v)]]; "
            "sys.exit(0 if have == v else 'The step image has Python %%s, the flow asks for "
            "python=%s: use a step image with that Python (--image).' %% sys.version.split()[0])\" && "
            % (python, want, want))
    lines = [
        "FROM %s" % base_image,
        "COPY requirements.txt environment-spec.json /etc/metaflow-services/",
    ]
    if with_cert:
        lines.append("COPY pip-ca.crt /etc/metaflow-services/pip-ca.crt")
    cleanup = ""
    if wheels:
        # Not kept in the image: the wheels are installed, the files go.
        lines.append("COPY wheelhouse/ %s/" % WHEELS_IN_BUILD)
        cleanup = " && rm -rf %s" % WHEELS_IN_BUILD
    lines += [
        "RUN %s%s && %s -m pip list --format=json > %s%s" % (
            check, " ".join(pip), python, RESOLVED_PATH, cleanup),
        "LABEL %s=%s" % (LABEL, json.dumps(environment_tag(base_image, environment))),
    ]
    return "\n".join(lines) + "\n"


def _context(base_image, environment, settings, wheels=None) -> io.BytesIO:
    cert = settings.pip_cert if settings.pip_cert and os.path.isfile(settings.pip_cert) else None
    files = {
        "Dockerfile": dockerfile(base_image, environment, settings, bool(cert), wheels),
        "requirements.txt": "\n".join(environment["packages"]) + "\n",
        "environment-spec.json": json.dumps(dict(environment, base_image=base_image), indent=1),
    }
    if cert:
        files["pip-ca.crt"] = Path(cert).read_text()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
        for name in wheels or ():
            tar.add(os.path.join(settings.pip_wheelhouse, name), arcname="wheelhouse/" + name)
    buf.seek(0)
    return buf


def _wheels(settings: Settings, environment) -> list | None:
    """The wheelhouse files this build gets (None: no wheelhouse on this
    worker). Refuses an offline build whose exact pins are not there."""
    index = wheelhouse.read_index(settings.pip_wheelhouse)
    if index is None:
        return None
    files, missing = wheelhouse.plan(settings.pip_wheelhouse, index, environment)
    if missing and offline(settings, files):
        raise EnvironmentBuildError(
            "The wheelhouse on this VM (%s, made %s) lacks %s, and no package index is "
            "configured, so no image was built.\n  environment: %s (from %s)\n  to add them: %s"
            % (settings.pip_wheelhouse, index.get("made", "?"), ", ".join(missing),
               ", ".join(environment["packages"]), environment.get("source"),
               wheelhouse.ADD_COMMAND))
    return files


def ensure_environment_image(client, base_image, environment, settings: Settings, log) -> str:
    """The tag of the environment image, building it if this host lacks it."""
    import docker.errors

    tag = environment_tag(base_image, environment)
    if _exists(client, tag):
        _touch(settings, tag)
        return tag
    wheels = _wheels(settings, environment)
    os.makedirs(settings.lock_dir, exist_ok=True)
    lock_path = os.path.join(settings.lock_dir, tag.replace("/", "_").replace(":", "_") + ".lock")
    with open(lock_path, "a") as lock:
        log.info("Waiting for the build lock of %s ...", tag)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _exists(client, tag):  # another task built it meanwhile
            log.info("%s was built by another task; reusing it.", tag)
            _touch(settings, tag)
            return tag
        log.info("Building the step environment image %s: %s on %s (first use; later "
                 "runs reuse it; packages from %s).", tag, ", ".join(environment["packages"]),
                 base_image, source_name(settings, wheels))
        t = time.time()
        output, error = [], None
        try:
            # Offline builds get no network at all: what the wheelhouse lacks
            # fails here as it would on an air-gapped VM.
            for chunk in client.api.build(fileobj=_context(base_image, environment, settings,
                                                           wheels),
                                          custom_context=True, tag=tag, rm=True, forcerm=True,
                                          pull=False, decode=True,
                                          network_mode="none" if offline(settings, wheels)
                                          else None):
                line = _ANSI.sub("", chunk.get("stream") or "").rstrip()
                if line:
                    output.append(line)
                    log.info("[build %s] %s", tag.split(":")[1], line)
                if "error" in chunk:
                    error = _ANSI.sub("", chunk["error"]).strip()
        except docker.errors.APIError as e:
            error = str(e)
        if error or not _exists(client, tag):
            raise _build_failed(output, error, base_image, environment, settings, wheels)
        log.info("Built %s in %.1f s.", tag, time.time() - t)
        _touch(settings, tag)
        return tag


def source_name(settings: Settings, wheels) -> str:
    if offline(settings, wheels):
        return "the wheelhouse %s only" % settings.pip_wheelhouse
    index = settings.pip_index_url or "https://pypi.org/simple (pip's default)"
    return index + (" and the wheelhouse" if wheels else "")


_UNTRUSTED = ("CERTIFICATE_VERIFY_FAILED", "SSLCertVerificationError", "certificate verify failed")
_UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection",
                "Name or service not known", "Temporary failure in name resolution",
                "Network is unreachable", "Connection refused", "ConnectTimeoutError",
                "No route to host", "ProxyError")


def _build_failed(output, error, base_image, environment, settings, wheels):
    pip_lines = [l for l in output if "ERROR" in l or "error" in l.lower()][-6:]
    text = "\n".join(output) + "\n" + (error or "")
    source = source_name(settings, wheels)
    hint = ""
    if any(s in text for s in _UNTRUSTED):
        hint = ("pip does not trust the certificate of %s (your own CA, or a TLS-inspecting "
                "proxy's): set packages.ca_bundle in deploy.yaml to that CA's PEM file and run "
                "fab deploy (outside a deploy: MFS_PIP_CERT on the worker)" % source)
    elif any(s in text for s in _UNREACHABLE):
        hint = ("this VM cannot reach %s: set packages.index_url in deploy.yaml to an index it "
                "can reach and run fab deploy (MFS_PIP_INDEX_URL outside a deploy); with no "
                "network at all, bundle the wheels: %s" % (source, wheelhouse.ADD_COMMAND))
    elif offline(settings, wheels) and "No matching distribution" in text:
        hint = "the wheelhouse lacks a package this environment needs; to add it: %s" % (
            wheelhouse.ADD_COMMAND)
    return EnvironmentBuildError(
        "Building the step environment failed, no image was kept.\n"
        "  environment: %s (from %s, python %s)\n  base image: %s\n  packages from: %s\n"
        "  pip said:\n    %s%s"
        % (", ".join(environment["packages"]), environment.get("source"),
           environment.get("python") or "of the image", base_image, source,
           "\n    ".join(pip_lines or [error or "unknown error"]),
           "\n  what to do: " + hint if hint else ""))


def _exists(client, tag):
    import docker.errors

    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


# -- last use, for `metaflow-services images` / `prune-images` ---------------


def _usage_file(settings):
    return os.path.join(settings.state_dir, "environment-images.json")


def _touch(settings, tag):
    """Record when an environment image was last used (best effort)."""
    path = _usage_file(settings)
    try:
        os.makedirs(settings.state_dir, exist_ok=True)
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            usage = _read_usage(settings)
            usage[tag] = time.time()
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(usage, f)
            os.replace(tmp, path)
    except OSError:
        pass


def _read_usage(settings):
    try:
        with open(_usage_file(settings)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def list_environment_images(client, settings: Settings):
    usage = _read_usage(settings)
    out = []
    for img in client.images.list(filters={"label": LABEL}):
        for tag in img.tags or ["<untagged %s>" % img.short_id]:
            out.append({"tag": tag, "id": img.short_id, "size_bytes": img.attrs.get("Size"),
                        "created": img.attrs.get("Created"), "last_used": usage.get(tag)})
    return sorted(out, key=lambda r: r["tag"])


def referenced_tags(specs, settings: Settings):
    """Environment image tags the given DAG specs would use on this worker."""
    tags = set()
    for spec in specs:
        for step in spec["steps"].values():
            env = step.get("environment")
            if env:
                base = step.get("image") or spec.get("image") or settings.step_image
                if base:
                    tags.add(environment_tag(base, env))
    return tags
