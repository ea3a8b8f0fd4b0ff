"""The step containers' warm process (metaflow_services/warm.py): each
Metaflow command is a fork of one Python that imported Metaflow once. What a
step sees must be what `python flow.py ...` would give it: its own process
session, environment, folder, arguments and exit status, and random numbers
of its own; a warm process that cannot start or dies leaves the commands to
new Python processes."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from metaflow_services import warm
from metaflow_services.executors import BOOTSTRAP_PARTS, BOOTSTRAP_SOURCE
from support import process_running

SCRIPT = """
    import json, os, random, sys
    import numpy_like_module  # a sibling module: the flow's folder is on sys.path

    print(json.dumps({"argv": sys.argv[1:], "pid": os.getpid(), "sid": os.getsid(0),
                      "cwd": os.getcwd(), "x": os.environ.get("X"), "r": random.random(),
                      "seen": numpy_like_module.COUNT}), flush=True)
    print("on stderr", file=sys.stderr)
    numpy_like_module.COUNT += 1
    if "--exit" in sys.argv:
        sys.exit(int(sys.argv[-1]))
    if "--raise" in sys.argv:
        raise ValueError("raised by the flow")
    if "--sleep" in sys.argv:
        import time
        time.sleep(60)
"""


class Out:
    def __init__(self):
        self.lines = []

    def line(self, text, stream=None):
        self.lines.append(text)


@pytest.fixture
def flow(tmp_path):
    (tmp_path / "flow.py").write_text(textwrap.dedent(SCRIPT))
    (tmp_path / "numpy_like_module.py").write_text("COUNT = 0\n")
    return tmp_path / "flow.py"


def launcher(flow_file, env=None):
    return warm.Launcher(dict(os.environ, **(env or {})), str(flow_file), BOOTSTRAP_SOURCE, Out())


def run(launcher_, flow_file, *args, env=None, cwd="/tmp"):
    import json

    code, out = launcher_.call([str(flow_file)] + list(args), env or {}, cwd)
    first = out.splitlines()[0]
    return code, json.loads(first), out


def test_each_command_is_a_fork_with_its_own_session_env_and_folder(flow, tmp_path):
    lw = launcher(flow)
    try:
        assert lw.warm is not None, lw.describe()
        code1, a, out = run(lw, flow, "one", env={"X": "first"}, cwd=str(tmp_path))
        code2, b, _ = run(lw, flow, "two")
        assert (code1, code2) == (0, 0)
        assert "on stderr" in out
        assert a["argv"] == ["one"] and b["argv"] == ["two"]
        assert a["x"] == "first" and b["x"] is None  # no environment leaks between commands
        assert a["cwd"] == str(tmp_path) and b["cwd"] == "/tmp"
        assert a["sid"] == a["pid"] and b["sid"] == b["pid"]  # a session each (killpg)
        assert a["pid"] != b["pid"]
        # The flow's imports were loaded before the fork, and each command
        # starts from that state again: the second did not see the first's change.
        assert a["seen"] == b["seen"] == 0
        assert a["r"] != b["r"]
    finally:
        lw.close()


def test_the_warm_process_ends_by_itself_when_the_bootstrap_is_done(flow):
    """Once a task's commands ran, closing the launcher ends the warm process
    (its input ends): it exits, it is not killed after a wait (a task's
    container lived 10 s longer than its step when it was)."""
    lw = launcher(flow)
    assert run(lw, flow, "one")[0] == 0
    proc = lw.warm.proc
    lw.close()
    assert proc.returncode == 0


def test_exit_codes_and_tracebacks_are_what_python_gives(flow):
    lw = launcher(flow)
    try:
        assert run(lw, flow, "--exit", "7")[0] == 7
        code, _, out = run(lw, flow, "--raise")
        assert code == 1
        assert "ValueError: raised by the flow" in out
        assert str(flow) in out and "metaflow-services-bootstrap" not in out
        proc = lw.start([str(flow), "--sleep"], {}, "/tmp")
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM
        assert run(lw, flow, "after")[0] == 0  # the warm process serves on
    finally:
        lw.close()


def test_a_dead_warm_process_fails_its_running_command_and_the_rest_run_cold(flow):
    lw = launcher(flow)
    try:
        proc = lw.start([str(flow), "--sleep"], {}, "/tmp")
        time.sleep(1)
        lw.warm.proc.kill()
        assert proc.wait(timeout=10) == -signal.SIGKILL
        deadline = time.time() + 10  # its orphan was stopped, not left running
        while process_running(proc.pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not process_running(proc.pid)
        code, data, _ = run(lw, flow, "cold")
        assert code == 0 and data["argv"] == ["cold"]
        assert isinstance(lw.start([str(flow)], {}, "/tmp"), subprocess.Popen)
    finally:
        lw.close()


def test_imports_that_start_threads_mean_no_warm_process(tmp_path):
    # Forking a process that has threads can copy a lock another thread held.
    (tmp_path / "threaded.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
    flow = tmp_path / "flow.py"
    flow.write_text("import threaded\nprint('ran')\n")
    lw = launcher(flow)
    try:
        assert lw.warm is None
        assert "started threads" in lw.describe()
        code, out = lw.call([str(flow)], {}, "/tmp")
        assert code == 0 and out.strip() == "ran"
    finally:
        lw.close()


def test_warm_process_can_be_switched_off(flow):
    lw = launcher(flow, {"MFS_WARM_PROCESS": "0"})
    assert lw.warm is None
    assert run(lw, flow, "x")[0] == 0
    lw.close()


def test_the_bootstrap_as_the_executors_start_it_has_a_warm_process(tmp_path):
    """`python -c` with the source in the environment, as both executors
    start it: the bootstrap keeps its source for the warm process."""
    import hashlib
    import json
    import logging
    import tarfile

    from metaflow_services.config import Settings
    from metaflow_services.executors import Launch, SubprocessExecutor

    (tmp_path / "flow.py").write_text("print('a flow')\n")
    package = tmp_path / "job.tgz"
    with tarfile.open(package, "w:gz") as tar:
        tar.add(tmp_path / "flow.py", arcname="flow.py")
    job = {"package": {"url": str(package), "sha": hashlib.sha1(package.read_bytes()).hexdigest(),
                       "post_extract_env": {}},
           "cache_dir": str(tmp_path / "cache"), "flow_file": "flow.py", "deadline_seconds": None,
           "where": "a test", "log": {"attempt": 0, "datastore": "s3", "datastore_root": "-"},
           "tasks": []}
    lines = []
    executor = SubprocessExecutor(Settings(), logging.getLogger("test"))
    code = executor.run(Launch(name="probe", env={}, job=json.dumps(job).encode()), lines.append)
    assert code == 0, lines
    assert "0 Metaflow task(s)" in lines[0] and "warm process ready" in lines[0], lines


def test_bootstrap_source_is_one_program():
    # The executors send warm_tuning.py, warm.py and bootstrap.py as one
    # `python -c` program.
    here = Path(warm.__file__).parent
    assert BOOTSTRAP_SOURCE == "\n".join((here / n).read_text() for n in BOOTSTRAP_PARTS)
    assert BOOTSTRAP_PARTS[-1] == "bootstrap.py"
    compile(BOOTSTRAP_SOURCE, "bootstrap", "exec")


@pytest.mark.parametrize("flow_name,args,printed", [
    # Metaflow's import puts ForeachFrame on __main__ for its pickles: the
    # flow's own __main__ in the fork must have it.
    ("foreach_flow.py", ["--width", "2"], "values [1, 2]"),
    # Metaflow's CLI takes the flow's Config options when metaflow.cli is
    # imported: that must happen in the fork, after the flow class exists.
    ("config_project_flow.py", [], "Done!"),
])
def test_a_metaflow_run_in_a_fork(tmp_path, flow_name, args, printed):
    from support import FLOWS

    env = {"METAFLOW_DEFAULT_METADATA": "local", "METAFLOW_DEFAULT_DATASTORE": "local",
           "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "mf"), "USERNAME": "tester"}
    flow = FLOWS / flow_name
    lw = launcher(flow, env)
    try:
        assert lw.warm is not None, lw.describe()
        code, out = lw.call([str(flow), "--no-pylint", "run"] + args, {}, str(tmp_path))
        assert code == 0, out[-3000:]
        assert printed in out
    finally:
        lw.close()


UPLOAD = """
    import io, sys
    from metaflow.plugins.datastores.s3_storage import S3Storage

    prefix, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    def objects():
        for i in range(count):
            data = (b"%s %d " % (prefix.encode(), i)) * size
            yield "%s/%d" % (prefix, i), (io.BytesIO(data[:size]), {"n": i})

    # As Metaflow's content-addressed store calls it for a task's artifacts.
    S3Storage(sys.argv[4]).save_bytes(objects(), overwrite=True, len_hint=count)
    print("uploaded", prefix)
"""


@pytest.mark.parametrize("prefix,count,size,uploader", [
    # A split's artifacts: Metaflow would start s3op (a new Python) for more
    # than ten; they go up from the task's own process.
    ("small", 20, 100, None),
    # 70 MB: past the in-process limit, Metaflow's parallel uploader as before.
    ("big", 14, 5 << 20, "s3op.py put"),
])
def test_artifact_uploads_from_a_fork(tmp_path, seaweedfs, prefix, count, size, uploader):
    (tmp_path / "upload.py").write_text(textwrap.dedent(UPLOAD))
    root = "s3://%s/warm-test/%d" % (seaweedfs.bucket, time.time() * 1000)
    # Metaflow's debug switch logs every s3op process it starts.
    lw = launcher(tmp_path / "upload.py", dict(seaweedfs.env(), METAFLOW_DEBUG_S3CLIENT="1"))
    try:
        assert lw.warm is not None, lw.describe()
        code, out = lw.call([str(tmp_path / "upload.py"), prefix, str(count), str(size), root],
                            {}, str(tmp_path))
    finally:
        lw.close()
    assert code == 0 and "uploaded %s" % prefix in out, out[-3000:]
    started = [line for line in out.splitlines() if "s3op.py" in line]
    if uploader is None:
        assert not started, started
    else:
        assert any(uploader in line for line in started), out[-3000:]
    s3 = seaweedfs.client()
    key_prefix = root.split("/", 3)[3]
    for i in range(count):
        body = s3.get_object(Bucket=seaweedfs.bucket, Key="%s/%s/%d" % (key_prefix, prefix, i))
        data = body["Body"].read()
        assert len(data) == size and data.startswith(b"%s %d " % (prefix.encode(), i))
