"""The next step of a run is queued as soon as the step before it ends, not
when Airflow's scheduler finishes its idle sleep: the stack and the tests run
Airflow's scheduler through metaflow_services/scheduler.py, which ends that
sleep when a LocalExecutor worker reports a finished task.

The scheduler here sleeps up to 30 s when idle (its timers also wake it, at
least every 30 s: intervals raised below), so without the wake-up each step
would wait 15 s on average for the one before it to be noticed. Airflow's
supervisor also reported every other task's end 5 s late (it waited on the
task's closed sockets, not its exit): under 4 s, both are fixed."""

from __future__ import annotations

import datetime

import pytest

import harness
from support import BASE, FLOWS, MFLOCAL, compile_flow, docker_available

pytestmark = pytest.mark.e2e

LONG_IDLE = {
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "30",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "60",
    "AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL": "60",
}


def _ts(value):
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def test_a_step_is_queued_when_the_one_before_it_ends(airflow):
    assert docker_available(), "the docker executor needs a Docker engine (scripts/host-setup)"
    compile_flow(FLOWS / "relay_flow.py", airflow.dags)
    api = airflow.api()
    api.wait_for_dag("RelayFlow")
    before = dict(airflow.worker_env)
    airflow.start_scheduler(dict(harness.worker_env("docker", BASE, MFLOCAL), **LONG_IDLE))
    try:
        run_id = api.trigger("RelayFlow", {})
        # The run itself waits for the scheduler's sleep (up to 30 s): only a
        # task's end wakes it.
        state = api.wait_for_run("RelayFlow", run_id, timeout=600)
    finally:
        airflow.start_scheduler(before)
    tis = sorted(api.task_instances("RelayFlow", run_id), key=lambda ti: _ts(ti["start_date"]))
    assert state == "success", tis
    assert [ti["task_id"] for ti in tis] == ["start", "b", "c", "d", "end"]
    gaps = [round(_ts(nxt["queued_when"]) - _ts(prev["end_date"]), 2)
            for prev, nxt in zip(tis, tis[1:])]
    assert max(gaps) < 4, "seconds from a step's end to the next one queued: %s" % gaps
