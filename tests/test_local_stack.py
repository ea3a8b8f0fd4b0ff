"""`metaflow-services local`: the stack on this machine as a user runs it.
`up` starts everything in the background and returns, `status` says each part
runs and answers, a flow compiled into the stack's dags folder runs through
Airflow and is recorded in the metadata service, `down` leaves nothing
running; `up` refuses a taken port or a missing image before it starts
anything."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest

from support import REPO, VENV_BIN, docker_available

CLI = str(VENV_BIN / "metaflow-services")
FREE_PORTS = ["--airflow-port", "0", "--s3-port", "0", "--postgres-port", "0"]


def clean_env():
    """This machine's environment without the test session's Metaflow and S3
    settings: the stack and its client use only what `local` gives them."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("METAFLOW_", "AWS_", "MFS_"))}


def local(*args, check=True, env=None):
    proc = subprocess.run([CLI, "local", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env or clean_env(), cwd="/tmp")
    if check and proc.returncode != 0:
        raise AssertionError("local %s failed (%d):\n%s\n%s" % (" ".join(args), proc.returncode,
                                                              proc.stdout, proc.stderr))
    return proc


def stack_env(folder: Path):
    """The exports of env.sh, as a user's shell gets them."""
    env = clean_env()
    for line in (folder / "env.sh").read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = shlex.split(value)[0]
    return env


def new_folder(prefix):
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(folder, 0o755)
    return folder / "stack"


def pids_alive(pids):
    alive = []
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    alive.append(pid)
        except OSError:
            pass
    return alive


def processes_mentioning(text):
    """Pids of processes whose command line mentions `text` (not this test's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(entry.name))
            except OSError:
                pass
    return pids_alive(found)


@pytest.mark.e2e
@pytest.mark.service
def test_local_up_runs_a_flow_and_down_stops_everything():
    assert docker_available(), "the metadata service runs in Docker (scripts/prepare)"
    folder = new_folder("mfs-local-")
    args = ["--dir", str(folder)]
    try:
        up = local("up", *args, *FREE_PORTS, "--metadata-service", "--metadata-port", "0",
                   "--ui-backend-port", "0")
        out = up.stdout
        assert "==> PostgreSQL" in out and "==> Airflow 3" in out and "ok (" in out  # progress
        settings = json.loads((folder / "stack.json").read_text())
        secrets = json.loads((folder / "secrets.json").read_text())
        ports = settings["ports"]
        assert "http://127.0.0.1:%d" % ports["airflow"] in out
        assert "password in %s" % (folder / "airflow" / "passwords.json") in out
        assert str(folder / "dags") in out and ". %s" % (folder / "env.sh") in out
        for value in secrets.values():  # stored, never printed
            assert value not in out + up.stderr
        for private in ("secrets.json", "env.sh", "airflow/passwords.json"):
            assert (folder / private).stat().st_mode & 0o777 == 0o600, private

        status = local("status", *args, "--json")
        rows = {r["name"]: r for r in json.loads(status.stdout)["services"]}
        assert set(rows) >= {"postgres", "seaweedfs", "airflow api-server", "airflow scheduler",
                             "airflow dag-processor", "metadata", "ui-backend"}
        assert all(r["running"] and r["answers"] for r in rows.values()), rows
        again = local("up", *args)
        assert "already running" in again.stdout

        run_hello_flow(folder)

        pids = [r["pid"] for r in rows.values() if isinstance(r["pid"], int)]
        down = local("down", *args)
        assert "stopped airflow-scheduler" in down.stdout and "stopped postgres" in down.stdout
        assert pids_alive(pids) == []
        assert processes_mentioning(str(folder)) == []
        containers = subprocess.run(["docker", "ps", "-aq", "--filter",
                                     "label=metaflow-services.local=%s" % folder],
                                    stdout=subprocess.PIPE, text=True, check=True).stdout
        assert containers.strip() == ""
        for port in ("airflow", "s3", "postgres", "metadata", "ui-backend"):
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", ports[port])) != 0, port
        assert "nothing was running" in local("down", *args).stdout  # idempotent
        stopped = local("status", *args, check=False)
        assert stopped.returncode == 1 and " yes " not in stopped.stdout
    finally:
        local("down", *args, "--purge", check=False)
    assert not folder.exists()
    folder.parent.rmdir()


def run_hello_flow(folder):
    """What a user does next: source env.sh, compile into the dags folder,
    trigger, read the run back with the Metaflow client."""
    env = stack_env(folder)
    assert env["METAFLOW_DEFAULT_METADATA"] == "service"
    subprocess.run([CLI, "compile", str(REPO / "examples" / "flows" / "hello_flow.py")],
                   env=env, cwd="/tmp", check=True, stdout=subprocess.DEVNULL)
    assert (folder / "dags" / "HelloFlow.py").exists()  # MFS_DAGS_FOLDER from env.sh
    script = textwrap.dedent("""
        import sys
        from metaflow import Run, namespace
        from metaflow_services.local import LocalStack
        from metaflow_services.spec import run_id_for

        api = LocalStack(sys.argv[1]).api()
        api.wait_for_dag("HelloFlow")
        run_id = api.trigger("HelloFlow", {"count": 3})
        assert api.wait_for_run("HelloFlow", run_id) == "success", run_id
        namespace(None)
        run = Run("HelloFlow/" + run_id_for("HelloFlow", run_id))
        print(run.successful, run["add_up"].task.data.total)
    """)
    proc = subprocess.run([str(VENV_BIN / "python"), "-c", script, str(folder)], env=env,
                          cwd="/tmp", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "True 14"


def assert_refused_before_starting(proc, folder, *needles):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not list(folder.glob("run/*.pid"))
    assert not (folder / "postgres" / "data").exists()
    assert processes_mentioning(str(folder)) == []


def test_local_up_refuses_a_taken_port_before_starting_anything():
    folder = new_folder("mfs-local-refused-")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = local("up", "--dir", str(folder), *FREE_PORTS, "--airflow-port", str(port),
                     check=False)
    assert_refused_before_starting(proc, folder, "port %d (Airflow) is already in use" % port,
                                   "--airflow-port")
    local("down", "--dir", str(folder), "--purge")
    folder.parent.rmdir()


def test_local_up_refuses_a_missing_metadata_image_before_starting_anything():
    if not docker_available():
        pytest.skip("needs the Docker engine to look the image up")
    folder = new_folder("mfs-local-refused-")
    proc = local("up", "--dir", str(folder), *FREE_PORTS, "--metadata-service",
                 "--metadata-port", "0", "--ui-backend-port", "0",
                 "--metadata-image", "mfs-no-such-image:test", check=False)
    assert_refused_before_starting(proc, folder, "image mfs-no-such-image:test not found",
                                   "tests/images/build metadata")
    local("down", "--dir", str(folder), "--purge")
    folder.parent.rmdir()


def test_local_down_and_status_without_a_stack():
    folder = new_folder("mfs-local-none-")
    assert "Nothing to stop" in local("down", "--dir", str(folder)).stdout
    status = local("status", "--dir", str(folder), check=False)
    assert status.returncode == 1 and "No local stack" in status.stdout
    folder.parent.rmdir()
