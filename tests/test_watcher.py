"""The flow-watcher: drop a flow, get a DAG; change it, the new version runs;
break it, the error shows in Airflow and the last good DAG keeps running;
remove it, the DAG goes away. (tests/test_dags_folder.py: flows next to plain
DAGs in the dags folder, refusals, duplicates, git pull, the old layout.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import harness
from support import BASE, MFLOCAL, VENV_BIN, value_flow

FLOW = value_flow("WatchedFlow")


def write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# The watcher on its own (real compiles, a controlled clock)
# --------------------------------------------------------------------------


def test_a_burst_of_changes_compiles_each_flow_once_per_settled_change(tmp_path, seaweedfs):
    from metaflow_services.watcher import Watcher

    flows, dags = tmp_path / "flows", tmp_path / "dags"
    write(flows / "w" / "helper.py", "VALUE = 0\n")
    write(flows / "w" / "watched_flow.py", FLOW)
    w = Watcher(flows, dags, settle=2.0)
    t = 1000.0
    for i in range(20):  # an editor saving 20 times, a tenth of a second apart
        write(flows / "w" / "helper.py", "VALUE = %d\n" % i)
        os.utime(flows / "w" / "helper.py", ns=(int((t + i) * 1e9),) * 2)
        assert w.poll(now=t + i * 0.1) == []
    done = w.poll(now=t + 2 + 2.5)
    assert [s.status for s in done] == ["ok"]
    assert w.state["w/watched_flow.py"].attempts == 1
    assert (dags / "WatchedFlow.py").exists()
    assert w.poll(now=t + 10) == []  # nothing changed since: nothing to do


def test_helper_change_recompiles_and_removal_deletes_the_dag(tmp_path, seaweedfs):
    from metaflow_services.watcher import Watcher

    flows, dags = tmp_path / "flows", tmp_path / "dags"
    write(flows / "w" / "helper.py", "VALUE = 1\n")
    write(flows / "w" / "watched_flow.py", FLOW)
    w = Watcher(flows, dags, settle=0)
    w.poll()
    assert [s.status for s in w.poll()] == ["ok"]
    first = (dags / "WatchedFlow.py").read_text()
    write(flows / "w" / "helper.py", "VALUE = 2\n")
    w.poll()
    assert [s.status for s in w.poll()] == ["ok"]
    assert (dags / "WatchedFlow.py").read_text() != first  # a new code package
    shutil.rmtree(flows / "w")
    w.poll()
    assert not (dags / "WatchedFlow.py").exists() and w.state == {}


def test_a_broken_flow_gets_an_error_file_and_keeps_its_last_good_dag(tmp_path, seaweedfs):
    from metaflow_services.watcher import Watcher

    flows, dags = tmp_path / "flows", tmp_path / "dags"
    write(flows / "w" / "helper.py", "VALUE = 1\n")
    write(flows / "w" / "watched_flow.py", FLOW)
    w = Watcher(flows, dags, settle=0)
    w.poll(), w.poll()
    good = (dags / "WatchedFlow.py").read_text()
    write(flows / "w" / "watched_flow.py", FLOW.replace("def end(self):", "def end(self:"))
    w.poll()
    (st,) = w.poll()
    assert st.status == "error" and "syntax error" in st.message
    assert (dags / "WatchedFlow.py").read_text() == good
    err = (dags / "w__watched_flow.compile_error.py").read_text()
    assert "The last good version (DAG WatchedFlow) keeps running until the file is fixed." in err
    write(flows / "w" / "watched_flow.py", FLOW)
    w.poll(), w.poll()
    assert not (dags / "w__watched_flow.compile_error.py").exists()


def test_a_read_only_flows_folder_compiles(tmp_path, seaweedfs):
    """A read-only folder of flows (a shared mount), the DAGs written
    elsewhere (watch --dags)."""
    from metaflow_services.watcher import Watcher

    flows, dags = tmp_path / "flows", tmp_path / "dags"
    write(flows / "w" / "helper.py", "VALUE = 1\n")
    write(flows / "w" / "watched_flow.py", FLOW)
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(flows), str(ro)], check=True)
    try:
        w = Watcher(ro, dags, settle=0)
        w.poll()
        (st,) = w.poll()
        assert st.status == "ok", st.message
        assert (dags / "WatchedFlow.py").exists()
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_runs_of_a_dropped_flow_are_recorded_under_its_owner(tmp_path, seaweedfs):
    from metaflow_services.watcher import Watcher

    flows, dags = tmp_path / "flows", tmp_path / "dags"
    write(flows / "w" / "helper.py", "VALUE = 1\n")
    write(flows / "w" / "watched_flow.py", FLOW)
    os.chown(flows / "w" / "watched_flow.py", 4242, 4242)
    passwd = tmp_path / "passwd"  # as the VM's /etc/passwd, mounted into the watcher
    passwd.write_text("root:x:0:0::/root:/bin/sh\nalice:x:4242:4242::/home/alice:/bin/sh\n")
    w = Watcher(flows, dags, settle=0, passwd=passwd)
    w.poll()
    (st,) = w.poll()
    assert st.status == "ok" and st.user == "alice" and st.checked_at
    assert "'user': 'alice'" in (dags / "WatchedFlow.py").read_text()
    # Saved by an owner the passwd file does not know: the watcher's own METAFLOW_USER.
    write(flows / "w" / "watched_flow.py", FLOW + "\n")
    os.chown(flows / "w" / "watched_flow.py", 4343, 4343)
    w.poll()
    (st,) = w.poll()
    assert st.user is None
    assert "'user': '%s'" % os.environ["METAFLOW_USER"] in (dags / "WatchedFlow.py").read_text()


def test_runs_of_a_flow_saved_by_root_are_recorded_under_the_default_user(tmp_path, seaweedfs):
    """`fab -H root@vm push-flows` and scp as root leave root-owned files:
    Metaflow refuses to record runs as root, so they go under the deploy's
    flows.default_user instead of failing to compile."""
    from metaflow_services.watcher import Watcher

    flows, dags = tmp_path / "flows", tmp_path / "dags"
    write(flows / "w" / "helper.py", "VALUE = 1\n")
    write(flows / "w" / "watched_flow.py", FLOW)
    os.chown(flows / "w" / "watched_flow.py", 0, 0)
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0::/root:/bin/sh\n")
    w = Watcher(flows, dags, settle=0, passwd=passwd, default_user="metaflow-services")
    w.poll()
    (st,) = w.poll()
    assert st.status == "ok", st.message
    assert st.user == "metaflow-services"
    assert "'user': 'metaflow-services'" in (dags / "WatchedFlow.py").read_text()


# --------------------------------------------------------------------------
# Through Airflow, with the watcher running as its own process
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def watched(airflow):
    airflow.start_scheduler(harness.worker_env("subprocess", BASE, MFLOCAL))
    # As in the stack: flows go into Airflow's dags folder itself.
    flows = airflow.dags
    proc = harness.Process("watcher", [str(VENV_BIN / "metaflow-services"), "watch", "--flows",
                                       str(flows), "--interval", "1", "--settle", "1"],
                           dict(os.environ), BASE)
    yield airflow, flows
    proc.stop()


def _dag_active(api, dag_id):
    r = api.session.get(api.url + "/api/v2/dags/" + dag_id, timeout=10)
    return r.status_code == 200 and not r.json().get("is_stale", False)


def _run_value(api, conf=None):
    from metaflow import Run, namespace

    from metaflow_services.spec import run_id_for

    run_id = api.trigger("WatchedFlow", conf, run_id="watched__%d" % (time.time() * 1000))
    assert api.wait_for_run("WatchedFlow", run_id, timeout=300) == "success"
    namespace(None)
    return Run("WatchedFlow/%s" % run_id_for("WatchedFlow", run_id))["start"].task.data.value


def test_drop_change_break_and_remove_a_flow(watched):
    airflow, flows = watched
    api = airflow.api()
    write(flows / "w" / "helper.py", "VALUE = 'first'\n")
    write(flows / "w" / "watched_flow.py", FLOW)
    t = time.time()
    harness.wait_for(lambda: _dag_active(api, "WatchedFlow"), 30, "the dropped flow's DAG",
                     interval=0.5)
    print("DAG visible %.1f s after the drop" % (time.time() - t))
    api.patch("/api/v2/dags/WatchedFlow", {"is_paused": False})
    assert _run_value(api) == "first"

    write(flows / "w" / "helper.py", "VALUE = 'second'\n")
    time.sleep(8)  # settle + compile + dag-processor refresh
    harness.wait_for(lambda: _run_value(api) == "second", 120, "the changed flow to run")

    write(flows / "w" / "watched_flow.py", FLOW.replace("def end(self):", "def end(self:"))

    def error_listed():
        errors = api.get("/api/v2/importErrors")["import_errors"]
        return [e for e in errors if "compile_error" in e["filename"]
                and "keeps running until the file is fixed" in e["stack_trace"]]

    harness.wait_for(error_listed, 60, "the compile error in Airflow's import errors")
    assert "syntax error" in error_listed()[0]["stack_trace"]
    assert _run_value(api) == "second"  # the last good DAG still runs

    shutil.rmtree(flows / "w")
    harness.wait_for(lambda: not _dag_active(api, "WatchedFlow"), 60, "the DAG to go away")
    harness.wait_for(lambda: not error_listed(), 60, "the import error to go away")
