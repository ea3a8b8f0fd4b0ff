"""Runs the Metaflow tasks of one Airflow task instance where the executor
put them (a container or a subprocess of the Airflow worker).

This file is executed as ``python3 -c <this source>`` (together with
``warm.py``) so that any image with Python 3 and boto3 can run steps; it must
only use the standard library and boto3. Its input is the JSON file named by
``MFS_TASK_FILE``: what the tasks share (code package, attempt, deadline) and
one entry per Metaflow task (a step of a run, or a range of a foreach's
splits). It

1. fetches the flow's code package once per host (cached by content hash,
   under a lock, extracted atomically),
2. starts a warm process that has imported Metaflow and the flow's imports
   once (``warm.py``); each Metaflow command is a fork of it, in a session of
   its own, so a task costs no Python start or Metaflow import (where forking
   is not possible, each command is a new Python process, as before),
3. runs each task's Metaflow ``init`` (start step only, once per run) and
   ``step`` commands with stdout/stderr captured in Metaflow's log format and
   uploaded with Metaflow's own ``save_logs`` (so the Metaflow client and UI
   show every task's logs), echoing the output for the Airflow task log,
4. enforces each task's hard deadline and forwards SIGTERM to every running
   task,
5. on a retry, leaves alone the tasks that finished in an earlier attempt
   (their result is kept next to the task in the datastore), and
6. prints one result line per task (``RESULT_MARKER`` + JSON) for the
   orchestrator.
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

try:  # imported as a module; run as `python -c`, warm.py's source came first
    from .warm import BOOTSTRAP_ENV, WARM_FD_ENV, Launcher, warm_main
except ImportError:
    pass

RESULT_MARKER = "\x1eMFS-RESULT "
# Exit code when the hard deadline killed the step (as coreutils `timeout`).
DEADLINE_EXIT = 124
TASK_FILE_ENV = "MFS_TASK_FILE"
# Next to Metaflow's own files of the task: what a finished task told the
# orchestrator, so that a retried range of splits can skip it.
RESULT_OBJECT = "mfs-result.json"


def main():
    source = os.environ.pop(BOOTSTRAP_ENV, None)  # the warm process is a copy of this
    if os.environ.get(WARM_FD_ENV):
        return warm_main()
    with open(os.environ.pop(TASK_FILE_ENV)) as f:
        job = json.load(f)
    t0 = time.time()
    # Counted from the start of each Metaflow command, not of this program:
    # a slow package download or a loaded host must not eat the step's time.
    pkg_root = ensure_package(job["package"], job["cache_dir"])
    env = dict(os.environ)
    for k, v in job["package"]["post_extract_env"].items():
        v = v.replace("{root}", pkg_root)
        if k.endswith(":"):
            env[k[:-1]] = v
        else:
            env[k] = v + (":" + env[k] if env.get(k) else "")
    env["PYTHONUNBUFFERED"] = "1"
    flow_file = os.path.join(pkg_root, job["flow_file"])
    out = Output()
    launcher = Launcher(env, flow_file, source, out)
    batch = Batch(job, flow_file, launcher, out)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: batch.terminate(signum))
    out.line("[metaflow-services] %d Metaflow task(s), attempt %d (%s, code package %s, "
             "setup %.2fs, %s)." % (len(job["tasks"]), job["log"]["attempt"], job.get("where", "?"),
                                     job["package"]["sha"][:12], time.time() - t0,
                                     launcher.describe()))
    rc = batch.run()
    launcher.close()
    # Every line is out and every thread's work is done (the tasks' logs are
    # uploaded, their results written): end without the interpreter's
    # teardown, which the container's end would wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


class Output:
    """The Airflow task log: whole lines, from any thread."""

    def __init__(self):
        self.lock = threading.Lock()

    def line(self, text, stream=None):
        data = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
        if not data.endswith(b"\n"):
            data += b"\n"
        out = stream or sys.stdout
        with self.lock:
            out.buffer.write(data)
            out.flush()

    def result(self, result):
        self.line(RESULT_MARKER + json.dumps(result))


# ---------------------------------------------------------------------------
# The tasks of one Airflow task instance
# ---------------------------------------------------------------------------


class Batch:
    def __init__(self, job, flow_file, launcher, out):
        self.job = job
        self.flow_file = flow_file
        self.launcher = launcher
        self.out = out
        self.runners = set()
        self.lock = threading.Lock()
        self.terminated = False

    def run(self):
        tasks = self.job["tasks"]
        finished = self._finished_earlier(tasks)
        todo = [t for t in tasks if t["key"] not in finished]
        for task in tasks:
            if task["key"] in finished:
                self.out.line("[metaflow-services] %s finished in attempt %s: not run again."
                              % (task["pathspec"], finished[task["key"]].get("attempt")))
                self.out.result(dict(finished[task["key"]], key=task["key"], exit_code=0,
                                     skipped=True))
        codes = []
        parallel = max(1, min(int(self.job.get("parallel") or 1), len(todo) or 1))
        if parallel == 1:
            codes = [self.run_task(t) for t in todo]
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=parallel) as pool:
                codes = list(pool.map(self.run_task, todo))
        failed = [c for c in codes if c]
        return failed[0] if failed else 0

    def _finished_earlier(self, tasks):
        """{key: result} of the tasks a previous attempt finished. A range
        whose tasks all finished was cleared on purpose: it runs again."""
        if not self.job["log"]["attempt"]:
            return {}
        found = {}
        for t in tasks:
            url = t.get("result_url")
            blob = url and read_object(url)
            if blob is not None:
                found[t["key"]] = json.loads(blob)
        return {} if len(found) == len(tasks) else found

    def run_task(self, task):
        if self.terminated:
            return 143
        job = self.job
        workdir = tempfile.mkdtemp(prefix="mfs-task-")
        result_file = os.path.join(workdir, "result.json")
        log = dict(job["log"], pathspec=task["pathspec"])
        logs = LogCapture(workdir, log, self.launcher, self.out, task.get("label") or "")
        runner = StepRunner(self.launcher, workdir, logs, job.get("deadline_seconds"))
        with self.lock:
            self.runners.add(runner)
        logs.system("Task %s attempt %s starting (%s)." % (task["pathspec"], log["attempt"],
                                                          job.get("where", "?")))
        logs.start_periodic_upload()
        rc = 0
        init = task.get("init")
        if init and not done_marker_exists(init["done_marker"]):
            rc = runner.run([self.flow_file] + init["args"], init.get("env") or {})
            if rc != 0:
                logs.system("Metaflow init failed with exit code %d." % rc)
        if rc == 0:
            rc = runner.run([self.flow_file] + task["step"], {"MFS_RESULT_FILE": result_file})
        if runner.deadline_hit:
            logs.system("The step ran past its deadline (@timeout plus grace) and was "
                        "killed with its whole process group.")
            rc = DEADLINE_EXIT
        logs.stop_periodic_upload()
        logs.upload()
        with self.lock:
            self.runners.discard(runner)
        result = {"exit_code": rc}
        if rc == 0 and os.path.exists(result_file):
            with open(result_file) as f:
                result.update(json.load(f))
            if task.get("result_url"):
                write_object(task["result_url"], json.dumps(result).encode())
        self.out.result(dict(result, key=task["key"]))
        shutil.rmtree(workdir, ignore_errors=True)
        return rc

    def terminate(self, signum):
        self.terminated = True
        with self.lock:
            runners = list(self.runners)
        for runner in runners:
            runner.terminate(signum)


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


_S3 = []
_S3_LOCK = threading.Lock()


def _s3_client():
    with _S3_LOCK:  # one client for every task of the batch (making one takes ~0.1 s)
        if not _S3:
            import boto3

            endpoint = os.environ.get("METAFLOW_S3_ENDPOINT_URL")
            _S3.append(boto3.client("s3", **({"endpoint_url": endpoint} if endpoint else {})))
        return _S3[0]


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
        if _missing(e):
            return False
        raise



def read_object(url):
    """The object's bytes, or None when there is none."""
    if not url.startswith("s3://"):
        try:
            with open(url, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
    bucket, key = _split_s3(url)
    try:
        return _s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as e:
        if _missing(e):
            return None
        raise


def write_object(url, data):
    if not url.startswith("s3://"):
        os.makedirs(os.path.dirname(url), exist_ok=True)
        with open(url, "wb") as f:
            f.write(data)
        return
    bucket, key = _split_s3(url)
    _s3_client().put_object(Bucket=bucket, Key=key, Body=data)


def _missing(error):
    code = getattr(error, "response", {}).get("Error", {}).get("Code")
    return code in ("404", "NoSuchKey", "NotFound")


# ---------------------------------------------------------------------------
# Logs: Metaflow's mflog format, uploaded with Metaflow's own save_logs
# ---------------------------------------------------------------------------


def mflog_line(source, line):
    # Format of metaflow.mflog.mflog.decorate (version 0).
    ts = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return b"[MFLOG|0|%sZ|%s|%s]%s" % (ts.encode(), source, str(uuid.uuid4()).encode(), line)


class LogCapture:
    def __init__(self, workdir, log, launcher, out, label):
        self.paths = {
            "stdout": os.path.join(workdir, "mflog_stdout"),
            "stderr": os.path.join(workdir, "mflog_stderr"),
        }
        self.files = {k: open(p, "ab", buffering=0) for k, p in self.paths.items()}
        self.lock = threading.Lock()
        self.launcher = launcher
        self.out = out
        self.label = label.encode()
        self.workdir = workdir
        self.save_env = {
            "MF_PATHSPEC": log["pathspec"],
            "MF_ATTEMPT": str(log["attempt"]),
            "MF_DATASTORE": log["datastore"],
            "MF_DATASTORE_ROOT": log["datastore_root"],
            "MFLOG_STDOUT": self.paths["stdout"],
            "MFLOG_STDERR": self.paths["stderr"],
        }
        self._stop = threading.Event()
        self._thread = None

    def write(self, stream, line):
        if not line.endswith(b"\n"):
            line += b"\n"
        with self.lock:
            self.files[stream].write(mflog_line(b"task", line))
        self.out.line(self.label + line, sys.stdout if stream == "stdout" else sys.stderr)

    def system(self, msg):
        self.write("stderr", ("[metaflow-services] " + msg).encode())

    def upload(self):
        code, out = self.launcher.call(["-m", "metaflow.mflog.save_logs"], self.save_env,
                                       self.workdir)
        if code != 0 or "upload_failure" in out:
            self.out.line("[metaflow-services] Uploading the task's logs failed:\n" + out,
                          sys.stderr)

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
    def __init__(self, launcher, workdir, logs, deadline_seconds):
        self.launcher = launcher
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
        if self.deadline_seconds:
            self.deadline = time.time() + self.deadline_seconds
        self.proc = self.launcher.start(argv, extra_env, self.workdir)
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
        pipe.close()

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
