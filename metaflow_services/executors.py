"""Where a Metaflow task runs: a Docker container per task, or a subprocess of
the Airflow worker.

Both executors run the same program, ``bootstrap.py`` (as ``python -c``), with
the same environment; they differ only in isolation. ``run`` blocks, feeds
every output line to a callback and returns the exit code; ``kill_all`` (called
when Airflow cancels or times out the task) stops everything still running.
A step's platform secrets (@secrets) reach it as a file only its user can
read (MFS_SECRETS_FILE), written before the step starts and gone with the
container, or after the subprocess.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigurationError, Settings
from .errors import ServicesError
from .platform_secrets import (CONTAINER_DIR, CONTAINER_FILE, FILE_ENV as SECRETS_FILE_ENV,
                               file_content)

from .warm import BOOTSTRAP_CODE, BOOTSTRAP_ENV

# One program: the warm process's code first (what it changes in Metaflow,
# then the process), then the bootstrap that uses it.
BOOTSTRAP_PARTS = ("warm_tuning.py", "warm.py", "bootstrap.py")
BOOTSTRAP_SOURCE = "\n".join(Path(__file__).with_name(n).read_text() for n in BOOTSTRAP_PARTS)
TASK_FILE_ENV = "MFS_TASK_FILE"
# In the step container: written before it starts, gone with it.
TASK_FILE = CONTAINER_DIR + "/task.json"


@dataclass
class Launch:
    name: str                      # unique per Airflow task instance (container name)
    env: dict                      # the tasks' environment
    job: bytes                     # the bootstrap's input (MFS_TASK_FILE): JSON
    image: str | None = None
    resources: dict | None = None  # @resources: cpu, memory (MB), gpu, shared_memory (MB)
    labels: dict = field(default_factory=dict)
    # {name: {VAR: value}} from @secrets: a private file, never the environment.
    secrets: dict = field(default_factory=dict)


class ExecutorError(ServicesError):
    """The Docker engine failed a step's container (pull, start, wait)."""


def make_executor(settings: Settings, log):
    if settings.executor == "docker":
        return DockerExecutor(settings, log)
    return SubprocessExecutor(settings, log)


class SubprocessExecutor:
    """Runs the task as a child of the Airflow worker process. No isolation and
    no resource limits: @resources is reported, not enforced."""

    name = "subprocess"

    def __init__(self, settings: Settings, log):
        self.settings = settings
        self.log = log
        self._procs = {}
        self._lock = threading.Lock()

    def describe(self, launch):
        return "subprocess on the Airflow worker"

    def run(self, launch: Launch, on_line) -> int:
        if launch.resources:
            self.log.info("@resources %s is not enforced by the subprocess executor "
                          "(use MFS_EXECUTOR=docker for limits).", launch.resources)
        env = dict(launch.env, **{BOOTSTRAP_ENV: BOOTSTRAP_SOURCE})
        for k in ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "SSL_CERT_FILE",
                  "REQUESTS_CA_BUNDLE"):
            if k in os.environ and k not in env:
                env[k] = os.environ[k]
        files = {"task.json": launch.job}
        if launch.secrets:
            files["secrets.json"] = file_content(launch.secrets)
        with _private_files(files) as folder:
            env[TASK_FILE_ENV] = os.path.join(folder, "task.json")
            if launch.secrets:
                env[SECRETS_FILE_ENV] = os.path.join(folder, "secrets.json")
            return self._run(launch, env, on_line)

    def _run(self, launch, env, on_line):
        proc = subprocess.Popen(
            [sys.executable, "-c", BOOTSTRAP_CODE],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        with self._lock:
            self._procs[launch.name] = proc
        try:
            for raw in iter(proc.stdout.readline, b""):
                on_line(raw.decode("utf-8", "replace").rstrip("\n"))
            return proc.wait()
        finally:
            with self._lock:
                self._procs.pop(launch.name, None)

    def kill_all(self):
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            # The bootstrap forwards SIGTERM to the step's own process group.
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@contextlib.contextmanager
def _private_files(files):
    """A 0700 folder of 0600 files ({name: bytes}: the task's input and its
    secrets), removed afterwards whatever happens."""
    folder = tempfile.mkdtemp(prefix="mfs-task-")
    try:
        for name, data in files.items():
            fd = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def container_files(launch, user=None) -> bytes:
    """A tar for docker's put_archive of CONTAINER_DIR: the task's input and
    its secrets, owned by the step's user (MFS_DOCKER_USER uid[:gid]) and
    readable by it alone."""
    uid, gid = 0, 0
    if user:
        parts = str(user).split(":")
        if parts[0].isdigit():
            uid = int(parts[0])
            gid = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    files = {TASK_FILE: launch.job}
    if launch.secrets:
        files[CONTAINER_FILE] = file_content(launch.secrets)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        folder = tarfile.TarInfo(CONTAINER_DIR.lstrip("/"))
        folder.type, folder.mode, folder.uid, folder.gid = tarfile.DIRTYPE, 0o700, uid, gid
        tar.addfile(folder)
        for path, data in files.items():
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode, info.uid, info.gid = len(data), 0o400, uid, gid
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _die_with_parent():
    # If the Airflow task process is SIGKILLed, take the bootstrap with it
    # (it then stops the step's process group).
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class DockerExecutor:
    """One container per task, removed afterwards. The code-package cache is a
    Docker volume (or host path) shared by all step containers."""

    name = "docker"

    def __init__(self, settings: Settings, log):
        import docker  # imported here: parse time and the subprocess executor don't need it

        self.settings = settings
        self.log = log
        try:
            self.client = docker.from_env(timeout=120)
            self.client.ping()
        except Exception as e:
            raise ConfigurationError(
                "MFS_EXECUTOR=docker, but the Docker engine is not reachable from the "
                "Airflow worker (%s). Mount the Docker socket into the worker or use "
                "MFS_EXECUTOR=subprocess." % e
            )
        self._containers = {}
        self._lock = threading.Lock()

    def describe(self, launch):
        return "docker container %s (image %s)" % (launch.name, launch.image)

    def _ensure_image(self, image):
        import docker.errors

        if self.settings.docker_pull == "always":
            self.client.images.pull(image)
            return
        try:
            self.client.images.get(image)
        except docker.errors.ImageNotFound:
            if self.settings.docker_pull == "never":
                raise ExecutorError(
                    "The step image %s is not on this host and MFS_DOCKER_PULL=never. "
                    "Load it (docker load) or build it first." % image)
            self.log.info("Pulling the step image %s ...", image)
            try:
                self.client.images.pull(image)
            except docker.errors.APIError as e:
                raise ExecutorError("Cannot pull the step image %s: %s" % (image, e))

    def run(self, launch: Launch, on_line) -> int:
        import docker.errors
        from docker.types import DeviceRequest

        if not launch.image:
            raise ConfigurationError(
                "No container image for this step: set MFS_STEP_IMAGE on the Airflow "
                "worker, or compile the flow with --image/--step-image.")
        self._ensure_image(launch.image)
        s = self.settings
        volumes = {s.docker_code_cache: {"bind": s.code_cache_dir, "mode": "rw"}}
        for v in s.docker_volumes:
            parts = v.split(":")
            if len(parts) not in (2, 3):
                raise ConfigurationError(
                    "MFS_DOCKER_VOLUMES entry %r: expected SOURCE:TARGET[:ro|rw]." % v)
            volumes[parts[0]] = {"bind": parts[1], "mode": parts[2] if len(parts) == 3 else "rw"}
        kwargs = dict(
            image=launch.image,
            command=[s.python, "-c", BOOTSTRAP_CODE],
            name=launch.name,
            environment=dict(launch.env, **{BOOTSTRAP_ENV: BOOTSTRAP_SOURCE, TASK_FILE_ENV: TASK_FILE},
                             **({SECRETS_FILE_ENV: CONTAINER_FILE} if launch.secrets else {})),
            labels=dict(launch.labels, **{"metaflow-services": "step"}),
            volumes=volumes,
            working_dir="/tmp",
            detach=True,
            stop_signal="SIGTERM",
        )
        if s.docker_network in ("host", "none"):
            kwargs["network_mode"] = s.docker_network
        elif s.docker_network:
            kwargs["network"] = s.docker_network
        if s.docker_user:
            kwargs["user"] = s.docker_user
        r = launch.resources or {}
        if r.get("cpu"):
            kwargs["nano_cpus"] = int(float(r["cpu"]) * 1e9)
        if r.get("memory"):
            kwargs["mem_limit"] = "%dm" % int(r["memory"])
            kwargs["memswap_limit"] = "%dm" % int(r["memory"])
        if r.get("shared_memory"):
            kwargs["shm_size"] = "%dm" % int(r["shared_memory"])
        if r.get("gpu"):
            kwargs["device_requests"] = [DeviceRequest(count=int(r["gpu"]), capabilities=[["gpu"]])]

        self._remove_leftover(launch.name)
        container = self.client.containers.create(**kwargs)
        with self._lock:
            self._containers[launch.name] = container
        try:
            # Into the container's own layer: removed with it.
            container.put_archive("/", container_files(launch, s.docker_user))
            container.start()
            buf = b""
            for chunk in container.logs(stream=True, follow=True):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    on_line(line.decode("utf-8", "replace"))
            if buf:
                on_line(buf.decode("utf-8", "replace"))
            status = container.wait()
            code = int(status.get("StatusCode", 1))
            if code == 137:
                container.reload()
                if container.attrs.get("State", {}).get("OOMKilled"):
                    on_line("[metaflow-services] The step's container ran out of memory "
                            "(limit %s MB from @resources(memory=...))." % r.get("memory"))
            return code
        finally:
            with self._lock:
                self._containers.pop(launch.name, None)
            try:
                container.remove(force=True)
            except docker.errors.APIError:
                pass

    def _remove_leftover(self, name):
        """A container of the same task left behind by a worker that died: the
        task is being retried, so the old one must not keep running."""
        import docker.errors

        try:
            old = self.client.containers.get(name)
        except docker.errors.NotFound:
            return
        self.log.warning("Removing container %s left over from an earlier attempt.", name)
        old.remove(force=True)

    def kill_all(self):
        with self._lock:
            containers = list(self._containers.values())
        for c in containers:
            # SIGTERM: the bootstrap stops every step it runs and saves their
            # logs. Airflow kills this process 5 s after it asked it to stop,
            # before run() could remove the container: remove it here.
            try:
                c.stop(timeout=3)
            except Exception:
                pass
            try:
                c.remove(force=True)
            except Exception:
                pass


_NAME_RE = re.compile(r"[^a-zA-Z0-9_.-]")


def container_name(*parts):
    name = "mfs-" + "-".join(_NAME_RE.sub("_", p) for p in parts)
    return name[:200]
