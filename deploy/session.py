"""The session layer: reaching a VM and what is recorded on it.

A ``Session`` is one VM as a command sees it: the connection (``Remote``), the
options, the output, and what the deploy steps learn about the VM as they go
(facts, image ids, whether anything changed). It reads and writes the VM's
state files: the deploy record (state/deploy.json), the secrets, the worker
registry, the deploy lock. The deploy engine (deploy/steps.py) and every
command build on it; it imports nothing above it.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from contextlib import contextmanager

from . import bundle as bundle_mod
from . import commands as cmd
from . import config as config_mod
from . import stack
from .remote import DeployError, Out, Remote

DATA_GROUP = "metaflow"
DOCKER_ROOT = "/var/lib/docker"
# The worker VMs of this main VM (fab add-worker), in install_dir.
WORKERS_FILE = "state/workers.json"
DEPLOY_RECORD = "state/deploy.json"


class Session:
    def __init__(self, remote: Remote, o: config_mod.Options, out: Out, role="main"):
        self.r = remote
        self.o = o
        self.out = out
        self.role = role          # "main", or "worker" (compose/worker.yaml)
        self.facts = {}
        self.image_ids = {}
        self.changed = False
        self.workers = {}         # the main VM's worker registry (deploy/workers.py)
        self.record = {}          # the deploy record, once read (connect, state)
        # What a run of the deploy steps was given (deploy/steps.py).
        self.bundle_path = None   # an archive made by fab bundle, and its manifest
        self.bundle_manifest = None
        self.archive = None             # restore: the backup archive here, and its manifest
        self.archive_manifest = None
        self.keep_certificate = False   # restore: the backup's own certificate is in place
        self.always_smoke_test = False  # restore: prove the platform whatever the options say
        self.resume = False             # restore: runs in flight and schedules go live at once
        self.held = None                # restore: what it held back (deploy/runs.py)
        self.main = None                # worker: the main VM's session, and this worker's
        self.entry = None               # entry in its registry

    @property
    def dir(self):
        return self.o.install_dir

    @property
    def host(self):
        return self.r.host

    # -- what runs on this VM --------------------------------------------------

    def services(self):
        if self.role == "worker":
            return stack.services(self.o, files=["worker.yaml"])
        return stack.services(self.o, workers=bool(self.workers))

    def wanted_images(self):
        images = stack.images(self.o)
        if self.role == "worker":
            return {role: ref for role, ref in images.items() if role in ("airflow", "step")}
        return images

    def volumes(self):
        p = self.o.project
        return ["%s-postgres" % p, "%s-%s" % (p, self.o.object_store), "%s-metaflow-local" % p,
                "%s-code-cache" % p]

    # -- who we are on the VM ---------------------------------------------------

    def whoami(self):
        """Root directly, passwordless sudo, or sudo with the given password;
        anything else is refused before any change."""
        info = cmd.parse_facts(self.r.stdout(cmd.whoami(), as_root=False, what="checking the user"))
        self.r.user = info.get("user")
        sudo = info.get("sudo")
        if sudo == "root":
            self.r.sudo_mode = "root"
        elif sudo == "ok":
            self.r.sudo_mode = "sudo"
        elif self.r.c.config.sudo.password:
            self.r.sudo_mode = "fabric"
            self.r.run("true", what="sudo with the given password")
        else:
            found = {"password": "sudo asks for a password",
                     "missing": "sudo is not installed"}.get(sudo, "sudo is not allowed")
            raise DeployError(
                "preflight: expected root or passwordless sudo for user %s, found: %s "
                "(nothing was changed)" % (self.r.user, found),
                "deploy as root, give %s passwordless sudo (\"%s ALL=(ALL) NOPASSWD:ALL\" in "
                "/etc/sudoers.d/%s), or add --prompt-for-sudo-password"
                % (self.r.user, self.r.user, self.r.user))

    # -- state on the VM -----------------------------------------------------------

    def use_bundle(self, path):
        if path:
            self.bundle_path, self.bundle_manifest = path, bundle_mod.read_manifest(path)

    def state(self):
        """The record of the last deploy; from here on the session uses the
        options it was deployed with (not this workstation's options file,
        which only says where to look: install_dir)."""
        text = self.r.stdout(cmd.read_file("%s/%s" % (self.dir, DEPLOY_RECORD)),
                             what="reading the deploy record")
        if not text.strip():
            raise DeployError("no deployment found in %s on %s" % (self.dir, self.host),
                              "deploy first: fab -H %s deploy (or give --config with its "
                              "install_dir)" % self.host)
        st = self.record = json.loads(text)
        if st.get("options"):
            self.o = config_mod.from_description(st["options"])
        return st

    def has_record(self):
        return bool(self.r.stdout(cmd.read_file("%s/%s" % (self.dir, DEPLOY_RECORD)),
                                  what="looking for a deploy record").strip())

    def write_record(self, state: dict):
        self.r.run(cmd.write_file("%s/%s" % (self.dir, DEPLOY_RECORD),
                                  json.dumps(state, indent=2, sort_keys=True) + "\n", "0644"),
                   what="recording the deploy")

    def secrets(self):
        text = self.r.stdout(cmd.read_file(self.dir + "/secrets.env"), what="reading the secrets")
        values = dict(line.split("=", 1) for line in text.splitlines()
                      if "=" in line and not line.startswith("#"))
        if not values:
            raise DeployError("no secrets in %s/secrets.env" % self.dir, "deploy first")
        return values

    def read_workers(self):
        text = self.r.stdout(cmd.read_file("%s/%s" % (self.dir, WORKERS_FILE)),
                             what="reading the worker registry").strip()
        self.workers = json.loads(text)["workers"] if text else {}
        return self.workers

    def write_workers(self, workers):
        text = json.dumps({"workers": workers}, indent=2, sort_keys=True) + "\n"
        self.r.run(cmd.write_file("%s/%s" % (self.dir, WORKERS_FILE), text, "0644"),
                   what="writing the worker registry")
        self.workers = workers

    @contextmanager
    def lock(self, what):
        """One deploy-like command at a time per VM; the holder is named so a
        second one can say who holds it."""
        holder = "%s by %s@%s (pid %d) since %s" % (
            what, local_user(), socket.gethostname(), os.getpid(),
            time.strftime("%Y-%m-%d %H:%M:%S"))
        res = self.r.stdout(cmd.acquire_lock(self.o.project, holder), what="taking the deploy lock")
        if not res.startswith("acquired"):
            raise DeployError("another deploy holds the lock on the VM: %s"
                              % res.strip()[len("held: "):],
                              "wait for it to finish; if none is running, release the lock with: "
                              "fab -H %s unlock" % self.host)
        try:
            yield
        finally:
            try:
                self.r.run(cmd.release_lock(self.o.project), what="releasing the deploy lock")
            except Exception:  # noqa: BLE001 - the original error matters more
                self.out.warn("could not release the deploy lock; fab -H %s unlock" % self.host)


# ---------------------------------------------------------------------------
# Opening a session from a Fabric task's arguments
# ---------------------------------------------------------------------------


def require_host(c, task_name):
    if not getattr(c, "host", None):
        raise DeployError("`fab %s` needs the VM: give it with -H user@host" % task_name,
                          "e.g. fab -H root@vm.example.com %s" % task_name)


def options(c, config, flags=None):
    host = getattr(c, "host", None)
    return config_mod.load(config, {k: v for k, v in (flags or {}).items() if v is not None},
                           host=host)


def set_flags(set_values):
    """--set KEY=VALUE (repeatable) -> {KEY: VALUE}."""
    flags = {}
    for item in set_values or ():
        if "=" not in item:
            raise config_mod.ConfigError("--set %s: expected KEY=VALUE (e.g. --set "
                                         "airflow.parallelism=4)" % item)
        k, v = item.split("=", 1)
        flags[k.strip()] = v
    return flags


def connect(c, task_name, verbose, config=None, flags=None, deployed=True) -> Session:
    """A session on the -H VM as the login user found it: sudo mode known
    and, when *deployed*, the options of its deploy record."""
    require_host(c, task_name)
    out = Out(verbose)
    s = Session(Remote(c, out), options(c, config, flags), out)
    s.whoami()
    if deployed:
        s.state()
    return s


# ---------------------------------------------------------------------------
# Small shared helpers
# ---------------------------------------------------------------------------


def version_tuple(text):
    nums = []
    for part in (text or "").lstrip("v").split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        nums.append(int(digits))
    return tuple(nums)


def duration(seconds):
    seconds = int(round(seconds))
    return "%dm%02ds" % divmod(seconds, 60) if seconds >= 60 else "%ds" % seconds


def local_user():
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name is not an error
        return "?"
