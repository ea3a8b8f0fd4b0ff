"""The smoke test of a deployed stack (`metaflow-services doctor
--smoke-test`, run by `fab deploy`): a hello flow compiled into the dags
folder, triggered through Airflow's REST API, followed until it ends, then
read back through the Metaflow client (run status, metadata and artifacts).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from .airflow_client import AirflowClient
from .checks import Check
from .spec import run_id_for

SMOKE_DAG_ID = "metaflow_services_smoke_test"
# Its tasks' own pool, whose one slot Airflow's parallelism keeps free of user
# work (default_pool holds the rest): the smoke test of a deploy, upgrade or
# restore never waits behind a busy platform (compose/compose.yaml).
SMOKE_POOL = "metaflow_services_smoke"
SMOKE_FLOW = "MetaflowServicesSmokeTest"
SMOKE_FLOW_SOURCE = '''\
"""Deployed by `fab deploy` to check the platform end to end: the run starts a
step container, stores artifacts in the object store and records metadata."""
from metaflow import FlowSpec, step


class MetaflowServicesSmokeTest(FlowSpec):
    @step
    def start(self):
        import socket

        self.greeting = "hello from %s" % socket.gethostname()
        self.next(self.end)

    @step
    def end(self):
        self.checked = self.greeting.startswith("hello")
        print(self.greeting)


if __name__ == "__main__":
    MetaflowServicesSmokeTest()
'''


def smoke_test(user, password, timeout=600, say=print) -> Check:
    """The smoke test as Airflow user `user`; `say` hears its progress."""
    t0 = time.time()
    failed = _compile_flow(say, t0)
    if failed:
        return failed
    client = AirflowClient(user, password)
    failed = _wait_until_loaded(client)
    if failed:
        return failed
    airflow_run = _trigger(client, say)
    state, tis = _follow(client, airflow_run, timeout, say, t0)
    if state not in ("success", "failed"):
        return Check("smoke-test", False, "the run is still %s after %ds" % (state, timeout),
                     "docker compose logs airflow-scheduler")
    if state != "success":
        failed = [t["task_id"] for t in tis if t.get("state") != "success"]
        return Check("smoke-test", False, "the run %s failed (tasks: %s)"
                     % (airflow_run, ", ".join(failed)),
                     "open it in the Airflow UI (DAG %s) for the task logs" % SMOKE_DAG_ID)
    return _check_metaflow_run(airflow_run, t0)


def _compile_flow(say, t0):
    """With `metaflow-services compile`, as a user would; a failed Check if it fails."""
    dags = os.environ.get("MFS_DAGS_FOLDER", "/opt/airflow/dags")
    with tempfile.TemporaryDirectory(prefix="mfs-smoke-") as tmp:
        flow_file = os.path.join(tmp, "smoke_test_flow.py")
        with open(flow_file, "w") as f:
            f.write(SMOKE_FLOW_SOURCE)
        env = dict(os.environ, METAFLOW_USER=os.environ.get("METAFLOW_USER") or "smoke-test")
        proc = subprocess.run([sys.executable, "-m", "metaflow_services.cli", "compile", flow_file,
                               "-o", dags, "--dag-id", SMOKE_DAG_ID, "--pool", SMOKE_POOL],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            return Check("smoke-test", False, "compiling the hello flow failed: %s"
                         % proc.stdout.strip()[-800:], "see the output above")
    say("compiled %s into %s/%s.py (%.0fs)" % (SMOKE_FLOW, dags, SMOKE_DAG_ID, time.time() - t0))
    return None


def _wait_until_loaded(client, limit=180):
    """Until the dag-processor has parsed the DAG file; a failed Check (with
    the import error, if any) after `limit` seconds."""
    deadline = time.time() + limit
    while True:
        try:
            client.request("GET", "/api/v2/dags/%s" % SMOKE_DAG_ID)
            return None
        except RuntimeError:
            if time.time() > deadline:
                errors = client.request("GET", "/api/v2/importErrors").get("import_errors", [])
                mine = [e for e in errors if SMOKE_DAG_ID in e.get("filename", "")]
                return Check("smoke-test", False, "Airflow did not load the DAG within %ds%s"
                             % (limit, ": %s" % mine[0].get("stack_trace", "")[-500:]
                                if mine else ""),
                             "docker compose logs airflow-dag-processor")
            time.sleep(2)


def _trigger(client, say):
    client.request("PATCH", "/api/v2/dags/%s" % SMOKE_DAG_ID, json={"is_paused": False})
    airflow_run = "smoke__%s" % time.strftime("%Y%m%dT%H%M%S")
    client.request("POST", "/api/v2/dags/%s/dagRuns" % SMOKE_DAG_ID,
                   json={"logical_date": None, "dag_run_id": airflow_run, "conf": {}})
    say("triggered %s run %s" % (SMOKE_DAG_ID, airflow_run))
    return airflow_run


def _follow(client, airflow_run, timeout, say, t0):
    """The run's state and task instances once it ends or `timeout` passes,
    saying each change of its tasks' states."""
    deadline = time.time() + timeout
    last, changed = None, time.time()
    while True:
        state = client.request("GET", "/api/v2/dags/%s/dagRuns/%s"
                               % (SMOKE_DAG_ID, airflow_run))["state"]
        tis = client.request("GET", "/api/v2/dags/%s/dagRuns/%s/taskInstances"
                             % (SMOKE_DAG_ID, airflow_run)).get("task_instances", [])
        progress = ", ".join("%s %s" % (t["task_id"], t.get("state") or "none")
                             for t in sorted(tis, key=lambda t: t["task_id"]))
        if progress != last:
            say("%3.0fs  %s" % (time.time() - t0, progress or state))
            last, changed = progress, time.time()
        elif time.time() - changed > 20:
            say("%3.0fs  %s" % (time.time() - t0, _waiting_for(client, state, tis)))
            changed = time.time()
        if state in ("success", "failed") or time.time() > deadline:
            return state, tis
        time.sleep(3)


def _waiting_for(client, state, tis):
    """What the run waits for, said when nothing changed for a while."""
    if any(t.get("state") == "running" for t in tis):
        names = [t["task_id"] for t in tis if t.get("state") == "running"]
        return "still running: %s (a step container starting or working)" % ", ".join(names)
    running = client.request("GET", "/api/v2/dags/~/dagRuns/~/taskInstances",
                             params={"state": "running", "limit": 1}).get("total_entries", 0)
    pool = client.request("GET", "/api/v2/pools/%s" % SMOKE_POOL)
    return ("run %s, waiting for its next task to start: %d tasks of the platform running; "
            "its own pool %s has %s of %s slots free" % (state, running, SMOKE_POOL,
                                                        pool.get("open_slots"), pool.get("slots")))


def _check_metaflow_run(airflow_run, t0):
    """What Metaflow recorded of the run: its status and artifacts."""
    from metaflow import Run, namespace

    namespace(None)
    pathspec = "%s/%s" % (SMOKE_FLOW, run_id_for(SMOKE_DAG_ID, airflow_run))
    run = Run(pathspec)
    if not run.successful or run.data.checked is not True or \
            not str(run.data.greeting).startswith("hello"):
        return Check("smoke-test", False, "Metaflow run %s: successful=%s, artifacts %r"
                     % (pathspec, run.successful, getattr(run.data, "greeting", None)),
                     "check the object store and the metadata")
    return Check("smoke-test", True, "run %s succeeded in %.0fs; Metaflow run %s has its "
                 "artifacts (%r)" % (airflow_run, time.time() - t0, pathspec, run.data.greeting))
