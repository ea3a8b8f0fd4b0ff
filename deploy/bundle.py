"""`fab bundle`: every image the stack needs in one archive, for VMs without
registry access; `fab deploy --bundle FILE` uploads and loads it.

The archive (an uncompressed tar, so its small members are read without
unpacking the rest) holds, in this order:

    manifest.json    format, version, options it was made for, images
                     [{role, ref, id}]
    SHA256SUMS       of the two files below (checked on the VM before loading)
    images.tar.gz    one `docker save` of all images (shared layers stored once)
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

from metaflow_services import __version__

from . import stack, wheels
from .config import Options
from .remote import DeployError

FORMAT = 1


def _docker(*args, capture=True, check=True):
    try:
        return subprocess.run(["docker", *args], check=check, text=True,
                              stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.PIPE if capture else None)
    except FileNotFoundError:
        raise DeployError("`fab bundle` needs Docker on this workstation; `docker` was not found",
                          "install Docker here, or make the bundle on a machine that has it")


def local_image_id(ref):
    r = _docker("image", "inspect", "--format", "{{.Id}}", ref, check=False)
    return r.stdout.strip() if r.returncode == 0 else None


def build_wheel(dest: Path) -> Path:
    """A wheel of this project (what the Airflow image installs)."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("metaflow_services-*.whl"):
        old.unlink()
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), str(stack.REPO)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wheels = list(dest.glob("metaflow_services-*.whl"))
    if r.returncode != 0 or not wheels:
        raise DeployError("building the metaflow-services wheel failed: %s" % r.stdout[-500:],
                          "check that pip works in this Python (python -m pip --version)")
    return wheels[0]


def build_locally(role, ref, o: Options, out):
    ctx = Path(tempfile.mkdtemp(prefix="mfs-build-"))
    try:
        src = stack.COMPOSE_DIR / stack.BUILT[role]
        shutil.copy(src / "Dockerfile", ctx / "Dockerfile")
        arg = "AIRFLOW_BASE" if role == "airflow" else "STEP_BASE"
        if role == "airflow":
            build_wheel(ctx / "wheels")
        if o.packages.ca_bundle:
            shutil.copy(Path(o.packages.ca_bundle).expanduser(), ctx / "ca.pem")
        args = {arg: stack.base_image(role, o), **stack.build_args(o)}
        out.info("building %s (from %s; several minutes) ..." % (ref, stack.base_image(role, o)))
        r = _docker("build", "-q", "-t", ref,
                    *[x for kv in sorted(args.items()) for x in ("--build-arg", "%s=%s" % kv)],
                    str(ctx), check=False)
        if r.returncode != 0:
            raise DeployError("building %s failed: %s" % (ref, (r.stderr or r.stdout)[-500:]),
                              "check that this workstation can pull %s" % stack.base_image(role, o))
    finally:
        shutil.rmtree(ctx, ignore_errors=True)


def make(o: Options, output: Path, out, flows: Path | None = None) -> dict:
    if flows is not None:
        wheels.flow_files(flows)   # a wrong folder stops before minutes of image work
    images = stack.images(o)
    out.step("images for %s, %s object store, Metaflow services %s"
             % (", ".join(sorted(images)), o.object_store, "on" if o.metaflow_services else "off"))
    for role, ref in images.items():
        if local_image_id(ref):
            out.ok("%s present" % ref)
        elif role in stack.BUILT and not getattr(o.images, role):
            build_locally(role, ref, o, out)
            out.ok("%s built" % ref)
        else:
            out.info("pulling %s ..." % ref)
            r = _docker("pull", "-q", ref, check=False)
            if r.returncode != 0:
                raise DeployError("cannot pull %s: %s" % (ref, (r.stderr or "").strip()[-300:]),
                                  "check the image name and registry access, or build/load it "
                                  "here first")
            out.ok("%s pulled" % ref)
    entries = [{"role": role, "ref": ref, "id": local_image_id(ref)}
               for role, ref in sorted(images.items())]

    out.step("saving %d images into %s" % (len(entries), output))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mfs-bundle-", dir=str(output.parent)))
    try:
        t0 = time.time()
        images_path = work / "images.tar.gz"
        refs = " ".join("'%s'" % e["ref"] for e in entries)
        # gzip -1: three times smaller than the raw layers, fast to make and load.
        r = subprocess.run("set -o pipefail; docker save %s | gzip -1 > '%s'" % (refs, images_path),
                           shell=True, executable="/bin/bash", stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            raise DeployError("docker save failed: %s" % r.stderr.strip()[-300:])
        members = ["manifest.json", "SHA256SUMS", "images.tar.gz"]
        house = None
        if flows is not None:
            house = wheels.make_wheelhouse(o, images["step"], flows, work, out)
            house["sha256"] = sha256_of(work / wheels.MEMBER)
            members.append(wheels.MEMBER)
        manifest = {"format": FORMAT, "metaflow_services": __version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "options": {"object_store": o.object_store,
                                "metaflow_services": o.metaflow_services,
                                "executor": o.executor},
                    "images": entries}
        if house:
            manifest["wheelhouse"] = house
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        sums = ["%s  %s" % (sha256_of(work / n), n) for n in members if n != "SHA256SUMS"]
        (work / "SHA256SUMS").write_text("\n".join(sums) + "\n")
        tmp = output.with_name(output.name + ".tmp")
        with tarfile.open(tmp, "w") as tar:
            for name in members:
                tar.add(work / name, arcname=name)
        os.replace(tmp, output)
        size = output.stat().st_size
        out.ok("%s: %d images%s, %.0f MB, %.0fs"
               % (output, len(entries), ", %d wheels for %d environment(s)"
                  % (house["wheels"], house["environments"]) if house else "", size / 1e6,
                  time.time() - t0))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def sha256_of(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(path) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DeployError("bundle %s: no such file" % path, "make one with `fab bundle`")
    try:
        with tarfile.open(path) as tar:
            member = tar.next()
            if member is None or member.name != "manifest.json":
                raise DeployError("%s is not a metaflow-services bundle (no manifest.json first)"
                                  % path, "make one with `fab bundle`")
            manifest = json.loads(tar.extractfile(member).read())
    except (tarfile.TarError, ValueError) as e:
        raise DeployError("%s is not a readable bundle: %s" % (path, e), "make one with `fab bundle`")
    if manifest.get("format") != FORMAT:
        raise DeployError("bundle %s has format %r, expected %d" % (path, manifest.get("format"),
                                                                   FORMAT),
                          "make it again with this version's `fab bundle`")
    return manifest
