"""Operating a deployment over time: `fab backup`, `fab restore`,
`fab upgrade`, and the backups part of `fab status`.

The archive itself is made and loaded on the VM by the stack's maintenance
service (metaflow_services/backup.py, the same code as the nightly backup);
these tasks take the deploy lock, run it, copy archives between the VM and
this workstation, and, for restore and upgrade, wrap a deploy around it:

* restore = a deploy onto a fresh VM with the backup's options and secrets
  (never generated anew), which loads the archive after the images are in
  place and before Airflow starts;
* upgrade = a backup, then a deploy with the new image references; if any
  step fails (migration, health, smoke test) the previous images come back
  with the database of that backup, and the report says so.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from fabric import task

from metaflow_services import __version__
from metaflow_services import backup as archive

from . import bundle as bundle_mod
from . import commands as cmd
from . import config as config_mod
from . import stack
from .remote import DeployError, Out, Remote, boundary
from .tasks import COMMON_HELP, Deployment, _connect, _duration, _set_flags, _state, _version_tuple

IN_CONTAINER = "/backups"


def run_backup(d: Deployment) -> str:
    """A backup on the VM by the maintenance service; returns its path on
    the VM. Its progress lines stream to the terminal."""
    res = d.r.run(cmd.compose(d.dir, "exec -T maintenance metaflow-services backup"),
                  hide=False, what="the backup", timeout=24 * 3600)
    name = next((line.split()[2] for line in res.stdout.splitlines()
                 if line.startswith("backup written: ")), None)
    if not name:
        raise DeployError("the backup did not say where it wrote the archive",
                          "see: fab -H %s logs maintenance" % d.r.host)
    return "%s/%s" % (d.o.backup.dir, Path(name).name)


def download(d: Deployment, remote_path, local: Path):
    """Copy an archive (root's, mode 0600) to this workstation, checked."""
    r = d.r
    local = local / Path(remote_path).name if local.is_dir() else local
    src = remote_path
    if r.sudo_mode != "root":
        # SFTP runs as the login user: hand it a private copy.
        src = "/tmp/%s.%d" % (Path(remote_path).name, os.getpid())
        r.run("install -m 0600 -o %s %s %s" % (cmd.q(r.user), cmd.q(remote_path), cmd.q(src)),
              what="preparing the copy")
    want = r.stdout("sha256sum %s" % cmd.q(remote_path), what="checksumming the backup").split()[0]
    d.out.info("copying to %s ..." % local)
    t0 = time.time()
    fd = os.open(str(local), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    try:
        r.c.sftp().get(src, str(local))
    finally:
        if src != remote_path:
            r.run("rm -f %s" % cmd.q(src), warn=True)
    os.chmod(local, 0o600)
    if bundle_mod.sha256_of(local) != want:
        local.unlink()
        raise DeployError("the copy of %s arrived damaged (checksum differs); removed it"
                          % remote_path, "run fab backup --to again")
    d.out.ok("copied to %s (%s, mode 0600, checksum matches) in %s"
             % (local, archive.human(local.stat().st_size), _duration(time.time() - t0)))
    return local


def list_backups(d: Deployment) -> list:
    """[(path, size, mtime)] on the VM, newest first."""
    out = d.r.stdout("find %s -maxdepth 1 -name '%s*%s' -printf '%%p %%s %%T@\\n' 2>/dev/null "
                     "|| true" % (cmd.q(d.o.backup.dir), archive.PREFIX, archive.SUFFIX),
                     what="listing backups")
    rows = []
    for line in out.strip().splitlines():
        path, size, mtime = line.rsplit(" ", 2)
        rows.append((path, int(size), float(mtime)))
    return sorted(rows, key=lambda x: x[0], reverse=True)


def report_backups(d: Deployment, out: Out, now=None) -> list:
    """The backups section of `fab status`; returns its warnings."""
    rows = list_backups(d)
    now = now or time.time()
    warnings = []
    if d.o.backup.schedule:
        out.info("nightly at %s UTC, keeping %d, in %s" % (d.o.backup.schedule, d.o.backup.keep,
                                                          d.o.backup.dir))
    else:
        out.info("no schedule (backup.schedule); %s holds what fab backup wrote"
                 % d.o.backup.dir)
    for path, size, mtime in rows[:5]:
        out.info("%s  %9s  %s ago" % (Path(path).name, archive.human(size),
                                     _duration(now - mtime)))
    if not rows:
        warnings.append("no backup on the VM yet: fab -H %s backup (or set backup.schedule)"
                        % d.r.host)
    elif now - rows[0][2] > d.o.backup.max_age_days * 86400:
        warnings.append("the newest backup is %s old (backup.max_age_days: %g)%s"
                        % (_duration(now - rows[0][2]), d.o.backup.max_age_days,
                           "; is the maintenance service healthy?" if d.o.backup.schedule
                           else "; run fab backup, or set backup.schedule"))
    return warnings


# ---------------------------------------------------------------------------
# fab backup
# ---------------------------------------------------------------------------


@task(help=dict(COMMON_HELP, to="also copy the archive to this file or folder on this "
                                "workstation"))
@boundary("backup")
def backup(c, to="", config=None, verbose=False):
    """Back up everything into one archive on the VM (and --to here).

    Databases, the bucket, Metaflow's local metadata, task logs, flows, DAGs,
    secrets, certificate and options, with a manifest of checksums."""
    out, o, r, d = _connect(c, "backup", verbose, config)
    d.whoami()
    _state(d)
    target = Path(to).expanduser() if to else None
    if target is not None and not (target.is_dir() or target.parent.is_dir()):
        raise DeployError("--to %s: no such folder on this workstation (nothing was done)"
                          % to, "create it first")
    with d.lock("fab backup"):
        out.step("backup of %s into %s" % (r.host, d.o.backup.dir))
        t0 = time.time()
        path = run_backup(d)
        size = int(r.stdout("stat -c %%s %s" % cmd.q(path), what="reading its size"))
        out.ok("%s (%s) in %s" % (path, archive.human(size), _duration(time.time() - t0)))
    local = None
    if target is not None:
        out.step("copy to this workstation")
        local = download(d, path, target)
    out.stream.write("\nRestore it onto a fresh VM with: fab -H NEWHOST restore %s\n"
                     % (local or "ARCHIVE (copy it off the VM first: fab backup --to DIR)"))


# ---------------------------------------------------------------------------
# fab restore
# ---------------------------------------------------------------------------


class Restore(Deployment):
    """A deploy with the backup's options and secrets, which loads the
    archive before Airflow starts."""

    def __init__(self, remote, o, out, local_archive: Path, manifest: dict):
        super().__init__(remote, o, out)
        self.local_archive = local_archive
        self.manifest = manifest

    def run(self, bundle_path=None, manifest=None):
        self.preflight()
        self.require_fresh_vm()
        with self.lock("fab restore"):
            self.install_docker()
            self.upload_stack()
            self.install_config()
            self.ensure_secrets()
            self.certificate()
            self.configure()
            self.images(bundle_path, manifest)
            self.load()
            self.go_live()
        self.summary()

    def require_fresh_vm(self):
        probe = ("[ -e %s/state/deploy.json ] && echo deployed; command -v docker >/dev/null && "
                 "docker volume inspect %s-postgres >/dev/null 2>&1 && echo data; true"
                 % (cmd.q(self.dir), cmd.q(self.o.project)))
        found = self.r.stdout(probe, what="looking for an existing deployment").split()
        if found:
            raise DeployError(
                "restore goes onto a fresh VM; %s has %s (nothing was changed)"
                % (self.r.host, " and ".join({"deployed": "a deployment in %s" % self.dir,
                                              "data": "the data volume %s-postgres"
                                              % self.o.project}[f] for f in found)),
                "restore onto a new VM, or remove this one's stack and data first: "
                "fab -H %s destroy --volumes" % self.r.host)
        self.out.ok("no deployment and no data on the VM: a fresh VM")

    def install_config(self):
        """The backup's secrets (so the restored databases, bucket and
        Airflow's encrypted connections still open) and its certificate."""
        self.out.step("secrets and certificate from the backup")
        with tempfile.TemporaryDirectory() as tmp:
            files = extract_config(self.local_archive, Path(tmp))
            remote = self.r.put_private(files["secrets.env"], "secrets.env")
            res = self.r.stdout(cmd.install_uploaded(remote, self.dir + "/secrets.env", "0600"),
                                what="installing the secrets")
            self.out.ok("%s/secrets.env (mode 0600): %s" % (self.dir, res.strip()))
            if "tls/cert.pem" in files and not self.manifest["deploy"].get("self_signed", True):
                # A certificate of the team's: the restore has it even if the
                # options' paths point at another workstation.
                for name, mode in (("cert.pem", "0644"), ("key.pem", "0600")):
                    remote = self.r.put_private(files["tls/" + name], name)
                    self.r.run(cmd.install_uploaded(remote, "%s/tls/%s" % (self.dir, name), mode),
                               what="installing tls/%s" % name)
                self.o.tls.cert = self.o.tls.key = ""
                self.keep_certificate = True
                self.out.ok("the certificate of the backup (not self-signed)")

    keep_certificate = False

    def certificate(self):
        if self.keep_certificate:
            self.out.step("TLS certificate")
            self.facts["tls_sha"] = self.r.stdout(cmd.tls_fingerprint(self.dir),
                                                  what="reading the certificate").strip()
            self.out.ok("kept the backup's certificate")
            return
        super().certificate()

    def smoke_test(self):
        # A restored platform is always proven with a run, whatever the
        # backup's deploy options say (the record keeps them as they were).
        saved, self.o.smoke_test = self.o.smoke_test, "always"
        try:
            super().smoke_test()
        finally:
            self.o.smoke_test = saved

    def load(self):
        self.out.step("loading the backup (databases, bucket, volumes, folders)")
        name = self.local_archive.name
        remote = "%s/%s" % (self.o.backup.dir, name)
        t0 = time.time()
        size = self.local_archive.stat().st_size
        self.out.info("uploading %s (%s) ..." % (name, archive.human(size)))
        tmp = self.r.put_private(self.local_archive, name)
        self.r.run("mv %s %s && chown root:root %s && chmod 0600 %s && rmdir %s"
                   % (cmd.q(tmp), cmd.q(remote), cmd.q(remote), cmd.q(remote),
                      cmd.q(str(Path(tmp).parent))), what="moving the archive into place")
        self.out.ok("uploaded in %s" % _duration(time.time() - t0))
        in_container = "%s/%s" % (IN_CONTAINER, name)
        # 1. the schema, with the images just loaded: before any data moves.
        self.r.run(cmd.compose(self.dir, "run --rm --no-deps -T maintenance metaflow-services "
                                         "restore --check %s" % cmd.q(in_container)),
                   hide=False, what="checking the backup against the images", timeout=3600)
        # 2. the stores, alone; then the data.
        store = self.o.object_store
        self.r.run(cmd.compose(self.dir, "--ansi never --progress plain up -d --no-build "
                                         "--pull never --wait postgres %s" % store),
                   what="starting postgres and %s" % store, timeout=900)
        self.r.run(cmd.compose(self.dir, "--ansi never run --rm --no-deps -T postgres-init"),
                   what="creating the databases' users", timeout=300)
        self.r.run(cmd.compose(self.dir, "run --rm --no-deps -T maintenance metaflow-services "
                                         "restore %s" % cmd.q(in_container)),
                   hide=False, what="loading the backup", timeout=24 * 3600)
        self.changed = True
        self.out.ok("loaded in %s; the archive stays in %s" % (_duration(time.time() - t0),
                                                               self.o.backup.dir))


def extract_config(path: Path, dest: Path) -> dict:
    """config/* of a (verified) archive into dest: {relative name: path}."""
    import tarfile

    found = {}
    with tarfile.open(path, mode="r:") as tar:
        for m in tar:
            if m.isfile() and m.name.startswith("config/"):
                rel = m.name[len("config/"):]
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(str(target), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(tar.extractfile(m).read())
                found[rel] = target
    if "secrets.env" not in found:
        raise DeployError("%s holds no secrets.env: it cannot rebuild the platform" % path, "")
    return found


@task(help=dict(COMMON_HELP, archive_path="a backup made by fab backup (on this workstation)",
                bundle="archive made by `fab bundle`: load its images instead of pulling",
                public_host="name or IP of the new VM for browsers and laptops (default: -H)"))
@boundary("restore")
def restore(c, archive_path, bundle=None, public_host=None, config=None, verbose=False):
    """Rebuild the platform from a backup on a fresh VM given with -H.

    Runs, artifacts, logs, DAGs, schedules, users and secrets come back;
    refuses a damaged archive or one newer than the images before changing
    anything."""
    out = Out(verbose)
    path = Path(archive_path).expanduser()
    out.step("checking %s (every file's checksum; nothing on the VM is touched)" % path)
    t0 = time.time()
    try:
        manifest = archive.verify(path)
    except archive.BackupError as e:
        raise DeployError("restore refused: %s (nothing on the VM was touched)" % e,
                          "use another backup; `ls -l` the backup folder, or fab backup again")
    made_by = manifest.get("metaflow_services_version") or "0"
    if _version_tuple(made_by) > _version_tuple(__version__):
        raise DeployError("restore refused: the backup was made by metaflow-services %s, this "
                          "checkout is %s (nothing on the VM was touched)" % (made_by, __version__),
                          "restore with a checkout at least as new as %s" % made_by)
    counts = manifest.get("counts", {})
    out.ok("%d files, %s, made %s (metaflow-services %s, Airflow %s): %d DAG runs, %d objects"
           % (len(manifest["members"]), archive.human(manifest.get("bytes", 0)),
              manifest["created_at"], made_by, manifest.get("airflow_version"),
              counts.get("dag_runs", 0), counts.get("bucket_objects", 0)))
    out.info("checked in %s" % _duration(time.time() - t0))
    options = manifest["deploy"].get("options")
    if not options:
        raise DeployError("the backup has no deploy record (state/deploy.json)", "")
    o = config_mod.from_description(options)
    if config:
        # Only where to find things on the new VM; the rest is the backup's.
        here = config_mod.load(config, {}, host=c.host)
        o.install_dir, o.data_dir, o.backup.dir = here.install_dir, here.data_dir, here.backup.dir
    o.public_host = public_host or c.host
    if o.tls.cert and not Path(o.tls.cert).expanduser().exists():
        o.tls.cert = o.tls.key = ""  # restore installs the backup's own (install_config)
    config_mod.validate(o, "the backup's options")
    bundle_manifest = bundle_mod.read_manifest(bundle) if bundle else None
    r = Remote(c, out)
    Restore(r, o, out, path, manifest).run(bundle, bundle_manifest)


# ---------------------------------------------------------------------------
# fab upgrade
# ---------------------------------------------------------------------------


class Upgrade(Deployment):
    def __init__(self, remote, new: config_mod.Options, old: config_mod.Options, out):
        super().__init__(remote, new, out)
        self.old = old
        self.backup_path = None

    def run(self, bundle_path=None, manifest=None):
        self.preflight()
        with self.lock("fab upgrade"):
            self.out.step("backup before the upgrade")
            self.backup_path = run_backup(self)
            self.out.ok(self.backup_path)
            try:
                self.prepare(bundle_path, manifest)
                self.go_live()
            except (DeployError, Exception) as e:  # noqa: BLE001 - every failure rolls back
                self.rollback(e)
        self.summary()

    def rollback(self, error):
        why = getattr(error, "what", None) or str(error)
        self.out.warn("the upgrade failed: %s" % why)
        self.out.step("rolling back to the previous images and the database of %s"
                      % Path(self.backup_path).name)
        old = Deployment(self.r, self.old, self.out)
        old.facts = self.facts
        try:
            old.configure()
            old.images()
            self.r.run(cmd.compose(self.dir, "--ansi never stop"), what="stopping the stack",
                       timeout=900)
            store = self.old.object_store
            self.r.run(cmd.compose(self.dir, "--ansi never --progress plain up -d --no-build "
                                             "--pull never --wait postgres %s" % store),
                       what="starting postgres", timeout=900)
            in_container = "%s/%s" % (IN_CONTAINER, Path(self.backup_path).name)
            self.r.run(cmd.compose(self.dir, "run --rm --no-deps -T maintenance metaflow-services"
                                             " restore --only postgres %s" % cmd.q(in_container)),
                       hide=False, what="restoring the database", timeout=24 * 3600)
            old.o.smoke_test = "always"
            old.go_live()
        except DeployError as e2:
            raise DeployError(
                "the upgrade failed (%s) and so did the rollback: %s" % (why, e2.what),
                "the backup taken before the upgrade is %s; restore it onto a fresh VM with "
                "fab restore, or see fab -H %s status" % (self.backup_path, self.r.host))
        images = stack.images(self.old)
        raise DeployError(
            "the upgrade failed (%s); rolled back: the stack runs the previous images again "
            "(%s) with the database as it was before the upgrade, healthy and smoke-tested"
            % (why, ", ".join("%s %s" % kv for kv in sorted(images.items()))),
            "the backup taken before the upgrade stays in %s; fix the cause (fab -H %s logs) "
            "and run fab upgrade again" % (self.backup_path, self.r.host))


@task(iterable=["set"], help=dict(COMMON_HELP, **{
    "bundle": "archive made by `fab bundle` with the new images",
    "set": "the new versions as KEY=VALUE, e.g. --set images.airflow=REF (repeatable)"}))
@boundary("upgrade")
def upgrade(c, bundle=None, set=None, config=None, verbose=False):
    """Move the deployment to new image versions, safely.

    Backup first, then migrate, health check and smoke test; on any failure
    the previous images and database come back. Without --set: the versions
    this checkout pins (RELEASES.md)."""
    out, o, r, d = _connect(c, "upgrade", verbose, config)
    d.whoami()
    st = _state(d)
    old = d.o
    new = config_mod.from_description(config_mod.describe(old))
    for k, v in _set_flags(set).items():
        config_mod.set_option(new, k, v)
    # What this checkout pins replaces what the VM runs, unless set above.
    config_mod.validate(new, "the upgrade's options")
    before, after = st["images"], stack.images(new)
    changes = {role: (before.get(role), ref) for role, ref in after.items()
               if before.get(role) != ref}
    out.step("upgrade of %s" % r.host)
    if not changes:
        out.ok("already at these versions: %s" % ", ".join(sorted(after.values())))
        return
    for role, (a, b) in sorted(changes.items()):
        out.info("%-10s %s -> %s" % (role, a or "(none)", b))
    manifest = bundle_mod.read_manifest(bundle) if bundle else None
    Upgrade(r, new, old, out).run(bundle, manifest)
