"""Runs recorded in a real Metaflow metadata service, logs read through the UI
backend. The service is not obtainable on the CI machines (its images are not
reachable and it is not on PyPI), so these tests run only when pointed at one:

    MFS_TEST_METADATA_URL=http://127.0.0.1:8080     (metadata service)
    MFS_TEST_UI_URL=http://127.0.0.1:8083           (UI backend, for the logs test)

The service must read the same S3 bucket as these tests (SeaweedFS started by
the tests: conftest.SEAWEED has its endpoint and keys).
"""

from __future__ import annotations

import os
import time

import pytest
import requests

import harness
from support import BASE, FLOWS, METAFLOW_ENV, compile_flow

METADATA_URL = os.environ.get("MFS_TEST_METADATA_URL")
UI_URL = os.environ.get("MFS_TEST_UI_URL")

pytestmark = [
    pytest.mark.service,
    pytest.mark.skipif(not METADATA_URL, reason="MFS_TEST_METADATA_URL is not set: no Metaflow "
                       "metadata service to test against (its images are not obtainable here)"),
]


@pytest.fixture(scope="module")
def service_runs(postgres, seaweedfs):
    env = dict(METAFLOW_ENV, METAFLOW_DEFAULT_METADATA="service",
               METAFLOW_SERVICE_URL=METADATA_URL)
    af = harness.Airflow(BASE / "service-mode", postgres, env, max_map_length=8,
                         db="airflow_service_mode")
    af.start({"MFS_EXECUTOR": "subprocess"})
    try:
        api = af.api()
        for f in ("linear_flow.py", "foreach_flow.py"):
            compile_flow(FLOWS / f, af.dags, env=env)
        runs = {}
        for dag_id, conf in (("LinearFlow", {}), ("ForeachFlow", {"width": 3})):
            api.wait_for_dag(dag_id)
            run_id = api.trigger(dag_id, conf, run_id="svc__%d" % time.time())
            assert api.wait_for_run(dag_id, run_id) == "success"
            from metaflow_services.spec import run_id_for

            runs[dag_id] = run_id_for(dag_id, run_id)
        yield runs
    finally:
        af.stop()


def get(path):
    r = requests.get(METADATA_URL.rstrip("/") + path, timeout=30)
    r.raise_for_status()
    return r.json()


def test_runs_and_tasks_registered_under_the_expected_ids(service_runs):
    run_id = service_runs["LinearFlow"]
    # Non-numeric ids are stored as names (run_id / task_name) by the service.
    run = get("/flows/LinearFlow/runs/%s" % run_id)
    assert run["run_id"] == run_id
    assert "airflow_dag_id:LinearFlow" in run["tags"]
    steps = {s["step_name"] for s in get("/flows/LinearFlow/runs/%s/steps" % run_id)}
    assert {"start", "a", "b", "end"} <= steps
    tasks = get("/flows/LinearFlow/runs/%s/steps/start/tasks" % run_id)
    assert [t["task_name"] for t in tasks] == ["t-0"]
    each = get("/flows/ForeachFlow/runs/%s/steps/square/tasks" % service_runs["ForeachFlow"])
    assert sorted(t["task_name"] for t in each) == ["t-0", "t-1", "t-2"]


def test_run_metadata_names_the_airflow_task(service_runs):
    run_id = service_runs["LinearFlow"]
    meta = get("/flows/LinearFlow/runs/%s/steps/start/tasks/t-0/metadata" % run_id)
    fields = {m["field_name"]: m["value"] for m in meta}
    assert fields["airflow-dag-id"] == "LinearFlow"
    assert fields["airflow-task-id"] == "start"


@pytest.mark.skipif(not UI_URL, reason="MFS_TEST_UI_URL is not set: no Metaflow UI backend")
def test_logs_readable_through_the_ui_backend(service_runs):
    run_id = service_runs["LinearFlow"]
    url = "%s/api/flows/LinearFlow/runs/%s/steps/start/tasks/t-0/logs/out" % (
        UI_URL.rstrip("/"), run_id)
    r = requests.get(url, timeout=60)
    if r.status_code == 404:  # UI backend without PATH_PREFIX=/api
        r = requests.get(url.replace("/api/", "/", 1), timeout=60)
    r.raise_for_status()
    assert "start stdout line" in r.text
