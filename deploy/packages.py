"""Where step environment images (@pypi, @conda, requirements.txt) get their
packages on the VMs: the `packages` options, a CA bundle, and for VMs with no
network the wheelhouse of a bundle made with `fab bundle --flows DIR`
(deploy/wheels.py).

The ``install`` step puts the CA bundle and the wheelhouse into
install_dir/packages, which the scheduler and the edge workers mount at
/etc/mfs/packages (compose/*.yaml); ``report`` is `fab status`'s section.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from metaflow_services import wheelhouse

from . import commands as cmd
from . import config as config_mod
from . import wheels
from .session import Session, duration


# ---------------------------------------------------------------------------
# The VM (main or worker): install_dir/packages
# ---------------------------------------------------------------------------


def install(s: Session):
    """The CA bundle (packages.ca_bundle) and the bundle's wheelhouse into
    install_dir/packages; a deploy without a wheelhouse keeps the one there."""
    p, folder = s.o.packages, s.dir + "/packages"
    s.out.step("packages for step environments (%s)" % folder)
    s.r.run(cmd.make_dirs(folder), what="making %s" % folder)
    pem = Path(p.ca_bundle).expanduser() if p.ca_bundle else None
    if pem and not pem.is_file():
        # Only options recorded on a VM get here (a restore from another
        # workstation): the options file's own are checked before anything.
        s.out.warn("packages.ca_bundle %s is not on this workstation: environment builds on "
                   "this VM go without it until a fab deploy with it" % p.ca_bundle)
    elif pem:
        # Through SFTP: a CA bundle (a system's is ~200 KB) is too long for
        # a command line.
        remote = s.r.put_private(pem, "ca.pem")
        res = s.r.stdout(cmd.install_uploaded(remote, folder + "/ca.pem", "0644"),
                         what="installing the CA bundle").strip()
        s.out.ok("CA bundle %s: %s (every environment image build trusts it)" % (pem, res))
    if not pem:
        s.r.run(cmd.remove_files(folder + "/ca.pem"), what="removing the CA bundle")
    entry = (s.bundle_manifest or {}).get("wheelhouse")
    if entry:
        _install_wheelhouse(s, folder, entry)
    where = p.index_url or "PyPI"
    if entry or _wheelhouse_sha(s, folder):
        where = ("the wheelhouse, then " + where) if p.index_url else "the wheelhouse only"
    s.out.ok("environment images get packages from %s" % where)


def _wheelhouse_sha(s: Session, folder) -> str:
    return s.r.stdout(cmd.read_file(folder + "/wheelhouse/.bundle-sha256"),
                      what="reading the wheelhouse").strip()


def _install_wheelhouse(s: Session, folder, entry):
    if _wheelhouse_sha(s, folder) == entry["sha256"]:
        s.out.ok("wheelhouse of the bundle already there (%d wheels), unchanged" % entry["wheels"])
        return
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="mfs-wheelhouse-") as tmp:
        local = wheels.extract_member(s.bundle_path, Path(tmp))
        remote = "/var/tmp/metaflow-services-wheelhouse-%d.tar" % int(time.time())
        s.r.put_file(local, remote)
    try:
        s.r.run(cmd.unpack_wheelhouse(remote, folder + "/wheelhouse", entry["sha256"]),
                what="unpacking the wheelhouse")
    finally:
        s.r.run(cmd.remove_files(remote), warn=True)
    s.out.ok("wheelhouse: %d wheels for %d environment(s) of %s (%s)"
             % (entry["wheels"], entry["environments"], ", ".join(entry["flows"]) or "no flows",
                duration(time.time() - t0)))


def report(s: Session) -> list:
    """`fab status`: where packages come from (as the VM was deployed), and
    whether the VM reaches it."""
    p = config_mod.from_description(s.record.get("options") or {}).packages
    folder = s.dir + "/packages"
    house = s.r.stdout(cmd.read_file(folder + "/wheelhouse/" + wheelhouse.INDEX),
                       what="reading the wheelhouse")
    warnings = []
    if house.strip():
        idx = json.loads(house)
        s.out.info("wheelhouse: %d environment(s) of %s (bundle made %s)"
                   % (len(idx.get("environments") or {}), ", ".join(idx.get("flows") or [])
                      or "no flows", idx.get("made")))
        if not p.index_url:
            s.out.info("package index: none (the wheelhouse only: a flow whose pins are not in "
                       "it fails, naming them)")
            return warnings
    index = p.index_url or "https://pypi.org/simple"
    ca = " (CA bundle %s/ca.pem)" % folder if p.ca_bundle else ""
    code = s.r.stdout(cmd.probe_index(index, folder + "/ca.pem" if p.ca_bundle else None),
                      what="reaching the package index", warn=True).strip()
    if code.startswith(("2", "3")):
        s.out.info("package index: %s%s, reachable from the VM (HTTP %s)" % (index, ca, code))
    else:
        s.out.info("package index: %s%s, NOT reachable from the VM (%s)" % (index, ca, code))
        warnings.append("the VM cannot reach the package index %s (%s): @pypi/@conda steps "
                        "cannot build their images; set packages.index_url (a mirror it reaches), "
                        "packages.ca_bundle (behind a TLS-inspecting proxy), or bundle the "
                        "wheels (fab bundle --flows DIR)" % (index, code))
    return warnings
