"""End to end: flows compiled into DAG files, run by a real Airflow 3.3
scheduler (LocalExecutor on PostgreSQL) against a real S3 server (SeaweedFS),
with each executor (docker: a real Docker engine; subprocess). Runs are
triggered through Airflow's REST API and checked through the Metaflow client.

For speed, each executor's module-scoped fixture compiles the flows and
triggers every run at once; the tests then check one run each.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass, field

import pytest

import harness
from support import (BASE, FLOWS, GRACE, MFLOCAL, TASK_SLOTS, TEST_USER, UI_URL, compile_flow,
                     docker_available, process_running)

pytestmark = pytest.mark.e2e

STEP_IMAGE = os.environ.get("MFS_TEST_STEP_IMAGE", "mfs-step:test")

FLOW_FILES = ["linear_flow.py", "branches_flow.py", "foreach_flow.py", "nested_foreach_flow.py",
              "switch_flow.py", "retry_catch_flow.py", "config_project_flow.py",
              "single_step_flow.py", "custom_names_flow.py", "stubborn_flow.py",
              "sleepy_flow.py", "ranges_flow.py", "sleepy_range_flow.py"]
PROJECT_DAG = "mfs_test.user.%s.ConfigProjectFlow" % TEST_USER

# key -> (dag id, params given in the trigger request)
RUNS = {
    "linear": ("LinearFlow", {"count": 7, "flag": True, "greeting": "hi there",
                              "config-json": {"b": [1, 2]}, "ratio": 0.25}),
    "linear_defaults": ("LinearFlow", {}),
    "branches": ("BranchesFlow", {}),
    "foreach_1": ("ForeachFlow", {"width": 1}),
    "foreach_3": ("ForeachFlow", {"width": 3}),
    "foreach_wide": ("ForeachFlow", {"width": 20}),
    "foreach_0": ("ForeachFlow", {"width": 0}),
    "nested": ("NestedForeachFlow", {}),
    "switch_fast": ("SwitchFlow", {}),
    "switch_slow": ("SwitchFlow", {"route": "slow", "loops": 6}),
    "retry_catch": ("RetryCatchFlow", {}),
    "config_project": (PROJECT_DAG, {}),
    "single": ("SingleStepFlow", {}),
    "custom_names": ("CustomNamesFlow", {}),
    "stubborn": ("StubbornFlow", {}),
    "ranges": ("RangesFlow", {}),
}


# The subprocess executor (an option; docker is the default) runs what
# depends on how a step is launched, logged, retried and killed. Graph shapes,
# parameters and decorators are the same runtime whichever executor launches
# the step: checked once, with docker (this keeps CI within its budget).
SUBPROCESS_RUNS = {"linear", "retry_catch", "stubborn", "foreach_3", "nested", "ranges"}


@dataclass
class Batch:
    executor: str
    api: harness.AirflowAPI
    runs: dict = field(default_factory=dict)    # key -> airflow run id
    states: dict = field(default_factory=dict)  # key -> final state

    def mf_run(self, key):
        from metaflow import Run, namespace

        from metaflow_services.spec import run_id_for

        namespace(None)
        dag_id = RUNS[key][0]
        flow = {PROJECT_DAG: "ConfigProjectFlow"}.get(dag_id, dag_id)
        return Run("%s/%s" % (flow, run_id_for(dag_id, self.runs[key])))

    def tis(self, key):
        return self.api.task_instances(RUNS[key][0], self.runs[key])


@pytest.fixture(scope="module")
def dags(airflow):
    api = airflow.api()
    for f in FLOW_FILES:
        compile_flow(FLOWS / f, airflow.dags)
    for dag_id in sorted({d for d, _ in RUNS.values()} | {"SleepyFlow", "SleepyRangeFlow"}):
        api.wait_for_dag(dag_id)


# The subprocess batch (an option, 5 min) runs with MFS_SLOW_TESTS=1: CI's
# 90-minute limit (95 min in the 2026-12-03 rehearsal); see CONTRIBUTING.
@pytest.fixture(scope="module", params=["docker"] + (
    ["subprocess"] if os.environ.get("MFS_SLOW_TESTS") == "1" else []))
def batch(request, airflow, dags):
    executor = request.param
    if executor == "docker" and not docker_available():
        pytest.fail("the docker executor tests need a Docker engine (scripts/host-setup starts one)")
    airflow.start_scheduler(harness.worker_env(executor, BASE, MFLOCAL, STEP_IMAGE,
                                               MFS_TIMEOUT_GRACE_SECONDS=str(GRACE)))
    api = airflow.api()
    b = Batch(executor, api)
    keys = [k for k in RUNS if executor == "docker" or k in SUBPROCESS_RUNS]
    for key in keys:
        dag_id, conf = RUNS[key]
        b.runs[key] = api.trigger(dag_id, conf, run_id="%s__%s__%d" % (key, executor, time.time()))
    for key in keys:
        b.states[key] = api.wait_for_run(RUNS[key][0], b.runs[key], timeout=900)
    return b


def state(batch, key):
    if key not in batch.states:
        pytest.skip("executor-independent: checked with the docker executor (the default)")
    return batch.states[key]


def ok(batch, key):
    assert state(batch, key) == "success", _failure_report(batch, key)
    run = batch.mf_run(key)
    assert run.successful, "Metaflow run %s is not successful" % run
    return run


def _failure_report(batch, key):
    dag_id, run_id = RUNS[key][0], batch.runs[key]
    lines = ["DAG run %s/%s ended %s" % (dag_id, run_id, batch.states[key])]
    for ti in batch.tis(key):
        if ti["state"] not in ("success", "skipped"):
            lines.append("--- %s[%s] %s" % (ti["task_id"], ti["map_index"], ti["state"]))
            try:
                lines.append(batch.api.task_log(dag_id, run_id, ti["task_id"],
                                                max(ti["try_number"], 1), ti["map_index"])[-4000:])
            except Exception as e:
                lines.append("(no log: %s)" % e)
    return "\n".join(lines)


# --------------------------------------------------------------------------


def test_parameters_from_trigger_reach_the_run(batch):
    run = ok(batch, "linear")
    assert run["start"].task.data.seen == {
        "count": 7, "ratio": 0.25, "flag": True, "greeting": "hi there",
        "config_json": {"b": [1, 2]}, "notes": "notes from a file"}
    assert run["b"].task.data.doubled == 14


def test_parameter_defaults_apply_when_not_given(batch):
    run = ok(batch, "linear_defaults")
    assert run["start"].task.data.seen == {
        "count": 3, "ratio": 0.5, "flag": False, "greeting": "hello",
        "config_json": {"a": 1}, "notes": "notes from a file"}


def test_one_parameters_task_and_run_tagged_with_airflow_ids(batch):
    run = ok(batch, "linear")
    assert "airflow_dag_id:LinearFlow" in run.tags
    assert "airflow_run_id:%s" % batch.runs["linear"] in run.tags
    assert "runtime:airflow3" in run.system_tags
    assert "user:%s" % TEST_USER in run.system_tags
    assert run.user_tags >= {"airflow_dag_id:LinearFlow"}
    meta = {m.name: m.value for m in run["start"].task.metadata}
    assert meta["airflow-dag-id"] == "LinearFlow"
    assert meta["airflow-task-id"] == "start"
    assert meta["mfs-executor"] == batch.executor
    assert meta["mfs-worker"] == socket.gethostname()  # the machine that ran it


def test_logs_are_stored_and_streamed_to_airflow(batch):
    run = ok(batch, "linear")
    start = run["start"].task
    assert "start stdout line" in start.stdout
    assert "start stderr line" in start.stderr
    assert "done 14" in run["end"].task.stdout
    log = batch.api.task_log("LinearFlow", batch.runs["linear"], "start")
    assert "start stdout line" in log


def test_environment_and_resources_reach_the_step(batch):
    run = ok(batch, "linear")
    a = run["a"].task.data
    assert a.env_value == "from-environment-decorator"
    if batch.executor == "docker":
        assert a.memory_limit == 600 * 1024 * 1024
        assert a.cpu_limit == 1.0


def test_card_is_stored(batch):
    from metaflow.cards import get_cards

    run = ok(batch, "linear")
    assert len(get_cards(run["b"].task)) >= 1


def test_branches_and_nested_branches(batch):
    run = ok(batch, "branches")
    assert run["join"].task.data.total == 11 + 101
    assert run["inner_join"].task.data.ys == ["a", "b"]


@pytest.mark.parametrize("key,width", [("foreach_1", 1), ("foreach_3", 3), ("foreach_wide", 20)])
def test_foreach_widths(batch, key, width):
    run = ok(batch, key)
    assert run["join"].task.data.values == [i * i + 1 for i in range(width)]
    assert len(list(run["plus_one"])) == width
    mapped = [ti for ti in batch.tis(key) if ti["task_id"] == "square"]
    # Narrow: one mapped instance per split. Wide (more than two per task
    # slot): ranges of splits, two per slot, never more than max_map_length.
    assert len(mapped) == min(width, 2 * TASK_SLOTS)
    labels = sorted(ti["rendered_map_index"] for ti in mapped)
    if width <= 2 * TASK_SLOTS:
        assert labels == sorted("split %d" % i for i in range(width))
    else:
        assert labels == ["splits 0-4", "splits 10-14", "splits 15-19", "splits 5-9"]


def test_wide_foreach_ranges_retry_only_the_failed_split(batch):
    run = ok(batch, "ranges")
    assert run["join"].task.data.values == [i * 10 for i in range(10)]
    tasks = {t.index: t for t in run["work"]}
    # Split 3 failed once and ran again as attempt 1; the splits that share
    # its range (2-4) ran once.
    assert tasks[3].current_attempt == 1
    assert [tasks[i].current_attempt for i in (0, 1, 2, 4, 5, 6, 7, 8, 9)] == [0] * 9
    for i, t in tasks.items():  # every split has its own logs
        lines = [x for x in t.stdout.splitlines() if x.startswith("split ")]
        assert lines == ["split %d attempt %d" % (i, t.current_attempt)], (i, t.stdout)
    tis = {ti["rendered_map_index"]: ti for ti in batch.tis("ranges") if ti["task_id"] == "work"}
    assert sorted(tis) == ["splits 0-1", "splits 2-4", "splits 5-6", "splits 7-9"]
    assert tis["splits 2-4"]["try_number"] == 2
    assert {ti["try_number"] for k, ti in tis.items() if k != "splits 2-4"} == {1}
    log = batch.api.task_log("RangesFlow", batch.runs["ranges"], "work", 2,
                             tis["splits 2-4"]["map_index"])
    assert "[t-3] split 3 attempt 1" in log
    assert "not run again" in log and "split 2 attempt" not in log
    assert "warm process ready" in log
    # One warm process per range forked every split of it (split 3's second
    # attempt ran in the retry's).
    data = {i: t.data for i, t in tasks.items()}
    for lo, hi in ((0, 2), (5, 7), (7, 10)):
        assert len({data[i].ppid for i in range(lo, hi)}) == 1
        assert len({data[i].pid for i in range(lo, hi)}) == hi - lo


def test_zero_width_foreach_fails_the_run(batch):
    assert state(batch, "foreach_0") == "failed"
    start = [ti for ti in batch.tis("foreach_0") if ti["task_id"] == "start"][0]
    assert start["state"] == "failed"


def test_nested_foreach_with_split_inside(batch):
    run = ok(batch, "nested")
    assert run["join1"].task.data.labels == [
        "a10LR", "a11LR", "a20LR", "a21LR", "a22LR", "a30LR", "b40LR", "b41LR"]
    assert len(list(run["level3"])) == 8
    assert {t.id for t in run["level2"]} == {"t-0-0", "t-0-1", "t-0-2", "t-1-0"}


def test_switch_runs_only_the_chosen_branches(batch):
    run = ok(batch, "switch_fast")
    data = run["end"].task.data
    assert data.path == ["start", "fast", "small", "merge"]
    assert run["branches_join"].task.data.branch_results == ["a_odd", "b"]
    assert run["each_join"].task.data.tags_seen == ["O1", "E2", "O3", "E4"]
    assert data.counter == 3 and len(list(run["loop"])) == 3  # recursive step
    steps = {s.id for s in run}
    assert not steps & {"slow", "big", "a_even"}
    states = {ti["task_id"]: ti["state"] for ti in batch.tis("switch_fast")
              if ti["map_index"] == -1}
    assert states["slow"] == "skipped" and states["big"] == "skipped"
    assert states["merge"] == "success"


def test_switch_other_route(batch):
    run = ok(batch, "switch_slow")
    data = run["end"].task.data
    assert data.path == ["start", "slow", "merge"]
    assert data.counter == 6
    assert run["branches_join"].task.data.branch_results == ["a_even", "b"]


def test_retry_fails_then_succeeds_with_two_attempts(batch):
    run = ok(batch, "retry_catch")
    start = run["start"].task
    assert start.current_attempt == 1 and start.data.start_attempt == 1
    assert run["join"].task.data.flaky_attempt == 1
    tries = {ti["task_id"]: ti["try_number"] for ti in batch.tis("retry_catch")}
    assert tries["start"] == 2 and tries["flaky"] == 2


def test_retried_start_creates_one_parameters_task(batch, seaweedfs):
    run = ok(batch, "retry_catch")
    prefix = "metaflow/RetryCatchFlow/%s/_parameters/" % run.id
    keys = [o["Key"] for o in seaweedfs.client().list_objects_v2(
        Bucket=seaweedfs.bucket, Prefix=prefix).get("Contents", [])]
    assert {k[len(prefix):].split("/")[0] for k in keys} == {"params"}


def test_catch_records_exception_and_hard_crash(batch):
    run = ok(batch, "retry_catch")
    data = run["join"].task.data
    assert "caught by @catch" in data.raised
    assert data.crashed and data.crashed != "None"
    tries = {ti["task_id"]: ti["try_number"] for ti in batch.tis("retry_catch")}
    assert tries["crashes"] == 2  # the crash, then @catch's fallback attempt


def test_timeout_kills_the_step_and_its_children(batch):
    run = ok(batch, "retry_catch")
    assert "timeout" in run["join"].task.data.timed_out.lower()
    if batch.executor == "subprocess":
        out = run["too_slow"].task.stdout
        pid = int(out.split("child pid ")[1].split()[0])
        assert not os.path.exists("/proc/%d" % pid) or \
            open("/proc/%d/stat" % pid).read().split()[2] == "Z", "child of timed-out step alive"


def test_config_and_project(batch):
    run = ok(batch, "config_project")
    assert run["start"].task.data.alpha == 7
    assert run["start"].task.data.name == "cfg"
    end = run["end"].task.data
    assert end.branch_name == "user.%s" % TEST_USER
    assert end.project_flow_name == PROJECT_DAG


def test_single_step_and_custom_step_names(batch):
    assert ok(batch, "single")["only"].task.data.answer == 42
    assert ok(batch, "custom_names")["finish"].task.data.trail == ["begin", "middle", "finish"]


def test_clearing_a_finished_task_reruns_it_as_the_next_attempt(batch):
    run = ok(batch, "linear")
    api, run_id = batch.api, batch.runs["linear"]
    api.post("/api/v2/dags/LinearFlow/clearTaskInstances", {
        "dry_run": False, "task_ids": ["b"], "dag_run_id": run_id, "only_failed": False,
        "reset_dag_runs": True, "include_downstream": False, "include_upstream": False})
    harness.wait_for(lambda: api.run_state("LinearFlow", run_id) != "success", 30,
                     "the cleared run to restart", interval=0.5)
    assert api.wait_for_run("LinearFlow", run_id) == "success"
    from metaflow import Task

    b = Task(run["b"].task.pathspec)
    assert b.current_attempt == 1 and b.successful
    assert b.data.doubled == 14


def test_no_step_containers_left_behind(batch):
    if batch.executor != "docker":
        pytest.skip("docker executor only")
    # This batch's runs only: a machine may hold containers of a run an
    # earlier, killed session left (they failed this test in CI once).
    left = {key: _containers("metaflow-services.airflow-run-id=%s" % run_id)
            for key, run_id in batch.runs.items()}
    assert {key: ids for key, ids in left.items() if ids} == {}


def test_each_task_links_to_its_metaflow_run(batch):
    from metaflow_services.spec import run_id_for

    ok(batch, "linear")
    links = batch.api.get("/api/v2/dags/LinearFlow/dagRuns/%s/taskInstances/b/links"
                          % batch.runs["linear"])
    assert links["extra_links"]["Metaflow run"] == "%s/LinearFlow/%s" % (
        UI_URL, run_id_for("LinearFlow", batch.runs["linear"]))


def test_hard_deadline_kills_a_step_that_ignores_its_timeout(batch):
    assert state(batch, "stubborn") == "failed"
    log = batch.api.task_log("StubbornFlow", batch.runs["stubborn"], "stuck")
    assert "stuck step running" in log
    assert "ran past its deadline" in log
    ti = [t for t in batch.tis("stubborn") if t["task_id"] == "stuck"][0]
    assert ti["state"] == "failed" and ti["duration"] < 3 + 2 * GRACE


def test_cancelling_a_running_task_kills_its_step(batch):
    from metaflow_services.spec import run_id_for

    api = batch.api
    run_id = api.trigger("SleepyFlow", run_id="sleepy__%s__%d" % (batch.executor, time.time()))
    harness.wait_for(lambda: "sleeping" in api.task_log("SleepyFlow", run_id, "sleep"), 300,
                     "the sleep step to start", interval=2)
    mf_run = run_id_for("SleepyFlow", run_id)
    pid = int(re.search(r"sleeping pid=(\d+)", api.task_log("SleepyFlow", run_id, "sleep")).group(1))
    assert _step_alive(batch.executor, mf_run, pid)
    api.patch("/api/v2/dags/SleepyFlow/dagRuns/%s/taskInstances/sleep" % run_id,
              {"new_state": "failed"})
    harness.wait_for(lambda: not _step_alive(batch.executor, mf_run, pid), 90,
                     "the cancelled step to be killed", interval=1)
    assert api.wait_for_run("SleepyFlow", run_id, timeout=120) == "failed"


def test_cancelling_a_run_kills_every_split_of_its_ranges(batch):
    """Six splits in four ranges (two per task slot): each range's first split
    sleeps; marking the run failed kills all of them, and the ranges' other
    splits never start."""
    api = batch.api
    run_id = api.trigger("SleepyRangeFlow", run_id="ranges__%s__%d" % (batch.executor, time.time()))

    def sleeping():
        found = {}
        for ti in api.task_instances("SleepyRangeFlow", run_id):
            if ti["task_id"] == "sleep" and ti["state"] == "running":
                log = api.task_log("SleepyRangeFlow", run_id, "sleep", 1, ti["map_index"])
                found.update({int(i): int(p) for i, p in
                              re.findall(r"split (\d+) sleeping pid=(\d+)", log)})
        return found

    harness.wait_for(lambda: sorted(sleeping()) == [0, 1, 3, 4], 300,
                     "the first split of every range to start", interval=2)
    pids = sleeping()
    api.patch("/api/v2/dags/SleepyRangeFlow/dagRuns/%s" % run_id, {"state": "failed"})
    if batch.executor == "docker":  # stopped and removed, not left exited
        harness.wait_for(lambda: not _containers("metaflow-services.airflow-run-id=" + run_id), 90,
                         "the ranges' containers to be removed", interval=1)
    else:
        harness.wait_for(lambda: not any(process_running(p) for p in pids.values()), 90,
                         "every split's process to be killed", interval=1)
    time.sleep(5)
    assert sorted(sleeping()) == []
    logs = "".join(api.task_log("SleepyRangeFlow", run_id, "sleep", 1, ti["map_index"])
                   for ti in api.task_instances("SleepyRangeFlow", run_id)
                   if ti["task_id"] == "sleep")
    assert "split 2 sleeping" not in logs and "split 5 sleeping" not in logs


def _containers(label):
    """Step containers with this label, running or exited."""
    return subprocess.run(["docker", "ps", "-aq", "--filter", "label=metaflow-services=step",
                           "--filter", "label=" + label],
                          stdout=subprocess.PIPE, text=True, check=True).stdout.strip()


def _step_alive(executor, mf_run_id, pid):
    if executor == "docker":
        out = subprocess.run(["docker", "ps", "-q", "--filter",
                              "label=metaflow-services.pathspec=SleepyFlow/%s/sleep/t-0" % mf_run_id],
                             stdout=subprocess.PIPE, text=True, check=True).stdout
        return bool(out.strip())
    # The step is a fork of the warm process: its command line is the warm
    # process's; it printed its pid.
    return process_running(pid)
