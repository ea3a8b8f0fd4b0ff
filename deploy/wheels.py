"""`fab bundle --flows DIR`, on the workstation: the wheels of the step
environments (@pypi, @conda, requirements.txt) of the flows in DIR, for VMs
that cannot reach a package index.

It reads each flow's environments with Metaflow itself (``python FLOW
airflow3 environments``) and runs `pip wheel` for each in the stack's step
image, so every wheel fits the VM's Python and platform (sdists are built
here). The result is wheelhouse.tar, a member of the bundle next to
images.tar.gz; deploy/packages.py installs it on the VMs, and
metaflow_services/images.py builds from it with `pip --no-index`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from metaflow_services import images, watcher, wheelhouse
from metaflow_services.config import Settings

from .config import Options
from .remote import DeployError

MEMBER = "wheelhouse.tar"          # in the bundle, next to images.tar.gz


def flow_files(folder: Path) -> list:
    """The flow files under *folder*, as the flow-watcher finds them."""
    if not folder.is_dir():
        raise DeployError("--flows %s: no such folder" % folder,
                          "give the folder of flow files (the one you copy into the dags folder)")
    found = []
    for d, dirs, files in os.walk(folder):
        dirs[:] = [x for x in dirs if not x.startswith((".", "__"))]
        found += [Path(d) / f for f in files if f.endswith(".py") and not f.startswith(".")]
    return sorted(p for p in found if watcher.classify(p).is_flow)


def flow_environments(path: Path) -> list:
    """The step environments of one flow file, read by Metaflow itself."""
    with tempfile.TemporaryDirectory(prefix="mfs-envs-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("METAFLOW_")}
        env.update(MFS_PREBUILT_ENVIRONMENTS="1", METAFLOW_USER=os.environ.get("USER") or "bundle",
                   METAFLOW_DEFAULT_DATASTORE="local", METAFLOW_DEFAULT_METADATA="local",
                   METAFLOW_DATASTORE_SYSROOT_LOCAL=tmp)
        proc = subprocess.run([sys.executable, str(path.resolve()), "--no-pylint", "--quiet",
                               "airflow3", "environments"], cwd=tmp, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    if proc.returncode != 0:
        raise DeployError("cannot read the environments of %s: %s"
                          % (path, (proc.stderr.strip() or proc.stdout.strip())[-800:]),
                          "fix the flow (python %s run must start), or leave it out of --flows"
                          % path.name)
    return json.loads(proc.stdout.strip().splitlines()[-1])["environments"]


def _pip_options(o: Options, ca_in_container) -> list:
    """Where `pip wheel` downloads from: the same options the VMs' builds
    get from packages.* (images.pip_sources), with the CA inside the
    container."""
    p = o.packages
    settings = Settings(pip_index_url=p.index_url or None,
                        pip_extra_index_url=p.extra_index_url or None,
                        pip_trusted_host=p.trusted_hosts or None)
    return images.pip_sources(settings, wheels=False) + (
        ["--cert", ca_in_container] if ca_in_container else [])


def make_wheelhouse(o: Options, step_image: str, folder: Path, work: Path, out) -> dict:
    """wheelhouse.tar in *work*, of every environment of the flows in
    *folder*; returns the manifest's "wheelhouse" entry."""
    flows = flow_files(folder)
    out.step("wheelhouse: the step environments of %d flow(s) in %s" % (len(flows), folder))
    envs = {}
    for path in flows:
        found = flow_environments(path)
        for e in found:
            envs.setdefault(wheelhouse.environment_key(e), dict(e, flows=[]))["flows"].append(
                path.name)
        out.info("%s: %s" % (path.relative_to(folder), "; ".join(
            ", ".join(e["packages"]) for e in found) or "no @pypi/@conda/requirements.txt"))
    house = work / "wheelhouse"
    house.mkdir()
    python = _image_python(step_image)
    index = {}
    for n, (key, env) in enumerate(sorted(envs.items()), 1):
        t0 = time.time()
        files = _pip_wheel(o, step_image, env, work / ("env-%d" % n))
        for f in files:
            shutil.copy2(work / ("env-%d" % n) / f, house / f)
        index[key] = {"packages": env["packages"], "python": env.get("python"),
                      "files": files, "flows": sorted(set(env["flows"]))}
        out.ok("%s: %d wheels (%.0fs)" % (", ".join(env["packages"]), len(files),
                                         time.time() - t0))
    wheelhouse.write_index(house, index, python, [str(p.relative_to(folder)) for p in flows],
                           time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    with tarfile.open(work / MEMBER, "w") as tar:
        for name in sorted(os.listdir(house)):
            tar.add(house / name, arcname=name)
    return {"environments": len(index), "wheels": sum(1 for f in os.listdir(house)
                                                      if f.endswith(".whl")),
            "python": python, "flows": sorted(str(p.relative_to(folder)) for p in flows),
            "source_sha": source_sha(flows)}


def source_sha(flows) -> str:
    """Of the flow files the wheelhouse was made from (to tell a stale one)."""
    h = hashlib.sha256()
    for p in flows:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
        req = p.parent / "requirements.txt"
        if req.is_file():
            h.update(req.read_bytes())
    return h.hexdigest()


def _docker(*args, timeout=1800):
    return subprocess.run(["docker", *args], text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=timeout)


def _image_python(image) -> str:
    r = _docker("run", "--rm", "--entrypoint", "", image, "python3", "-c",
                "import platform; print(platform.python_version())", timeout=300)
    if r.returncode != 0:
        raise DeployError("cannot run Python in the step image %s: %s"
                          % (image, r.stdout.strip()[-300:]),
                          "check that the image exists here (fab bundle builds or pulls it)")
    return r.stdout.strip().splitlines()[-1]


def _pip_wheel(o: Options, image, env, dest: Path) -> list:
    """`pip wheel` of one environment in the step image, as this user (the
    files stay removable); the wheel file names."""
    dest.mkdir()
    (dest / "requirements.txt").write_text("\n".join(env["packages"]) + "\n")
    mounts = ["-v", "%s:/out" % dest]
    ca = None
    if o.packages.ca_bundle:
        ca = "/tmp/mfs-ca.pem"
        mounts += ["-v", "%s:%s:ro" % (Path(o.packages.ca_bundle).expanduser().resolve(), ca)]
    r = _docker("run", "--rm", "--user", "%d:%d" % (os.getuid(), os.getgid()), "-e", "HOME=/tmp",
                *mounts, "--entrypoint", "", image, "python3", "-m", "pip", "wheel",
                "--no-cache-dir", "--disable-pip-version-check", "--progress-bar", "off",
                *_pip_options(o, ca), "-w", "/out",
                "-r", "/out/requirements.txt")
    (dest / "requirements.txt").unlink()
    if r.returncode != 0:
        lines = [x for x in r.stdout.splitlines() if "ERROR" in x or "rror" in x][-5:]
        raise DeployError("pip could not download %s for the bundle (flows: %s): %s"
                          % (", ".join(env["packages"]), ", ".join(sorted(set(env["flows"]))),
                             "\n  ".join(lines or r.stdout.splitlines()[-5:])),
                          "check the pins on PyPI or your index (packages.index_url); behind a "
                          "TLS-inspecting proxy set packages.ca_bundle")
    return sorted(f for f in os.listdir(dest) if f.endswith(".whl"))


def extract_member(bundle_path, into: Path) -> Path:
    with tarfile.open(bundle_path) as tar:
        member = tar.getmember(MEMBER)
        with tar.extractfile(member) as src, open(into / MEMBER, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return into / MEMBER
