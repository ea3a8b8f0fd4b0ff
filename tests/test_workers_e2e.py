"""Worker machines through Airflow's Edge executor, end to end on this host:
a real Airflow 3.3 (api-server, scheduler, dag-processor on PostgreSQL) with
the Edge executor enabled, and two real `airflow edge worker` processes, each
in its own PID namespace so that killing one is a machine dying (the worker,
its task supervisor and the step all at once). They share this host's DAG
folder and reach Airflow over HTTP, as worker VMs reach the main VM.

Checked: a foreach's tasks spread over both workers (from Metaflow's task
metadata), a step routed to a queue only one worker serves runs there, and a
worker killed in the middle of a task: the task is retried on the other worker
as the next Metaflow attempt and the run succeeds.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

import harness
from support import BASE, FLOWS, METAFLOW_ENV, VENV_BIN, compile_flow

pytestmark = pytest.mark.e2e

EDGE = "airflow.providers.edge3.executors.EdgeExecutor"
QUEUES = {"default": {"cpu": 1, "memory": 4096, "gpu": 0, "workers": ["w1", "w2"]},
          "special": {"cpu": 1, "memory": 4096, "gpu": 0, "workers": ["w2"]}}


class Workers:
    def __init__(self, af: harness.Airflow):
        self.af = af
        self.procs = {}

    def start(self, name, queues):
        home = self.af.home.parent / ("edge-" + name)
        home.mkdir(exist_ok=True)
        env = self.af.env({"AIRFLOW_HOME": str(home), "MFS_WORKER_NAME": name,
                           "MFS_EXECUTOR": "subprocess"})
        # Its own PID namespace: SIGKILL to unshare takes every process with it.
        argv = ["unshare", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc", "--",
                str(VENV_BIN / "airflow"), "edge", "worker", "-q", queues, "-c", "1",
                "--edge-hostname", name]
        self.procs[name] = harness.Process("edge-" + name, argv, env, home, cwd=str(home))
        harness.wait_for(lambda: self.state(name) == "idle", 120, "edge worker %s" % name)

    def state(self, name):
        p = self.procs[name]
        if not p.alive():
            raise RuntimeError("edge worker %s exited:\n%s" % (name, p.tail()))
        rows = self.af.postgres.query(
            self.af.db, "SELECT state FROM edge_worker WHERE worker_name = '%s'" % name)
        return rows[0][0] if rows else None

    def running(self, dag_id, task_id):
        """{worker: try_number} of the edge jobs of this task now running."""
        return dict(self.af.postgres.query(
            self.af.db, "SELECT edge_worker, try_number FROM edge_job WHERE dag_id = '%s' "
            "AND task_id = '%s' AND state = 'running'" % (dag_id, task_id)))

    def crash(self, name):
        p = self.procs[name]
        os.kill(p.proc.pid, 9)
        p.proc.wait(timeout=30)

    def stop(self):
        for p in self.procs.values():
            p.stop()


@pytest.fixture(scope="module")
def edge(postgres, seaweedfs):
    if subprocess.run(["unshare", "--pid", "--fork", "--mount", "--mount-proc", "true"],
                      capture_output=True).returncode != 0:
        pytest.fail("these tests need root (unshare --pid --mount) to run edge workers as "
                    "separate machines")
    queues = json.dumps(QUEUES)
    af = harness.Airflow(BASE / "edge", postgres, dict(METAFLOW_ENV), db="airflow_edge",
                         airflow_env={
                             "AIRFLOW__CORE__EXECUTOR": "LocalExecutor," + EDGE,
                             "AIRFLOW__EDGE__API_ENABLED": "True",
                             "AIRFLOW__EDGE__JOB_POLL_INTERVAL": "2",
                             "AIRFLOW__EDGE__HEARTBEAT_INTERVAL": "5",
                             # Notice a dead worker's task within a minute
                             # (Airflow's default: 5 minutes).
                             "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
                             "MFS_WORKER_QUEUES": queues,
                         })
    (BASE / "edge").mkdir(parents=True, exist_ok=True)
    af.airflow_env["AIRFLOW__EDGE__API_URL"] = af.url + "/edge_worker/v1/rpcapi"
    af.start({"MFS_EXECUTOR": "subprocess"})
    workers = Workers(af)
    try:
        workers.start("w1", "default")
        workers.start("w2", "default,special")
        compile_flow(FLOWS / "spread_flow.py", af.dags,
                     env=dict(METAFLOW_ENV, MFS_WORKER_QUEUES=queues))
        api = af.api()
        api.wait_for_dag("SpreadFlow")
        yield af, api, workers
    finally:
        workers.stop()
        af.stop()


def metaflow_run(dag_id, airflow_run_id):
    from metaflow import Run

    from metaflow_services.spec import run_id_for

    return Run("SpreadFlow/%s" % run_id_for(dag_id, airflow_run_id))


def worker_of(task):
    return {m.name: m.value for m in task.metadata}["mfs-worker"]


def test_tasks_spread_over_workers_and_a_routed_step_runs_on_its_queue(edge):
    af, api, workers = edge
    run_id = api.trigger("SpreadFlow", {"width": 6})
    assert api.wait_for_run("SpreadFlow", run_id, timeout=900) == "success", \
        api.task_instances("SpreadFlow", run_id)
    tis = api.task_instances("SpreadFlow", run_id)
    assert {(t["task_id"], t["queue"]) for t in tis} >= {("body", "default"),
                                                          ("special", "special")}
    run = metaflow_run("SpreadFlow", run_id)
    assert run.successful and run.data.total == sum(i * i for i in range(6))
    body = {worker_of(t) for t in run["body"]}
    assert body == {"w1", "w2"}, body
    assert worker_of(run["special"].task) == "w2"


def what_happened(af, api, run_id):
    """Each task instance's state, try and host, and the edge jobs: what a
    failure of the test needs to be understood from a CI log."""
    tis = ["%s: %s (try %s on %s)" % (t["task_id"], t["state"], t.get("try_number"),
                                      t.get("hostname")) for t in
           api.task_instances("SpreadFlow", run_id)]
    try:
        jobs = af.postgres.query(af.db, "SELECT task_id, try_number, edge_worker, state FROM "
                                        "edge_job WHERE run_id = '%s' ORDER BY task_id, "
                                        "try_number" % run_id)
    except Exception as e:  # noqa: BLE001 - the test's own failure matters more
        jobs = "unreadable (%s)" % e
    return "task instances: %s; edge jobs: %s" % ("; ".join(tis), jobs)


def test_a_worker_dying_mid_task_is_retried_on_another_as_the_next_attempt(edge):
    af, api, workers = edge
    run_id = api.trigger("SpreadFlow", {"width": 1, "hang": 600})
    deadline = time.time() + 300
    while True:
        running = workers.running("SpreadFlow", "slow")
        if running:
            break
        assert time.time() < deadline, api.task_instances("SpreadFlow", run_id)
        time.sleep(1)
    # The worker that took the task, as first seen (a second look can miss
    # the job row while Airflow updates it).
    ((victim, try_number),) = running.items()
    time.sleep(5)  # the step is sleeping in its first attempt
    workers.crash(victim)
    t0 = time.time()
    state = api.wait_for_run("SpreadFlow", run_id, timeout=600)
    recovered = time.time() - t0
    assert state == "success", what_happened(af, api, run_id)
    survivor = ({"w1", "w2"} - {victim}).pop()
    slow = metaflow_run("SpreadFlow", run_id)["slow"].task
    assert slow.current_attempt == 1          # Metaflow's attempt = Airflow's try - 1
    assert slow.data.ran_on == survivor
    print("worker %s killed in try %s; the run finished on %s %.0f s later"
          % (victim, try_number, survivor, recovered))
