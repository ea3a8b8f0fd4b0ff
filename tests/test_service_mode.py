"""Runs recorded in a real Metaflow metadata service and read back through it,
through its UI backend (what the Metaflow UI shows) and through the Metaflow
client, as on the deployed stack (compose/metaflow.yaml).

The service and the UI backend are the upstream metaflow-service 2.5.1
(the test image mfs-metadata:test, built from the vendored source by
scripts/prepare), started by the `metaflow_service` fixture on the tests'
PostgreSQL and SeaweedFS. The flows run through the session's real Airflow
with METAFLOW_DEFAULT_METADATA=service, in step containers (the docker
executor, the deploy's default; host network). The subprocess executor runs
the same Metaflow commands with the same metadata settings; it is left out
here for CI's time (test_e2e runs it with MFS_SLOW_TESTS=1).
"""

from __future__ import annotations

import time

import pytest
import requests

import harness
from support import BASE, FLOWS, GRACE, MFLOCAL, TEST_USER, compile_flow, docker_available

pytestmark = [pytest.mark.service, pytest.mark.e2e]

STEP_IMAGE = "mfs-step:test"

# key -> (executor, dag id, trigger conf)
RUNS = {
    "linear": ("docker", "LinearFlow", {"count": 6}),
    "foreach": ("docker", "ForeachFlow", {"width": 3}),
    "retry": ("docker", "RetryCatchFlow", {}),
}


class ServiceRuns:
    def __init__(self, service, api):
        self.service = service
        self.api = api
        self.airflow_runs = {}  # key -> Airflow run id
        self.states = {}

    def dag_id(self, key):
        return RUNS[key][1]

    def run_id(self, key):
        """The Metaflow run id."""
        from metaflow_services.spec import run_id_for

        return run_id_for(self.dag_id(key), self.airflow_runs[key])

    def path(self, key):
        return "/flows/%s/runs/%s" % (self.dag_id(key), self.run_id(key))


@pytest.fixture(scope="module")
def runs(airflow, metaflow_service):
    svc_env = {"METAFLOW_DEFAULT_METADATA": "service", "METAFLOW_SERVICE_URL": metaflow_service.url}
    for f in ("linear_flow.py", "foreach_flow.py", "retry_catch_flow.py"):
        compile_flow(FLOWS / f, airflow.dags, env=svc_env)
    api = airflow.api()
    for dag_id in sorted({d for _, d, _ in RUNS.values()}):
        api.wait_for_dag(dag_id)
    r = ServiceRuns(metaflow_service, api)
    before = dict(airflow.worker_env)
    if not docker_available():
        pytest.fail("the docker executor needs a Docker engine (scripts/host-setup starts one)")
    # Metaflow's debug switches log every s3op and sidecar process a task
    # starts (test_split_tasks_upload_and_heartbeat_from_their_own_process).
    airflow.start_scheduler(harness.worker_env(
        "docker", BASE, MFLOCAL, STEP_IMAGE, MFS_TIMEOUT_GRACE_SECONDS=str(GRACE),
        METAFLOW_DEBUG_S3CLIENT="1", METAFLOW_DEBUG_SIDECAR="1", **svc_env))
    for key, (_, dag_id, conf) in RUNS.items():
        r.airflow_runs[key] = api.trigger(dag_id, conf, run_id="svc_%s__%d" % (key, time.time()))
    for key in RUNS:
        r.states[key] = api.wait_for_run(r.dag_id(key), r.airflow_runs[key], timeout=600)
    yield r
    # Later modules' runs record their metadata locally again.
    airflow.start_scheduler(before)


@pytest.fixture(scope="module")
def client(metaflow_service):
    """The Metaflow client of this process, reading from the service (as a
    laptop with `fab client-config`'s profile does); back to the default after."""
    from metaflow import default_metadata, metadata, namespace

    metadata("service@%s" % metaflow_service.url)
    namespace(None)
    yield
    default_metadata()


def ok(runs, key):
    """The run succeeded in Airflow; on failure, the failed tasks' logs."""
    if runs.states[key] != "success":
        dag_id, run_id = runs.dag_id(key), runs.airflow_runs[key]
        lines = ["DAG run %s/%s ended %s" % (dag_id, run_id, runs.states[key])]
        for ti in runs.api.task_instances(dag_id, run_id):
            if ti["state"] not in ("success", "skipped"):
                lines.append("--- %s[%s] %s" % (ti["task_id"], ti["map_index"], ti["state"]))
                try:
                    lines.append(runs.api.task_log(dag_id, run_id, ti["task_id"],
                                                   max(ti["try_number"], 1),
                                                   ti["map_index"])[-3000:])
                except Exception as e:
                    lines.append("(no log: %s)" % e)
        pytest.fail("\n".join(lines))
    return runs.path(key)


def metadata_api(runs, path, **params):
    """GET from the metadata service (what the Metaflow client reads)."""
    r = requests.get(runs.service.url + path, params=params, timeout=30)
    r.raise_for_status()
    return r.json()


def ui_api(runs, path, **params):
    """GET from the UI backend (what the Metaflow UI shows): its `data`."""
    r = requests.get(runs.service.ui_url + "/api" + path, params=params, timeout=120)
    r.raise_for_status()
    return r.json()["data"]


def by_attempt(metadata, field):
    return {int(m["tags"][0].split(":")[1]): m["value"] for m in metadata
            if m["field_name"] == field and m["tags"] and m["tags"][0].startswith("attempt_id:")}


# --------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["linear"])
def test_run_registered_under_its_id_with_steps_tasks_and_tags(runs, key):
    path = ok(runs, key)
    airflow_run = runs.airflow_runs[key]
    run = metadata_api(runs, path)
    assert run["flow_id"] == "LinearFlow"
    assert run["run_number"] == runs.run_id(key)  # the string id af-..., as the service keeps it
    assert run["user_name"] == TEST_USER
    assert {"airflow_dag_id:LinearFlow", "airflow_run_id:%s" % airflow_run} <= set(run["tags"])
    assert {"runtime:airflow3", "user:%s" % TEST_USER} <= set(run["system_tags"])
    steps = {s["step_name"] for s in metadata_api(runs, path + "/steps")}
    assert steps == {"_parameters", "start", "a", "b", "end"}
    for step in ("start", "a", "b", "end"):
        tasks = metadata_api(runs, path + "/steps/%s/tasks" % step)
        assert [(t["task_id"], t["run_number"]) for t in tasks] == [("t-0", runs.run_id(key))]
    # The Metaflow UI lists the run as completed, under the same id and tags.
    listed = {r["run_id"]: r for r in ui_api(runs, "/flows/LinearFlow/runs", _limit=100)}
    ui_run = listed[runs.run_id(key)]
    assert ui_run["status"] == "completed"
    assert ui_run["run"] == runs.run_id(key)
    assert "airflow_run_id:%s" % airflow_run in ui_run["tags"]


@pytest.mark.parametrize("key,step,task", [("linear", "start", "t-0"),
                                           ("linear", "b", "t-0"),
                                           ("foreach", "plus_one", "t-2"),
                                           ("foreach", "square", "t-1")])
def test_task_metadata_names_the_airflow_task_that_ran_it(runs, key, step, task):
    path = ok(runs, key)
    meta = metadata_api(runs, path + "/steps/%s/tasks/%s/metadata" % (step, task))
    fields = {m["field_name"]: m["value"] for m in meta}
    assert fields["airflow-dag-id"] == runs.dag_id(key)
    assert fields["airflow-run-id"] == runs.airflow_runs[key]
    assert fields["mfs-executor"] == RUNS[key][0]
    assert fields["attempt_ok"] == "True"
    # That task instance exists in Airflow, ran once and succeeded.
    tis = {(ti["task_id"], ti["map_index"]): ti
           for ti in runs.api.task_instances(runs.dag_id(key), runs.airflow_runs[key])}
    ti = tis[(fields["airflow-task-id"], int(fields["airflow-map-index"]))]
    assert ti["state"] == "success"
    assert str(ti["try_number"]) == fields["airflow-try-number"] == "1"
    assert fields["airflow-task-id"].split(".")[-1] == step


@pytest.mark.parametrize("key", ["foreach"])
def test_foreach_tasks_per_split(runs, client, key):
    from metaflow import Run

    path = ok(runs, key)
    width = RUNS[key][2]["width"]
    split_ids = {"t-%d" % i for i in range(width)}
    for step, expected in (("start", {"t-0"}), ("square", split_ids), ("plus_one", split_ids),
                           ("join", {"t-0"}), ("end", {"t-0"})):
        tasks = metadata_api(runs, path + "/steps/%s/tasks" % step)
        assert {t["task_id"] for t in tasks} == expected, step
        # The UI shows each as one completed attempt.
        shown = ui_api(runs, path + "/steps/%s/tasks" % step, _limit=100)
        assert sorted((t["task_name"], t["attempt_id"], t["status"]) for t in shown) == \
            sorted((t, 0, "completed") for t in expected), step
    run = Run("ForeachFlow/%s" % runs.run_id(key))
    assert run.successful
    # Task t-i ran split i.
    squares = {t.id: (t.index, t.data.value) for t in run["square"]}
    assert squares == {"t-%d" % i: (i, i * i) for i in range(width)}
    assert run["join"].task.data.values == [i * i + 1 for i in range(width)]


def test_split_tasks_upload_and_heartbeat_from_their_own_process(runs, client):
    """A split's task is a fork of its container's warm process. Metaflow
    would hand its artifacts (more than ten) to a new Python, s3op, and send
    its heartbeats from another, a sidecar: each imports Metaflow again, more
    CPU than the split's own work. Both stay in the task's process; the
    artifacts and the heartbeat still reach S3 and the metadata service."""
    from metaflow import Run

    path = ok(runs, "foreach")
    dag_id, airflow_run = runs.dag_id("foreach"), runs.airflow_runs["foreach"]
    square = [ti for ti in runs.api.task_instances(dag_id, airflow_run)
              if ti["task_id"] == "square"]
    # Metaflow's debug logging is on in the step containers (it says so when
    # the warm process imports it), so any such process would be logged.
    assert all("debug[options" in runs.api.task_log(dag_id, airflow_run, "square",
                                                    ti["try_number"], ti["map_index"])
               for ti in square), square
    tasks = {t["task_id"]: t for t in metadata_api(runs, path + "/steps/square/tasks")}
    for task in Run("ForeachFlow/%s" % runs.run_id("foreach"))["square"]:
        # Past Metaflow's threshold for s3op, with its own (hidden) artifacts.
        stored = metadata_api(runs, path + "/steps/square/tasks/%s/artifacts" % task.id)
        assert len(stored) > 10, stored
        assert task.data.value == task.index ** 2
        log = task.stderr
        assert "s3op" not in log and "sidecar_worker" not in log, log
        assert tasks[task.id]["last_heartbeat_ts"], tasks[task.id]


def test_retried_attempts_recorded_in_the_service(runs, client):
    from metaflow import Run, Task

    path = ok(runs, "retry")
    for step in ("start", "flaky"):
        meta = metadata_api(runs, path + "/steps/%s/tasks/t-0/metadata" % step)
        # Attempt 0 failed, attempt 1 (Airflow's second try) succeeded.
        assert by_attempt(meta, "attempt_ok") == {0: "False", 1: "True"}, step
        assert by_attempt(meta, "airflow-try-number") == {0: "1", 1: "2"}, step
        shown = ui_api(runs, path + "/steps/%s/tasks" % step, _limit=100)
        assert sorted((t["task_name"], t["attempt_id"], t["status"]) for t in shown) == \
            [("t-0", 0, "failed"), ("t-0", 1, "completed")], step
    # One Metaflow task per step, one parameters task although start ran twice.
    assert [t["task_id"] for t in metadata_api(runs, path + "/steps/start/tasks")] == ["t-0"]
    assert [t["task_id"] for t in metadata_api(runs, path + "/steps/_parameters/tasks")] == \
        ["params"]
    # The failed attempt's traceback is in its log; the retry's log is clean.
    first = "\n".join(r["line"] for r in ui_api(
        runs, path + "/steps/flaky/tasks/t-0/logs/err", attempt_id=0))
    assert "RuntimeError: flaky fails on its first attempt" in first
    second = "\n".join(r["line"] for r in ui_api(
        runs, path + "/steps/flaky/tasks/t-0/logs/err", attempt_id=1))
    assert "attempt 1 starting" in second and "RuntimeError" not in second
    run = Run("RetryCatchFlow/%s" % runs.run_id("retry"))
    assert run.successful
    flaky = run["flaky"].task
    assert flaky.current_attempt == 1 and flaky.data.flaky_attempt == 1
    assert not Task(flaky.pathspec, attempt=0).successful
    join = run["join"].task.data
    assert join.flaky_attempt == 1
    assert "caught by @catch" in join.raised  # @catch's value recorded as an artifact


@pytest.mark.parametrize("key", ["linear"])
def test_logs_read_through_the_ui_backend_and_the_client(runs, client, key):
    from metaflow import Run

    path = ok(runs, key)
    out = [r["line"] for r in ui_api(runs, path + "/steps/start/tasks/t-0/logs/out")]
    assert "start stdout line" in out
    err = [r["line"] for r in ui_api(runs, path + "/steps/start/tasks/t-0/logs/err")]
    assert "start stderr line" in err
    doubled = RUNS[key][2]["count"] * 2
    end = [r["line"] for r in ui_api(runs, path + "/steps/end/tasks/t-0/logs/out")]
    assert "done %d" % doubled in end
    run = Run("LinearFlow/%s" % runs.run_id(key))
    assert "start stdout line" in run["start"].task.stdout
    assert "start stderr line" in run["start"].task.stderr


@pytest.mark.parametrize("key", ["linear"])
def test_artifacts_read_through_the_client_and_the_ui_backend(runs, client, key):
    from metaflow import Flow, Run

    path = ok(runs, key)
    count = RUNS[key][2]["count"]
    run = Run("LinearFlow/%s" % runs.run_id(key))
    assert run.successful
    assert run["start"].task.data.seen["count"] == count
    assert run["b"].task.data.doubled == count * 2
    assert run["a"].task.data.env_value == "from-environment-decorator"
    assert {"airflow_dag_id:LinearFlow", "airflow_run_id:%s" % runs.airflow_runs[key]} <= run.tags
    # The client finds the run among the flow's runs by its Airflow tags.
    tagged = list(Flow("LinearFlow").runs("airflow_run_id:%s" % runs.airflow_runs[key]))
    assert [r.id for r in tagged] == [runs.run_id(key)]
    # The UI shows the artifacts' values (postprocess=true reads them from S3).
    arts = {a["name"]: a for a in ui_api(runs, path + "/steps/b/tasks/t-0/artifacts",
                                         postprocess="true", _limit=100)}
    assert arts["doubled"]["content"] == str(count * 2)
    assert arts["count"]["content"] == str(count)
    assert arts["doubled"]["run_id"] == runs.run_id(key) and arts["doubled"]["task_name"] == "t-0"


def test_ui_backend_draws_the_run_graph(runs):
    path = ok(runs, "foreach")
    # The Metaflow UI draws a run's graph from what the run recorded (the
    # parameters task's _graph_info): a foreach of two steps, then the join.
    dag = ui_api(runs, path + "/dag")
    assert dag["graph_structure"] == ["start", [["square", "plus_one"]], "join", "end"]
    assert dag["steps"]["start"]["type"] == "split-foreach"
    assert dag["steps"]["start"]["foreach_artifact"] == "items"
    assert dag["steps"]["join"]["type"] == "join"
