"""Operating a deployment over time: backup, restore, upgrade, and the
backups part of `fab status`.

The archive itself is made and loaded on the VM by the stack's maintenance
service (metaflow_services/backup.py, the same code as the nightly backup);
these steps take the deploy lock, run it, copy archives between the VM and
this workstation, and, for restore and upgrade, wrap the deploy's steps
around it:

* restore = ``RESTORE``: the deploy's steps onto a fresh VM with the backup's
  options and secrets (never generated anew), loading the archive after the
  images are in place and before Airflow starts; then every DAG is paused so
  that no schedule fires and no run in flight at backup time resumes while
  the old VM may still run them (`fab resume` goes live; `--resume` for a
  disaster recovery);
* upgrade = a backup, then ``steps.DEPLOY`` with the new image references; if
  any step fails (migration, health, smoke test) the previous images come
  back with the database of that backup, and the report says so.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from metaflow_services import archive, encryption

from . import bundle as bundle_mod
from . import commands as cmd
from . import credentials
from . import packages
from . import runs as runs_mod
from . import stack
from . import steps
from .remote import DeployError
from .session import Session, duration

IN_CONTAINER = "/backups"


# ---------------------------------------------------------------------------
# Backups on the VM
# ---------------------------------------------------------------------------


def run_backup(s: Session, encrypt_to="") -> tuple:
    """A backup on the VM by the maintenance service: (its path on the VM,
    the path of its encrypted copy or None). *encrypt_to* overrides the
    backup.encrypt_to the VM was deployed with. Progress streams to the
    terminal."""
    args = "backup" + (" --encrypt-to %s" % cmd.q(encryption.normalize(encrypt_to))
                       if encrypt_to else "")
    res = s.r.run(cmd.maintenance(s.dir, args, exec_=True), hide=False, what="the backup",
                  timeout=24 * 3600)
    said = {line.split(": ", 1)[0]: line.split()[3 if line.startswith("encrypted") else 2]
            for line in res.stdout.splitlines()
            if line.startswith(("backup written: ", "encrypted copy written: "))}
    if "backup written" not in said:
        raise DeployError("the backup did not say where it wrote the archive",
                          "see: fab -H %s logs maintenance" % s.host)
    on_vm = lambda key: "%s/%s" % (s.o.backup.dir, Path(said[key]).name)  # noqa: E731
    return on_vm("backup written"), (on_vm("encrypted copy written")
                                     if "encrypted copy written" in said else None)


def backup(s: Session, target: Path = None, encrypt_to=""):
    """`fab backup [--to TARGET] [--encrypt-to RECIPIENTS]`."""
    with s.lock("fab backup"):
        s.out.step("backup of %s into %s" % (s.host, s.o.backup.dir))
        t0 = time.time()
        path, sealed = run_backup(s, encrypt_to)
        size = int(s.r.stdout(cmd.file_size(path), what="reading its size"))
        s.out.ok("%s (%s) in %s" % (path, archive.human(size), duration(time.time() - t0)))
        if sealed:
            s.out.ok("%s: its encrypted copy (age); the plain archive stays on the VM" % sealed)
    local = None
    if target is not None:
        s.out.step("copy to this workstation" + (" (the encrypted copy)" if sealed else ""))
        local = download(s, sealed or path, target)
    how = "restore %s" % (local or "ARCHIVE (copy it off the VM first: fab backup --to DIR)")
    if sealed:
        how += " --identity KEY (the age identity or SSH private key of a recipient)"
    s.out.stream.write("\nRestore it onto a fresh VM with: fab -H NEWHOST %s\n" % how)


@contextmanager
def opened(out, path: Path, identity=None):
    """The archive to restore: *path*, or the archive inside it when it is an
    encrypted copy (NAME.age), decrypted into a private folder next to it
    that is removed afterwards."""
    if not (path.is_file() and encryption.is_encrypted(path)):
        if identity:
            out.warn("%s is not encrypted: --identity is not needed" % path)
        yield path
        return
    identity = Path(identity or _ask_identity(path)).expanduser()
    out.step("opening the encrypted backup %s with %s" % (path, identity))
    try:
        folder = Path(tempfile.mkdtemp(prefix=".mfs-restore-", dir=str(path.parent)))
    except OSError:  # a read-only folder of backups
        folder = Path(tempfile.mkdtemp(prefix="mfs-restore-"))
    try:
        t0 = time.time()
        try:
            plain = encryption.decrypt(path, identity, folder / path.name[:-len(encryption.SUFFIX)])
        except archive.BackupError as e:
            raise DeployError("restore refused: %s (nothing on the VM was touched)" % e,
                              "give --identity the age identity file or SSH private key whose "
                              "public key the backup was encrypted to (backup.encrypt_to)")
        out.ok("decrypted into %s (private, removed afterwards) in %s"
               % (folder, duration(time.time() - t0)))
        yield plain
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _ask_identity(path: Path) -> str:
    if not sys.stdin.isatty():
        raise DeployError("%s is encrypted (age): it needs the key to open it (nothing on the VM "
                          "was touched)" % path,
                          "give --identity FILE: the age identity file or SSH private key of "
                          "one of its recipients")
    return input("%s is encrypted. Identity file (age identity or SSH private key): " % path)


def download(s: Session, remote_path, local: Path):
    """Copy an archive (root's, mode 0600) to this workstation, checked."""
    r = s.r
    local = local / Path(remote_path).name if local.is_dir() else local
    src = remote_path
    if r.sudo_mode != "root":
        # SFTP runs as the login user: hand it a private copy.
        src = "/tmp/%s.%d" % (Path(remote_path).name, os.getpid())
        r.run(cmd.private_copy(remote_path, src, r.user), what="preparing the copy")
    want = r.stdout(cmd.sha256(remote_path), what="checksumming the backup").split()[0]
    s.out.info("copying to %s ..." % local)
    t0 = time.time()
    os.close(os.open(str(local), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    try:
        r.c.sftp().get(src, str(local))
    finally:
        if src != remote_path:
            r.run(cmd.remove_files(src), warn=True)
    os.chmod(local, 0o600)
    if bundle_mod.sha256_of(local) != want:
        local.unlink()
        raise DeployError("the copy of %s arrived damaged (checksum differs); removed it"
                          % remote_path, "run fab backup --to again")
    s.out.ok("copied to %s (%s, mode 0600, checksum matches) in %s"
             % (local, archive.human(local.stat().st_size), duration(time.time() - t0)))
    return local


def list_backups(s: Session) -> list:
    """[(path, size, mtime)] on the VM, newest first."""
    text = s.r.stdout(cmd.list_files(s.o.backup.dir, "%s*%s" % (archive.PREFIX, archive.SUFFIX)),
                      what="listing backups")
    rows = []
    for line in text.strip().splitlines():
        path, size, mtime = line.rsplit(" ", 2)
        rows.append((path, int(size), float(mtime)))
    return sorted(rows, key=lambda x: x[0], reverse=True)


def report(s: Session, now=None) -> list:
    """The backups section of `fab status`; returns its warnings."""
    rows = list_backups(s)
    now = now or time.time()
    b = s.o.backup
    if b.schedule:
        s.out.info("nightly at %s UTC, keeping %d, in %s" % (b.schedule, b.keep, b.dir))
    else:
        s.out.info("no schedule (backup.schedule); %s holds what fab backup wrote" % b.dir)
    for path, size, mtime in rows[:5]:
        s.out.info("%s  %9s  %s ago" % (Path(path).name, archive.human(size),
                                       duration(now - mtime)))
    if not rows:
        return ["no backup on the VM yet: fab -H %s backup (or set backup.schedule)" % s.host]
    if now - rows[0][2] > b.max_age_days * 86400:
        return ["the newest backup is %s old (backup.max_age_days: %g)%s"
                % (duration(now - rows[0][2]), b.max_age_days,
                   "; is the maintenance service healthy?" if b.schedule
                   else "; run fab backup, or set backup.schedule")]
    return []


# ---------------------------------------------------------------------------
# Restore: the deploy's steps with the backup's configuration and data
# ---------------------------------------------------------------------------


def restore(s: Session):
    """`fab restore`: *s* carries the archive (s.archive, s.archive_manifest)."""
    s.always_smoke_test = True  # a restored platform is always proven with a run
    steps.preflight(s)
    require_fresh_vm(s)
    with s.lock("fab restore"):
        steps.run(s, RESTORE)
    steps.summary(s)
    if s.held:
        s.out.stream.write(
            "Held back (the old VM may still run them): %d schedules paused, %d runs in "
            "flight at backup time not resumed. Go live with: fab -H %s resume\n"
            % (len(s.held["paused_dags"]), len(s.held["runs_in_flight"]), s.host))


def hold_runs(s: Session):
    """Right after the data is loaded, before Airflow starts: what was in
    flight at backup time, and (unless --resume) every schedule paused."""
    s.out.step("runs in flight at backup time")
    runs = runs_mod.in_flight(s)
    for line in runs_mod.describe(runs):
        s.out.info(line)
    if s.resume:
        n = runs_mod.reset_cut_off(s)
        s.out.ok("%d runs in flight and every schedule go live now (--resume; %d tasks the "
                 "backup caught running run again as their next attempt): make sure the old "
                 "VM is gone, or they run twice" % (len(runs), n))
        return
    s.held = runs_mod.hold(s, runs)
    s.out.ok("held back: %d active DAGs paused, so no schedule fires and the %d runs in flight "
             "do not go on; %d tasks the backup caught running will run again as their next "
             "attempt once you go live: fab -H %s resume"
             % (len(s.held["paused_dags"]), len(runs), s.held["tasks_reset"], s.host))


def resume(s: Session):
    """`fab resume`: unpause what a restore held back."""
    with s.lock("fab resume"):
        held = runs_mod.read_held(s)
        if not held:
            s.out.ok("nothing held back on %s: no restore paused anything (pause and unpause "
                     "DAGs in the Airflow UI)" % s.host)
            return
        s.out.step("going live: what the restore of %s held back" % held["held_at"])
        dags = runs_mod.release(s, held)
    for d in dags:
        s.out.info("unpaused %s" % d)
    s.out.ok("%d DAGs unpaused: their schedules fire again and the %d runs that were in flight "
             "at backup time continue (a task cut off by the backup runs again as its next "
             "attempt)" % (len(dags), len(held.get("runs_in_flight") or [])))


def held_warning(s: Session) -> list:
    """The warning of `fab status` while a restore holds things back."""
    held = runs_mod.read_held(s)
    if not held:
        return []
    return ["restored %s with %d DAGs paused and %d runs in flight held back: fab -H %s resume "
            "when the old VM is gone" % (held["held_at"], len(held["paused_dags"]),
                                         len(held["runs_in_flight"]), s.host)]


def require_fresh_vm(s: Session):
    found = s.r.stdout(cmd.existing_deployment(s.dir, s.o.project),
                       what="looking for an existing deployment").split()
    if found:
        raise DeployError(
            "restore goes onto a fresh VM; %s has %s (nothing was changed)"
            % (s.host, " and ".join({"deployed": "a deployment in %s" % s.dir,
                                     "data": "the data volume %s-postgres" % s.o.project}[f]
                                    for f in found)),
            "restore onto a new VM, or remove this one's stack and data first: "
            "fab -H %s destroy --volumes" % s.host)
    s.out.ok("no deployment and no data on the VM: a fresh VM")


def install_backup_config(s: Session):
    """The backup's secrets (so the restored databases, bucket and Airflow's
    encrypted connections still open) and its certificate."""
    s.out.step("secrets and certificate from the backup")
    with tempfile.TemporaryDirectory() as tmp:
        files = extract_config(s.archive, Path(tmp))
        remote = s.r.put_private(files["secrets.env"], "secrets.env")
        res = s.r.stdout(cmd.install_uploaded(remote, s.dir + "/secrets.env", "0600"),
                         what="installing the secrets")
        s.out.ok("%s/secrets.env (mode 0600): %s" % (s.dir, res.strip()))
        if "tls/cert.pem" in files and not s.archive_manifest["deploy"].get("self_signed", True):
            # A certificate of the team's: the restore has it even if the
            # options' paths point at another workstation.
            for name, mode in (("cert.pem", "0644"), ("key.pem", "0600")):
                remote = s.r.put_private(files["tls/" + name], name)
                s.r.run(cmd.install_uploaded(remote, "%s/tls/%s" % (s.dir, name), mode),
                        what="installing tls/%s" % name)
            s.o.tls.cert = s.o.tls.key = ""
            s.keep_certificate = True
            s.out.ok("the certificate of the backup (not self-signed)")


def load_backup(s: Session):
    s.out.step("loading the backup (databases, bucket, volumes, folders)")
    name = s.archive.name
    remote = "%s/%s" % (s.o.backup.dir, name)
    t0 = time.time()
    s.out.info("uploading %s (%s) ..." % (name, archive.human(s.archive.stat().st_size)))
    tmp = s.r.put_private(s.archive, name)
    s.r.run(cmd.move_uploaded(tmp, remote, "0600"), what="moving the archive into place")
    s.out.ok("uploaded in %s" % duration(time.time() - t0))
    in_container = "%s/%s" % (IN_CONTAINER, name)
    # 1. the schema, with the images just loaded: before any data moves.
    s.r.run(cmd.maintenance(s.dir, "restore --check %s" % cmd.q(in_container)),
            hide=False, what="checking the backup against the images", timeout=3600)
    # 2. the stores, alone; then the data.
    start_stores(s)
    s.r.run(cmd.compose(s.dir, "--ansi never run --rm --no-deps -T postgres-init"),
            what="creating the databases' users", timeout=300)
    s.r.run(cmd.maintenance(s.dir, "restore %s" % cmd.q(in_container)),
            hide=False, what="loading the backup", timeout=24 * 3600)
    s.changed = True
    s.out.ok("loaded in %s; the archive stays in %s" % (duration(time.time() - t0),
                                                        s.o.backup.dir))


def start_stores(s: Session):
    """PostgreSQL and the object store alone, healthy, before data moves."""
    store = s.o.object_store
    s.r.run(cmd.compose(s.dir, "--ansi never --progress plain up -d --no-build --pull never "
                               "--wait postgres %s" % store),
            what="starting postgres and %s" % store, timeout=900)


def extract_config(path: Path, dest: Path) -> dict:
    """config/* of a (verified) archive into dest: {relative name: path}."""
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


RESTORE = ([steps.install_docker, steps.upload_stack, install_backup_config, credentials.ensure_secrets,
            credentials.certificate, steps.configure, packages.install, steps.images, load_backup,
            hold_runs] + steps.GO_LIVE)


# ---------------------------------------------------------------------------
# Upgrade: a backup, the deploy's steps, and a rollback when one fails
# ---------------------------------------------------------------------------


def runs_in_flight_before_upgrade(s: Session, drain, drain_timeout, go_ahead, ask=None):
    """Before an upgrade changes anything: runs in flight are named, and the
    user decides (drain: wait for them; go ahead: their running tasks stop and
    run again as their next attempt after the upgrade). Without a decision
    (and no terminal to ask on) nothing changes."""
    runs = runs_mod.in_flight(s)
    if not runs:
        s.out.ok("no runs in flight")
        return
    s.out.warn("%d runs in flight:" % len(runs))
    for line in runs_mod.describe(runs):
        s.out.info(line)
    if not (drain or go_ahead):
        answer = (ask or _ask)("Wait for them to finish (d), upgrade now and stop their running "
                               "tasks (g), or cancel (c)? [d/g/c] ")
        drain, go_ahead = answer == "d", answer == "g"
        if not (drain or go_ahead):
            raise DeployError("the upgrade waits for a decision: %d runs in flight (nothing was "
                              "changed)" % len(runs),
                              "run fab upgrade --drain to wait for them, or --go-ahead to stop "
                              "their running tasks (they run again after the upgrade)")
    if go_ahead:
        s.out.ok("going ahead (--go-ahead): running tasks stop with the scheduler and run again "
                 "as their next attempt")
        return
    deadline = time.time() + drain_timeout
    while runs:
        if time.time() > deadline:
            raise DeployError("%d runs still in flight after %s (nothing was changed)"
                              % (len(runs), duration(drain_timeout)),
                              "wait longer (--drain-timeout), or --go-ahead")
        s.out.info("draining: %d runs in flight (%s) ..." % (len(runs), ", ".join(
            "%s/%s" % (r["dag_id"], r["run_id"]) for r in runs[:3])))
        time.sleep(15)
        runs = runs_mod.in_flight(s)
    s.out.ok("drained: no runs in flight")


def _ask(question):
    import sys

    if not sys.stdin.isatty():
        return ""
    try:
        return input(question).strip().lower()[:1]
    except EOFError:
        return ""


def upgrade(new: Session, old: Session):
    """*new* carries the new options, *old* the deployed ones (same VM)."""
    steps.preflight(new)
    with new.lock("fab upgrade"):
        new.out.step("backup before the upgrade")
        backup_path, _ = run_backup(new)
        new.out.ok(backup_path)
        try:
            steps.run(new, steps.DEPLOY)
        except Exception as e:  # noqa: BLE001 - every failure rolls back
            rollback(new, old, backup_path, e)
    steps.summary(new)


def rollback(new: Session, old: Session, backup_path, error):
    why = getattr(error, "what", None) or str(error)
    new.out.warn("the upgrade failed: %s" % why)
    new.out.step("rolling back to the previous images and the database of %s"
                 % Path(backup_path).name)
    old.facts, old.workers = new.facts, new.workers
    old.always_smoke_test = True
    try:
        steps.configure(old)
        steps.images(old)
        old.r.run(cmd.compose(old.dir, "--ansi never stop"), what="stopping the stack",
                  timeout=900)
        start_stores(old)
        in_container = "%s/%s" % (IN_CONTAINER, Path(backup_path).name)
        old.r.run(cmd.maintenance(old.dir, "restore --only postgres %s" % cmd.q(in_container)),
                  hide=False, what="restoring the database", timeout=24 * 3600)
        steps.run(old, steps.GO_LIVE)
    except DeployError as e2:
        raise DeployError(
            "the upgrade failed (%s) and so did the rollback: %s" % (why, e2.what),
            "the backup taken before the upgrade is %s; restore it onto a fresh VM with "
            "fab restore, or see fab -H %s status" % (backup_path, old.host))
    images = stack.images(old.o)
    raise DeployError(
        "the upgrade failed (%s); rolled back: the stack runs the previous images again "
        "(%s) with the database as it was before the upgrade, healthy and smoke-tested"
        % (why, ", ".join("%s %s" % kv for kv in sorted(images.items()))),
        "the backup taken before the upgrade stays in %s; fix the cause (fab -H %s logs) "
        "and run fab upgrade again" % (backup_path, old.host))
