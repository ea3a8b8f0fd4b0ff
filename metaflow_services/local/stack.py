"""The local stack as one thing with a folder: `metaflow-services local up`
starts PostgreSQL, SeaweedFS (S3), Airflow 3 and optionally the Metaflow
metadata service on loopback in the background, `status` says what runs and
answers, `down` stops what `up` started.

The folder holds everything: stack.json (ports and options, chosen at the
first `up` and kept), secrets.json (0600: generated keys and passwords),
env.sh (0600: what a Metaflow client exports), run/*.pid, and each service's
data and log under its own subfolder.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import secrets as secrets_mod
import subprocess
from pathlib import Path

import requests

from .airflow_server import Airflow, AirflowAPI, fernet_key
from .metadata import IMAGE as METADATA_IMAGE
from .metadata import LABEL, MetaflowService
from .services import (LocalStackError, Postgres, Process, SeaweedFS, binary, free_ports,
                       metaflow_env, port_free, shared_dir, worker_env)

# Ports users type; the others (SeaweedFS master, volume, filer, gRPC) are free
# ones chosen at the first `up`. 0 means "any free port".
DEFAULT_PORTS = {"airflow": 8080, "s3": 8333, "postgres": 5433, "metadata": 8180,
                 "ui-backend": 8083}
PORT_OPTIONS = {"airflow": "--airflow-port", "s3": "--s3-port", "postgres": "--postgres-port",
                "metadata": "--metadata-port", "ui-backend": "--ui-backend-port"}
AIRFLOW_PROCS = ("api-server", "dag-processor", "scheduler")
STEP_IMAGE = "mfs-step:test"
WEED_ROLES = ("master", "volume", "filer")
INTERNAL_PORTS = tuple("weed-" + r for r in WEED_ROLES) + tuple(
    "weed-%s-grpc" % r for r in WEED_ROLES + ("s3",))


def default_dir():
    if os.environ.get("MFS_LOCAL_DIR"):
        return Path(os.environ["MFS_LOCAL_DIR"])
    if os.geteuid() == 0:  # PostgreSQL runs as `postgres`: not under /root (0700)
        return Path("/var/lib/metaflow-services/local")
    return Path.home() / ".metaflow-services" / "local"


def _write_private(path: Path, text):
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class LocalStack:
    def __init__(self, folder):
        self.dir = Path(folder).expanduser().resolve()
        self.run_dir = self.dir / "run"
        self.settings = _read_json(self.dir / "stack.json")
        self.secrets = _read_json(self.dir / "secrets.json")
        tag = hashlib.sha1(str(self.dir).encode()).hexdigest()[:8]
        self.containers = {role: "mfs-local-%s-%s" % (tag, role)
                           for role in MetaflowService.ROLES}

    @property
    def env_file(self):
        return self.dir / "env.sh"

    @property
    def password_file(self):
        return self.dir / "airflow" / "passwords.json"

    @property
    def airflow_url(self):
        return "http://127.0.0.1:%d" % self.settings["ports"]["airflow"]

    def api(self):
        """A client of the running stack's Airflow REST API (as admin)."""
        return AirflowAPI(self.airflow_url, Airflow.USER, self.secrets["airflow_password"])

    # -- configuration ---------------------------------------------------

    def configure(self, ports=None, executor=None, step_image=None, metadata_service=None,
                  metadata_image=None, user=None):
        """Settings for this `up`: what is given, else what the folder keeps,
        else the defaults. Generates the secrets the first time."""
        s = self.settings
        kept = s.get("ports", {})
        free = iter(free_ports(len(DEFAULT_PORTS) + len(INTERNAL_PORTS)))
        chosen = {}
        for name, default in DEFAULT_PORTS.items():
            given = (ports or {}).get(name)
            chosen[name] = (given if given is not None else kept.get(name, default)) or next(free)
        for key in INTERNAL_PORTS:  # kept while free, else another free one
            chosen[key] = kept[key] if kept.get(key) and port_free(kept[key]) else next(free)
        s["ports"] = chosen
        s["executor"] = executor or s.get("executor") or "subprocess"
        s["step_image"] = step_image or s.get("step_image") or STEP_IMAGE
        if metadata_service is not None:
            s["metadata_service"] = bool(metadata_service)
        s.setdefault("metadata_service", False)
        s["metadata_image"] = metadata_image or s.get("metadata_image") or METADATA_IMAGE
        s["user"] = user or s.get("user") or _default_user()
        for key, make in (("airflow_password", lambda: secrets_mod.token_urlsafe(12)),
                          ("jwt_secret", lambda: secrets_mod.token_urlsafe(32)),
                          ("secret_key", lambda: secrets_mod.token_urlsafe(24)),
                          ("s3_access_key", lambda: "mfs-local-" + secrets_mod.token_hex(4)),
                          ("s3_secret_key", lambda: secrets_mod.token_hex(20)),
                          ("metadata_db_password", lambda: secrets_mod.token_urlsafe(16)),
                          ("fernet_key", fernet_key)):
            self.secrets.setdefault(key, make())

    def save(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)  # PostgreSQL (its own user) and step containers enter it
        (self.dir / "stack.json").write_text(json.dumps(self.settings, indent=1, sort_keys=True))
        _write_private(self.dir / "secrets.json", json.dumps(self.secrets, indent=1))

    # -- the services, built from the settings ---------------------------

    @property
    def mflocal(self):
        return self.dir / "mflocal"

    def postgres(self):
        return Postgres(self.dir, port=self.settings["ports"]["postgres"])

    def seaweedfs(self):
        p = self.settings["ports"]
        return SeaweedFS(self.dir, ports={r: p["weed-" + r] for r in WEED_ROLES} | {"s3": p["s3"]},
                         grpc={r: p["weed-%s-grpc" % r] for r in WEED_ROLES + ("s3",)},
                         access_key=self.secrets["s3_access_key"],
                         secret_key=self.secrets["s3_secret_key"])

    def metadata(self, postgres=None, seaweedfs=None):
        p = self.settings["ports"]
        return MetaflowService(self.dir, postgres or self.postgres(), seaweedfs or self.seaweedfs(),
                               image=self.settings["metadata_image"], port=p["metadata"],
                               ui_port=p["ui-backend"], names=self.containers,
                               labels={LABEL: str(self.dir)},
                               db_password=self.secrets["metadata_db_password"])

    def client_env(self):
        """What a Metaflow client (and every task) needs to use this stack."""
        env = metaflow_env(self.seaweedfs(), self.mflocal, self.settings["user"])
        if self.settings["metadata_service"]:
            env.update(METAFLOW_DEFAULT_METADATA="service",
                       METAFLOW_SERVICE_URL="http://127.0.0.1:%d" % self.settings["ports"]["metadata"])
        env["MFS_DAGS_FOLDER"] = str(self.dir / "dags")  # `metaflow-services compile` writes there
        return env

    def airflow(self, postgres=None):
        s = self.settings
        return Airflow(self.dir, postgres or self.postgres(), self.client_env(),
                       max_map_length=1024, port=s["ports"]["airflow"],
                       size_default_pool=True,
                       password=self.secrets["airflow_password"],
                       keys={k: self.secrets[k] for k in ("jwt_secret", "secret_key",
                                                            "fernet_key")})

    def worker_env(self):
        extra = {}
        if self.settings["executor"] == "docker":
            extra["MFS_PIP_CERT"] = os.environ.get("SSL_CERT_FILE",
                                                   "/etc/ssl/certs/ca-certificates.crt")
        return worker_env(self.settings["executor"], self.dir, self.mflocal,
                          self.settings["step_image"], **extra)

    # -- what runs -------------------------------------------------------

    def pidfile(self, name):
        return self.run_dir / ("%s.pid" % name)

    def processes(self):
        """name -> (Process or None): the processes `up` started that still run."""
        weed = Process.attach("seaweedfs", self.pidfile("seaweedfs"), self.dir / "seaweedfs")
        if weed:
            weed.stop_timeout = SeaweedFS.STOP_TIMEOUT
        return {"seaweedfs": weed,
                **{"airflow-" + n: Process.attach(n, self.pidfile("airflow-" + n),
                                                  self.dir / "airflow") for n in AIRFLOW_PROCS}}

    def running(self):
        """Names of this stack's parts that run now."""
        names = [n for n, p in self.processes().items() if p]
        if self.settings and self.postgres().pid():
            names.append("postgres")
        if self.settings.get("metadata_service") and shutil.which("docker"):
            svc = self.metadata()
            names += [r for r in ("metadata", "ui-backend") if svc.running(r)]
        return names

    def expected(self):
        names = ["postgres", "seaweedfs"] + ["airflow-" + n for n in AIRFLOW_PROCS]
        return names + (["metadata", "ui-backend"] if self.settings.get("metadata_service") else [])

    # -- checks before anything starts -----------------------------------

    def preflight(self):
        """Binaries, ports and permissions; raises before anything starts."""
        self.postgres().check()
        self.seaweedfs().argv()  # finds weed
        binary("airflow", Airflow.INSTALL)
        if self.settings["metadata_service"]:
            self.metadata().check()
        if self.settings["executor"] == "docker":
            binary("docker", "Docker (Debian: apt-get install docker.io)")
        for name, port in sorted(self.settings["ports"].items(), key=lambda kv: kv[1]):
            if name in ("metadata", "ui-backend") and not self.settings["metadata_service"]:
                continue
            if not port_free(port):
                raise LocalStackError(
                    "port %d (%s) is already in use on 127.0.0.1" % (port, _label(name)),
                    "stop what listens there or pass %s PORT (0: any free port)"
                    % PORT_OPTIONS.get(name, "--%s-port" % name))

    # -- up / down -------------------------------------------------------

    def start(self, progress):
        """Starts every part in order; on failure stops what started."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        shared_dir(self.mflocal)
        self._check_postgres_can_enter()
        s, p = self.settings, self.settings["ports"]
        try:
            with progress("PostgreSQL on 127.0.0.1:%d" % p["postgres"]):
                pg = self.postgres()
                _service_step(pg.start, "PostgreSQL", pg.dir / "postgres.log")
            with progress("SeaweedFS (S3) on http://127.0.0.1:%d" % p["s3"]):
                s3 = self.seaweedfs()
                _service_step(s3.start, "SeaweedFS", s3.dir / "seaweedfs.log")
                s3.proc.write_pidfile(self.pidfile("seaweedfs"))
            if s["metadata_service"]:
                with progress("Metaflow metadata service on http://127.0.0.1:%d and UI backend "
                              "on :%d (containers of %s)" % (p["metadata"], p["ui-backend"],
                                                             s["metadata_image"])):
                    svc = self.metadata(pg, s3)
                    _service_step(svc.start, "the metadata service", svc.dir)
            with progress("Airflow 3 on http://127.0.0.1:%d: database migration, api-server, "
                          "scheduler, dag-processor (about a minute)" % p["airflow"]):
                af = self.airflow(pg)
                _service_step(lambda: af.start(self.worker_env(), pids=self.run_dir), "Airflow",
                              af.home)
        except BaseException:
            self.stop(lambda msg: None)
            raise
        self.write_env_file()

    def _check_postgres_can_enter(self):
        if os.geteuid() != 0:
            return
        self.postgres().check()
        ok = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(self.dir)])
        if ok.returncode != 0:
            raise LocalStackError(
                "PostgreSQL runs as the user postgres, which cannot enter %s" % self.dir,
                "choose a --dir whose parent folders others may enter (e.g. under /var/lib "
                "or /tmp)")

    def write_env_file(self):
        lines = ["# Source this file to use the local stack: . %s" % self.env_file]
        lines += ["export %s=%s" % (k, _shell_quote(v)) for k, v in sorted(self.client_env().items())]
        _write_private(self.env_file, "\n".join(lines) + "\n")

    def stop(self, say):
        """Stops everything this folder's stack runs; says what it stopped."""
        procs = self.processes()
        for name in ["airflow-scheduler", "airflow-dag-processor", "airflow-api-server"]:
            _stop_process(procs.get(name), name, self.pidfile(name), say)
        if self.settings and shutil.which("docker"):
            svc = self.metadata()
            present = [r for r in svc.ROLES if _container_exists(svc.names[r])]
            if present:
                svc.dir.mkdir(parents=True, exist_ok=True)
                svc.started = [svc.names[r] for r in present]
                svc.stop()
                say("stopped the metadata service and UI backend (containers removed)")
        _stop_process(procs.get("seaweedfs"), "seaweedfs", self.pidfile("seaweedfs"), say)
        if self.settings:
            pg = self.postgres()
            if pg.pid():
                pg.stop()
                say("stopped postgres")

    # -- status ----------------------------------------------------------

    def status(self):
        """One row per part: name, pid or container, running, answers, address."""
        p, procs = self.settings.get("ports", {}), self.processes()
        health = _airflow_health(p.get("airflow"))
        rows = []
        pg = self.postgres() if self.settings else None
        pid = pg.pid() if pg else None
        rows.append(_row("postgres", pid, pid is not None, bool(pid) and pg.ready(),
                         "127.0.0.1:%s" % p.get("postgres")))
        s3_url = "http://127.0.0.1:%s" % p.get("s3")
        proc = procs["seaweedfs"]
        rows.append(_row("seaweedfs", proc and proc.pid, bool(proc),
                         bool(proc) and _answers(s3_url), s3_url))
        af_url = "http://127.0.0.1:%s" % p.get("airflow")
        for name in AIRFLOW_PROCS:
            proc = procs["airflow-" + name]
            key = {"api-server": "metadatabase", "dag-processor": "dag_processor"}.get(name, name)
            ok = (health.get(key) or {}).get("status") == "healthy"
            rows.append(_row("airflow " + name, proc and proc.pid, bool(proc), bool(proc) and ok,
                             af_url if name == "api-server" else ""))
        if self.settings.get("metadata_service"):
            svc = self.metadata()
            for role, url in (("metadata", svc.url), ("ui-backend", svc.ui_url + "/api")):
                up = svc.running(role)
                rows.append(_row(role, svc.names[role] if up else None, up, up and _quiet(svc.pings, role), url))
        return rows


def _default_user():
    user = os.environ.get("METAFLOW_USER") or getpass.getuser()
    return "metaflow-services" if user == "root" else user  # Metaflow refuses root


def _label(name):
    return {"airflow": "Airflow", "s3": "SeaweedFS S3", "postgres": "PostgreSQL",
            "metadata": "metadata service", "ui-backend": "UI backend"}.get(
                name, "SeaweedFS " + name.replace("weed-", ""))


def _shell_quote(value):
    import shlex

    return shlex.quote(str(value))


def _service_step(start, what, logs):
    """Runs one start; a timeout or crash becomes one line naming the logs."""
    try:
        start()
    except LocalStackError:
        raise
    except (TimeoutError, RuntimeError, subprocess.CalledProcessError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LocalStackError("%s did not start: %s" % (what, first),
                              "read the logs in %s" % logs) from e


def _stop_process(proc, name, pidfile, say):
    if proc:
        proc.stop()
        say("stopped %s (pid %d)" % (name, proc.pid))
    try:
        pidfile.unlink()
    except FileNotFoundError:
        pass


def _container_exists(name):
    return subprocess.run(["docker", "inspect", name], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def _airflow_health(port):
    if not port:
        return {}
    try:
        r = requests.get("http://127.0.0.1:%s/api/v2/monitor/health" % port, timeout=5)
        return r.json() if r.status_code == 200 else {}
    except (requests.RequestException, ValueError):
        return {}


def _answers(url):
    try:
        return requests.get(url, timeout=5).status_code < 500
    except requests.RequestException:
        return False


def _quiet(check, *args):
    try:
        return bool(check(*args))
    except Exception:
        return False


def _row(name, pid, running, answers, address):
    return {"name": name, "pid": pid or None, "running": bool(running),
            "answers": bool(answers), "address": address}
