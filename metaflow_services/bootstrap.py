"""Runs one Metaflow task where the executor put it (a container or a
subprocess of the Airflow worker).

This file is executed as ``python3 -c <this source>`` so that any image with
Python 3 and boto3 can run steps; it must only use the standard library and
boto3. Its input is the JSON in ``MFS_TASK``. It

1. fetches the flow's code package once per host (cached by content hash,
   under a lock, extracted atomically),
2. runs Metaflow's ``init`` (start step only, once per run) and ``step``
   commands with stdout/stderr captured in Metaflow's log format and uploaded
   with Metaflow's own ``save_logs`` (so the Metaflow client and UI show them),
   while echoing the output for the Airflow task log,
3. enforces a hard deadline and forwards SIGTERM to the whole step, and
4. prints one result line (``RESULT_MARKER`` + JSON) for the orchestrator.
"""

import datetime
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid

RESULT_MARKER = "\x1eMFS-RESULT "
# Exit code when the hard deadline killed the step (as coreutils `timeout`).
DEADLINE_EXIT = 124


def main():
    task = json.loads(os.environ.pop("MFS_TASK"))
    t0 = time.time()
    # Counted from the start of each Metaflow command, not of this program:
    # a slow package download or a loaded host must not eat the step's time.
    deadline = task.get("deadline_seconds")
    pkg_root = ensure_package(task["package"], task["cache_dir"])
    workdir = tempfile.mkdtemp(prefix="mfs-task-")
    env = dict(os.environ)
    for k, v in task["package"]["post_extract_env"].items():
        v = v.replace("{root}", pkg_root)
        if k.endswith(":"):
            env[k[:-1]] = v
        else:
            env[k] = v + (":" + env[k] if env.get(k) else "")
    env["PYTHONUNBUFFERED"] = "1"
    result_file = os.path.join(workdir, "result.json")
    env["MFS_RESULT_FILE"] = result_file

    logs = LogCapture(workdir, task["log"], env)
    runner = StepRunner(env, workdir, logs, deadline)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: runner.terminate(signum))

    python = sys.executable or "python3"
    flow_file = os.path.join(pkg_root, task["flow_file"])
    logs.system("Task %s attempt %s starting (%s, code package %s, setup %.2fs)."
                % (task["log"]["pathspec"], task["log"]["attempt"], task.get("where", "?"),
                   task["package"]["sha"][:12], time.time() - t0))
    logs.start_periodic_upload()
    rc = 0
    init = task.get("init")
    if init and not done_marker_exists(init["done_marker"]):
        rc = runner.run([python, flow_file] + init["args"], init.get("env") or {})
        if rc != 0:
            logs.system("Metaflow init failed with exit code %d." % rc)
    if rc == 0:
        rc = runner.run([python, flow_file] + task["step"], {})
    if runner.deadline_hit:
        logs.system("The step ran past its deadline (@timeout plus grace) and was "
                    "killed with its whole process group.")
        rc = DEADLINE_EXIT
    logs.stop_periodic_upload()
    logs.upload()

    result = {"exit_code": rc}
    if rc == 0 and os.path.exists(result_file):
        with open(result_file) as f:
            result.update(json.load(f))
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()
    shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(rc)


# ---------------------------------------------------------------------------
# Code package
# ---------------------------------------------------------------------------


def ensure_package(pkg, cache_dir):
    sha = pkg["sha"]
    dest = os.path.join(cache_dir, sha)
    marker = os.path.join(dest, ".mfs-complete")
    if os.path.exists(marker):
        return dest
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, sha + ".lock"), "a") as lock:
        # Concurrent tasks of the same flow (other containers on this host
        # share the cache) wait here and then reuse the extracted package.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(marker):
            return dest
        tmp = tempfile.mkdtemp(dir=cache_dir, prefix=sha + ".tmp-")
        try:
            blob = download(pkg["url"])
            got = hashlib.sha1(blob).hexdigest()
            if got != sha:
                raise SystemExit("Code package %s is corrupt (sha1 %s, expected %s)."
                                 % (pkg["url"], got, sha))
            archive = os.path.join(tmp, "job.tgz")
            with open(archive, "wb") as f:
                f.write(blob)
            root = os.path.join(tmp, "root")
            with tarfile.open(archive, "r:gz") as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(root, filter="data")
                else:
                    tar.extractall(root)
            open(os.path.join(root, ".mfs-complete"), "w").close()
            if os.path.isdir(dest):  # a crashed earlier extraction
                shutil.rmtree(dest, ignore_errors=True)
            os.rename(root, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _s3_client():
    import boto3

    endpoint = os.environ.get("METAFLOW_S3_ENDPOINT_URL")
    return boto3.client("s3", **({"endpoint_url": endpoint} if endpoint else {}))


def _split_s3(url):
    bucket, _, key = url[len("s3://"):].partition("/")
    return bucket, key


def download(url, attempts=5):
    if not url.startswith("s3://"):
        with open(url, "rb") as f:
            return f.read()
    bucket, key = _split_s3(url)
    delay = 1.0
    for i in range(attempts):
        try:
            return _s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as e:  # network blips while the object store restarts
            if i == attempts - 1:
                raise SystemExit("Cannot download the code package %s: %s" % (url, e))
            time.sleep(delay)
            delay *= 2


def done_marker_exists(url):
    """Whether Metaflow marked a task done (its `<attempt>.DONE.lock` object)."""
    if not url.startswith("s3://"):
        return os.path.exists(url)
    bucket, key = _split_s3(url)
    try:
        _s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except Exception as e:
        code = getattr(e, "response", {}).get("Error", {}).get("Code")
        if code in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


# ---------------------------------------------------------------------------
# Logs: Metaflow's mflog format, uploaded with Metaflow's own save_logs
# ---------------------------------------------------------------------------


def mflog_line(source, line):
    # Format of metaflow.mflog.mflog.decorate (version 0).
    ts = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return b"[MFLOG|0|%sZ|%s|%s]%s" % (ts.encode(), source, str(uuid.uuid4()).encode(), line)


class LogCapture:
    def __init__(self, workdir, log, env):
        self.paths = {
            "stdout": os.path.join(workdir, "mflog_stdout"),
            "stderr": os.path.join(workdir, "mflog_stderr"),
        }
        self.files = {k: open(p, "ab", buffering=0) for k, p in self.paths.items()}
        self.lock = threading.Lock()
        self.save_env = dict(env)
        self.save_env.update({
            "MF_PATHSPEC": log["pathspec"],
            "MF_ATTEMPT": str(log["attempt"]),
            "MF_DATASTORE": log["datastore"],
            "MF_DATASTORE_ROOT": log["datastore_root"],
            "MFLOG_STDOUT": self.paths["stdout"],
            "MFLOG_STDERR": self.paths["stderr"],
        })
        self._stop = threading.Event()
        self._thread = None

    def write(self, stream, line):
        if not line.endswith(b"\n"):
            line += b"\n"
        with self.lock:
            self.files[stream].write(mflog_line(b"task", line))
        out = sys.stdout if stream == "stdout" else sys.stderr
        out.buffer.write(line)
        out.flush()

    def system(self, msg):
        self.write("stderr", ("[metaflow-services] " + msg).encode())

    def upload(self):
        proc = subprocess.run(
            [sys.executable or "python3", "-m", "metaflow.mflog.save_logs"],
            env=self.save_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        out = proc.stdout.decode("utf-8", "replace")
        if proc.returncode != 0 or "upload_failure" in out:
            sys.stderr.write("[metaflow-services] Uploading the task's logs failed:\n" + out)
            sys.stderr.flush()

    def start_periodic_upload(self):
        # Long steps: let the Metaflow UI show logs while the step runs. Short
        # steps only pay for the final upload.
        def loop():
            delay = 15.0
            while not self._stop.wait(delay):
                self.upload()
                delay = min(delay * 1.5, 120.0)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop_periodic_upload(self):
        self._stop.set()
        if self._thread:
            self._thread.join()


# ---------------------------------------------------------------------------
# Running Metaflow's commands
# ---------------------------------------------------------------------------


class StepRunner:
    def __init__(self, env, workdir, logs, deadline_seconds):
        self.env = env
        self.workdir = workdir
        self.logs = logs
        self.deadline_seconds = deadline_seconds
        self.deadline = None
        self.proc = None
        self.deadline_hit = False
        self.terminated = False

    def run(self, argv, extra_env):
        if self.terminated:
            return 143
        env = dict(self.env)
        env.update(extra_env)
        if self.deadline_seconds:
            self.deadline = time.time() + self.deadline_seconds
        # A session of its own, so @timeout/cancel can kill everything the
        # step started (subprocesses, multiprocessing pools).
        self.proc = subprocess.Popen(
            argv, env=env, cwd=self.workdir, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, "stderr"), daemon=True),
        ]
        for r in readers:
            r.start()
        while True:
            try:
                timeout = (None if self.deadline is None or self.deadline_hit
                           else max(0.0, self.deadline - time.time()))
                rc = self.proc.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                self.deadline_hit = True
                self._kill_group()
        # Whatever the step started and left running (daemons, a child that
        # outlived a @timeout) belongs to the step: stop it with the step.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for r in readers:
            r.join(timeout=10)
        return 128 - rc if rc < 0 else rc  # killed by a signal: shell convention

    def _pump(self, pipe, stream):
        for line in iter(pipe.readline, b""):
            self.logs.write(stream, line)

    def _kill_group(self, grace=10):
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def terminate(self, signum):
        self.terminated = True
        self.logs.system("Received signal %d: stopping the step." % signum)
        threading.Thread(target=self._kill_group, daemon=True).start()


if __name__ == "__main__":
    main()
