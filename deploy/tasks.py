"""The Fabric commands: thin adapters from `fab TASK` arguments to the
deploy's library. Each one opens a session (deploy/session.py), calls one
function and lets ``boundary`` turn any failure into one line. Only
fabfile.py imports this module.

    session.py   connect, options, state on the VM (record, secrets, lock)
    steps.py     the deploy engine: ordered lists of steps
    credentials.py  secrets, certificate, token signing key (steps)
    health.py    waiting for health, proxy, bucket, smoke test
    backups.py   backup, restore (RESTORE steps), upgrade with rollback
    workers.py   add-worker (WORKER steps), remove-worker
    status.py, lifecycle.py, client.py, flows.py: the other commands
    commands.py  every shell line run on the VM; remote.py runs them
"""

from __future__ import annotations

import time
from pathlib import Path

from fabric import task
from invoke.exceptions import Exit

from metaflow_services import __version__
from metaflow_services import archive, encryption

from . import backups, client, lifecycle, platform_secrets, status as status_mod, steps, workers
from . import bundle as bundle_mod
from . import commands as cmd
from . import config as config_mod
from . import flows as flows_mod
from . import stack
from .config import ConfigError
from .remote import DeployError, Out, Remote, boundary
from .session import Session, connect, duration, options, require_host, set_flags, version_tuple

COMMON_HELP = {
    "config": "options file (default: deploy.yaml next to the fabfile, if present)",
    "verbose": "show every remote command and its output, and tracebacks",
}
BUNDLE_HELP = "archive made by `fab bundle`: load its images instead of pulling"


@task(iterable=["set"], help=dict(COMMON_HELP, **{
    "bundle": BUNDLE_HELP,
    "object_store": "seaweedfs (default) or minio",
    "public_host": "name or IP browsers and laptops use (default: the -H host)",
    "metaflow_services": "on/off: the Metaflow metadata service and UI",
    "smoke_test": "always | on-change (default) | never: run the hello flow after deploying",
    "set": "any option as KEY=VALUE, e.g. --set ports.https=8443 (repeatable)",
}))
@boundary("deploy")
def deploy(c, config=None, bundle=None, object_store=None, public_host=None,
           metaflow_services=None, smoke_test=None, set=None, verbose=False):
    """Deploy (or update) the whole platform on the VM given with -H."""
    flags = set_flags(set)
    flags.update({"object_store": object_store, "public_host": public_host,
                  "metaflow_services": metaflow_services, "smoke_test": smoke_test})
    require_host(c, "deploy")
    out = Out(verbose)
    s = Session(Remote(c, out), options(c, config, flags), out)
    s.use_bundle(bundle)
    steps.deploy(s)


@task(help=COMMON_HELP)
@boundary("status")
def status(c, config=None, verbose=False):
    """Every service's state and health, versions, disk use, last runs."""
    s = connect(c, "status", verbose, config)
    if not status_mod.report(s):
        raise Exit("fab status on %s: some checks failed (above)" % s.host, code=1)


@task(help=dict(COMMON_HELP, service="one service, e.g. airflow-scheduler (default: all)",
                follow="keep printing new lines", tail="lines per service"))
@boundary("logs")
def logs(c, service="", follow=False, tail=200, config=None, verbose=False):
    """Logs of the stack's services: fab logs [-s SERVICE] [-f] [-t LINES]."""
    s = connect(c, "logs", verbose, config, deployed=False)
    s.r.run(cmd.logs(s.dir, service, int(tail), follow), hide=False, raw=True,
            what="docker compose logs")


@task(help=COMMON_HELP)
@boundary("stop")
def stop(c, config=None, verbose=False):
    """Stop every container (data and configuration stay)."""
    lifecycle.stop(connect(c, "stop", verbose, config))


@task(help=COMMON_HELP)
@boundary("start")
def start(c, config=None, verbose=False):
    """Start the stack again (after `fab stop`) and wait until it is healthy."""
    lifecycle.start(connect(c, "start", verbose, config))


@task(help=dict(COMMON_HELP, volumes="also delete all data: database, object store, secrets, "
                                     "DAG and flow folders",
                yes="do not ask for confirmation"))
@boundary("destroy")
def destroy(c, volumes=False, yes=False, config=None, verbose=False):
    """Remove the stack from the VM; data is kept unless --volumes."""
    s = connect(c, "destroy", verbose, config, deployed=False)
    try:
        s.state()
    except DeployError:
        pass  # no record (a failed first deploy): the options given here say what to remove
    lifecycle.destroy(s, volumes=volumes, yes=yes, confirm_with=c.host)


@task(help=dict(COMMON_HELP, name="profile name: writes ~/.metaflowconfig/config_NAME.json",
                directory="write into this folder instead of ~/.metaflowconfig",
                tunnel="use the VM through `fab tunnel` (localhost ports) instead of its address"))
@boundary("client-config")
def client_config(c, name="", directory="", tunnel=False, config=None, verbose=False):
    """Write a Metaflow profile for this workstation.

    Laptops then use the VM's metadata service and object store:
    METAFLOW_PROFILE=NAME python flow.py run."""
    client.write_profile(connect(c, "client-config", verbose, config), name, directory, tunnel)


@task(default=True, help=dict(COMMON_HELP, show="print the values",
                              name="print only this one (e.g. MFS_AIRFLOW_PASSWORD_ADMIN)"))
@boundary("secrets")
def secrets(c, show=False, name="", config=None, verbose=False):
    """The deployment's generated passwords and keys (names only, unless
    --show or --name). Secrets for flows: fab secrets.set | secrets.list."""
    s = connect(c, "secrets", verbose, config, deployed=False)
    values = s.secrets()
    if name:
        key = name if name in values else name.upper()
        if key not in values:
            raise DeployError("no secret %s; known: %s" % (name, ", ".join(sorted(values))), "")
        s.out.stream.write(values[key] + "\n")
        return
    for k in sorted(values):
        s.out.stream.write("%s=%s\n" % (k, values[k] if show else "(hidden; --show prints it)"))


@task(name="set", help=dict(COMMON_HELP, name="the secret's name, as @secrets(sources=[NAME]) "
                                               "names it"))
@boundary("secrets.set")
def secrets_set(c, name, config=None, verbose=False):
    """Set a secret for flows' @secrets: KEY=VALUE lines (or a JSON object)
    on standard input, or typed at hidden prompts; each KEY becomes an
    environment variable of the steps that name it."""
    platform_secrets.run(connect(c, "secrets.set", verbose, config), "set", name)


@task(name="list", help=COMMON_HELP)
@boundary("secrets.list")
def secrets_list(c, config=None, verbose=False):
    """The secrets flows can name in @secrets, with their variables (not values)."""
    platform_secrets.run(connect(c, "secrets.list", verbose, config), "list", "")


@task(name="delete", help=dict(COMMON_HELP, name="the secret to delete"))
@boundary("secrets.delete")
def secrets_delete(c, name, config=None, verbose=False):
    """Delete a secret flows name in @secrets."""
    platform_secrets.run(connect(c, "secrets.delete", verbose, config), "delete", name)


@task(iterable=["set"], help=dict(COMMON_HELP, output="the archive to write (default: "
                                                      "metaflow-services-bundle.tar)",
                                   flows="also the wheels of the @pypi/@conda/requirements.txt "
                                         "environments of the flows in this folder (VMs "
                                         "without a package index)",
                                   set="any option as KEY=VALUE (repeatable)"))
@boundary("bundle")
def bundle(c, output="metaflow-services-bundle.tar", flows="", config=None, verbose=False,
           set=None):
    """Save every image the stack needs (for these options) into one archive;
    with --flows DIR also the wheels of those flows' step environments."""
    out = Out(verbose)
    o = config_mod.load(config, set_flags(set), host=getattr(c, "host", None) or "localhost")
    bundle_mod.make(o, Path(output), out, flows=Path(flows).expanduser() if flows else None)
    out.stream.write("Deploy with: fab -H HOST deploy --bundle %s (workers: fab -H WORKER "
                     "add-worker --main HOST --bundle %s)\n" % (output, output))


@task(help=COMMON_HELP)
@boundary("unlock")
def unlock(c, config=None, verbose=False):
    """Release the deploy lock left by an interrupted deploy."""
    lifecycle.unlock(connect(c, "unlock", verbose, config, deployed=False))


@task(help=dict(
    COMMON_HELP, folder="the local folder of flows",
    delete="also remove flows on the VM that are not in the folder",
    timeout="seconds to wait for the flow-watcher (default 120)"))
@boundary("push-flows")
def push_flows(c, folder, delete=False, timeout=120, config=None, verbose=False):
    """Copy a folder of flows to the VM and wait for their DAGs.

    Only changed files are copied; each flow's DAG id and schedule, or its
    compile error, is printed."""
    s = connect(c, "push-flows", verbose, config)
    flows_mod.push(s.r, s.out, Path(folder), s.o.data_dir, s.o.airflow_url, delete=delete,
                   timeout=int(timeout))


@task(help=dict(COMMON_HELP, seconds="close the tunnel after this many seconds (default: "
                                     "on Ctrl-C)"))
@boundary("tunnel")
def tunnel(c, seconds=0, config=None, verbose=False):
    """Forward the UIs, metadata API and S3 to localhost over SSH.

    For VMs whose ports a firewall closes: local port = VM port + 10000."""
    s = connect(c, "tunnel", verbose, config)
    s.out.step("tunnel to %s over SSH" % s.host)
    flows_mod.forward(c, s.out, flows_mod.tunnel_ports(s.record), seconds=float(seconds))


def _in_scheduler(c, task_name, config, verbose, title, args):
    """Runs `metaflow-services ARGS` in the scheduler container; prints its output."""
    s = connect(c, task_name, verbose, config)
    s.out.step("%s on %s" % (title, s.host))
    for line in s.r.stdout(cmd.scheduler_exec(s.dir, args), what=title).splitlines():
        s.out.info(line)


@task(help=COMMON_HELP)
@boundary("images")
def images(c, config=None, verbose=False):
    """List the step environment images built on the VM.

    (@pypi, @conda, requirements.txt), with size and last use."""
    _in_scheduler(c, "images", config, verbose, "step environment images", "images")


@task(help=dict(COMMON_HELP, dry_run="only say what would be removed"))
@boundary("prune-images")
def prune_images(c, dry_run=False, config=None, verbose=False):
    """Remove the step environment images no DAG on the VM uses."""
    _in_scheduler(c, "prune-images", config, verbose, "removing unused step environment images",
                  "prune-images" + (" --dry-run" if dry_run else ""))


# ---------------------------------------------------------------------------
# Backups, restore, upgrade
# ---------------------------------------------------------------------------


@task(help=dict(COMMON_HELP, to="also copy the archive to this file or folder on this "
                                "workstation (its encrypted copy, when there is one)",
                encrypt_to="age (age1...) or SSH public keys, comma-separated: also write an "
                           "encrypted copy (default: the option backup.encrypt_to)"))
@boundary("backup")
def backup(c, to="", encrypt_to="", config=None, verbose=False):
    """Back up everything into one archive on the VM (and --to here).

    Databases, the bucket, Metaflow's local metadata, task logs, flows, DAGs,
    secrets, certificate and options, with a manifest of checksums. With
    --encrypt-to (or backup.encrypt_to) also an age-encrypted copy, which is
    what --to copies here."""
    if encrypt_to:
        try:
            encryption.recipients(encrypt_to)
        except archive.BackupError as e:
            raise ConfigError("--encrypt-to: %s (nothing was done)" % e,
                              "give age public keys (age-keygen -y KEYFILE) or SSH public keys")
    s = connect(c, "backup", verbose, config)
    target = Path(to).expanduser() if to else None
    if target is not None and not (target.is_dir() or target.parent.is_dir()):
        raise DeployError("--to %s: no such folder on this workstation (nothing was done)"
                          % to, "create it first")
    backups.backup(s, target, encrypt_to)


@task(help=dict(COMMON_HELP, archive_path="a backup made by fab backup (on this workstation)",
                bundle=BUNDLE_HELP,
                public_host="name or IP of the new VM for browsers and laptops (default: -H)",
                resume="disaster recovery (the old VM is gone): schedules and the runs in "
                       "flight at backup time go live at once, instead of after fab resume",
                identity="for an encrypted backup (NAME.age): the age identity file or SSH "
                         "private key of one of its recipients (asked for when not given)"))
@boundary("restore")
def restore(c, archive_path, bundle=None, public_host=None, resume=False, identity=None,
            config=None, verbose=False):
    """Rebuild the platform from a backup on a fresh VM given with -H.

    Runs, artifacts, logs, DAGs, schedules, users and secrets come back;
    refuses a damaged archive or one newer than the images before changing
    anything. Every schedule stays paused and the runs in flight at backup
    time do not go on until `fab resume` (or --resume): the old VM may still
    be running them."""
    out = Out(verbose)
    path = Path(archive_path).expanduser()
    with backups.opened(out, path, identity) as path:
        _restore(c, out, path, bundle, public_host, resume, config)


def _restore(c, out, path, bundle, public_host, resume, config):
    manifest = _checked_backup(out, path)
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
        o.tls.cert = o.tls.key = ""  # restore installs the backup's own (install_backup_config)
    if o.packages.ca_bundle and not Path(o.packages.ca_bundle).expanduser().exists():
        out.warn("packages.ca_bundle %s of the backup's options is not on this workstation: "
                 "environment builds on the new VM go without it until a fab deploy with it"
                 % o.packages.ca_bundle)
        o.packages.ca_bundle = ""
    config_mod.validate(o, "the backup's options")
    s = Session(Remote(c, out), o, out)
    s.use_bundle(bundle)
    s.archive, s.archive_manifest = path, manifest
    s.resume = bool(resume)
    backups.restore(s)


@task(help=COMMON_HELP)
@boundary("resume")
def resume(c, config=None, verbose=False):
    """Go live after a restore: unpause the DAGs it paused; the runs in
    flight at backup time go on."""
    backups.resume(connect(c, "resume", verbose, config))


def _checked_backup(out, path: Path) -> dict:
    """The manifest of a backup whose every file checks out and that this
    checkout can restore."""
    out.step("checking %s (every file's checksum; nothing on the VM is touched)" % path)
    t0 = time.time()
    try:
        manifest = archive.verify(path)
    except archive.BackupError as e:
        raise DeployError("restore refused: %s (nothing on the VM was touched)" % e,
                          "use another backup; `ls -l` the backup folder, or fab backup again")
    made_by = manifest.get("metaflow_services_version") or "0"
    if version_tuple(made_by) > version_tuple(__version__):
        raise DeployError("restore refused: the backup was made by metaflow-services %s, this "
                          "checkout is %s (nothing on the VM was touched)" % (made_by, __version__),
                          "restore with a checkout at least as new as %s" % made_by)
    counts = manifest.get("counts", {})
    out.ok("%d files, %s, made %s (metaflow-services %s, Airflow %s): %d DAG runs, %d objects"
           % (len(manifest["members"]), archive.human(manifest.get("bytes", 0)),
              manifest["created_at"], made_by, manifest.get("airflow_version"),
              counts.get("dag_runs", 0), counts.get("bucket_objects", 0)))
    out.info("checked in %s" % duration(time.time() - t0))
    return manifest


@task(iterable=["set"], help=dict(COMMON_HELP, **{
    "bundle": "archive made by `fab bundle` with the new images",
    "set": "the new versions as KEY=VALUE, e.g. --set images.airflow=REF (repeatable)",
    "drain": "runs in flight: wait until they finish (up to --drain-timeout seconds), then "
             "upgrade",
    "drain_timeout": "with --drain: give up (changing nothing) after this many seconds",
    "go_ahead": "runs in flight: upgrade now; their running tasks are stopped and run again "
                "as their next attempt after the upgrade"}))
@boundary("upgrade")
def upgrade(c, bundle=None, set=None, drain=False, drain_timeout=3600, go_ahead=False,
            config=None, verbose=False):
    """Move the deployment to new image versions, safely.

    Backup first, then migrate, health check and smoke test; on any failure
    the previous images and database come back. Without --set: the versions
    this checkout pins (RELEASES.md). With runs in flight it asks (or takes
    --drain / --go-ahead) before changing anything."""
    old = connect(c, "upgrade", verbose, config)
    new_o = config_mod.from_description(config_mod.describe(old.o))
    for k, v in set_flags(set).items():
        config_mod.set_option(new_o, k, v)
    # What this checkout pins replaces what the VM runs, unless set above.
    config_mod.validate(new_o, "the upgrade's options")
    before, after = old.record["images"], stack.images(new_o)
    changes = {role: (before.get(role), ref) for role, ref in after.items()
               if before.get(role) != ref}
    old.out.step("upgrade of %s" % old.host)
    if not changes:
        old.out.ok("already at these versions: %s" % ", ".join(sorted(after.values())))
        return
    for role, (a, b) in sorted(changes.items()):
        old.out.info("%-10s %s -> %s" % (role, a or "(none)", b))
    backups.runs_in_flight_before_upgrade(old, drain, float(drain_timeout), go_ahead)
    new = Session(old.r, new_o, old.out)
    new.use_bundle(bundle)
    backups.upgrade(new, old)


# ---------------------------------------------------------------------------
# Worker VMs
# ---------------------------------------------------------------------------


@task(help=dict(COMMON_HELP, **{
    "main": "the main VM (as for fab -H): the worker takes its tasks",
    "queue": "queues this worker serves, comma-separated (default: default, i.e. any step)",
    "slots": "tasks at a time (default: the worker's CPU cores)",
    "gpus": "GPUs steps may ask for with @resources(gpu=N) (not detected; needs the NVIDIA "
            "container toolkit on the worker)",
    "name": "worker name in Airflow and in task metadata (default: the VM's host name)",
    "bundle": "archive made by `fab bundle`: load its images instead of building them",
}))
@boundary("add-worker")
def add_worker(c, main="", queue="", slots=0, gpus=0, name="", bundle=None, config=None,
               verbose=False):
    """Add the -H VM as a worker of the main VM (Airflow's Edge executor)."""
    queues = workers.queues_of(queue)
    w = _worker_session(c, "add-worker", main, config, verbose)
    w.use_bundle(bundle)
    w.main.bundle_path, w.main.bundle_manifest = w.bundle_path, w.bundle_manifest
    workers.add(w, name, queues, slots, gpus)


@task(help=dict(COMMON_HELP, main="the main VM (as for fab -H)",
                wait="seconds to wait for running tasks to finish (default 600)"))
@boundary("remove-worker")
def remove_worker(c, main="", wait=600, config=None, verbose=False):
    """Drain the -H worker (running tasks finish), stop it, forget it on the main VM.

    A worker that cannot be reached is only forgotten: its running tasks are
    retried elsewhere by Airflow."""
    workers.remove(_worker_session(c, "remove-worker", main, config, verbose), wait)


def _worker_session(c, task_name, main, config, verbose) -> Session:
    """The -H worker VM's session (not connected yet), with the main VM's."""
    require_host(c, task_name)
    out = Out(verbose)
    m = workers.main_session(c, main, out, config)
    w = Session(Remote(c, out), m.o, out, role="worker")
    w.main = m
    return w
