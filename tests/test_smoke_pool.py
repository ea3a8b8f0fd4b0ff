"""The smoke test's own pool (issue 18), on the tests' real Airflow: a DAG
compiled with --pool puts every task in that pool, and what the smoke test
says while it waits is read from Airflow's pool API as it answers."""

from __future__ import annotations

import pytest

from support import FLOWS, compile_flow

pytestmark = pytest.mark.e2e


def test_a_pooled_dag_and_what_the_smoke_test_says_while_it_waits(airflow):
    from metaflow_services.airflow_client import AirflowClient
    from metaflow_services.smoke import SMOKE_POOL, _waiting_for

    api = airflow.api()
    client = AirflowClient(airflow.USER, airflow.password, url=airflow.url)
    if client.session.get(airflow.url + "/api/v2/pools/" + SMOKE_POOL, timeout=30).status_code \
            == 404:
        client.request("POST", "/api/v2/pools", json={"name": SMOKE_POOL, "slots": 1})
    compile_flow(FLOWS / "single_step_flow.py", airflow.dags,
                 extra_args=("--dag-id", "PooledSingleStep", "--pool", SMOKE_POOL))
    api.wait_for_dag("PooledSingleStep")
    tasks = client.request("GET", "/api/v2/dags/PooledSingleStep/tasks")["tasks"]
    assert tasks and {t["pool"] for t in tasks} == {SMOKE_POOL}

    line = _waiting_for(client, "queued", [{"task_id": "only", "state": "scheduled"}])
    assert "waiting for its next task to start" in line
    assert "its own pool %s has 1 of 1 slots free" % SMOKE_POOL in line
    line = _waiting_for(client, "running", [{"task_id": "only", "state": "running"}])
    assert line.startswith("still running: only")
