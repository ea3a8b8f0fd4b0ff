"""@trigger and @trigger_on_finish (issue 14) on the tests' real Airflow:
a successful run of one flow starts the flow waiting for it, which reads the
upstream run through current.trigger; an event published with
`metaflow-services publish` or the Python API starts the flow waiting for it
with parameters from its payload; and what the compiler refuses or warns
about (a cycle, a bad event name, a parameter no event sets)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time

import pytest

import harness
from support import BASE, FLOWS, MFLOCAL, VENV_BIN, compile_flow, two_step_flow

TRIGGERS = FLOWS / "triggers"


def write_flow(folder, name, decorator, imports="trigger_on_finish", param=""):
    path = folder / ("%s.py" % name.lower())
    # The template is indented by four spaces: so must every decorator line be.
    path.write_text(textwrap.dedent(two_step_flow(imp="Parameter, " + imports, name=name,
                                                  flow_deco=decorator.replace("\n", "\n    "),
                                                  param=param)))
    return path


def say(proc):
    return " ".join((proc.stdout + proc.stderr).split())


# -- what the compiler says ---------------------------------------------------


def test_a_cycle_of_trigger_on_finish_is_refused_naming_it(tmp_path, seaweedfs):
    out = tmp_path / "dags"
    first = compile_flow(write_flow(tmp_path, "PingFlow", '@trigger_on_finish(flow="PongFlow")'),
                         out)
    assert "no deployed flow emits metaflow.PongFlow.end yet" in say(first)
    assert (out / "PingFlow.py").exists(), "the DAG is written even though PongFlow is not there"
    proc = compile_flow(write_flow(tmp_path, "PongFlow", '@trigger_on_finish(flow="PingFlow")'),
                        out, check=False)
    text = say(proc)
    assert proc.returncode != 0
    assert "@trigger_on_finish makes a cycle: PongFlow -> PingFlow -> PongFlow" in text
    assert not (out / "PongFlow.py").exists()
    selfish = compile_flow(write_flow(tmp_path, "SelfFlow", '@trigger_on_finish(flow="SelfFlow")'),
                           out, check=False)
    assert "cycle: SelfFlow -> SelfFlow" in say(selfish)


def test_event_names_and_mappings_airflow_cannot_take_are_refused(tmp_path, seaweedfs):
    out = tmp_path / "dags"
    bad_name = compile_flow(write_flow(tmp_path, "SpaceFlow", '@trigger(event="has space")',
                                       imports="trigger"), out, check=False)
    assert bad_name.returncode != 0
    assert "@trigger event name 'has space' cannot name an Airflow asset" in say(bad_name)
    unknown = compile_flow(write_flow(
        tmp_path, "MapFlow", '@trigger(event={"name": "x.y", "parameters": {"nope": "f"}})',
        imports="trigger"), out, check=False)
    assert "maps the payload field 'f' of event x.y to the parameter nope, which the flow " \
           "does not have" in say(unknown)
    assert not out.exists() or not list(out.glob("*.py"))


def test_a_required_parameter_no_event_sets_is_refused(tmp_path, seaweedfs):
    flow = write_flow(tmp_path, "NeedyFlow", '@trigger_on_finish(flow="Upstream")',
                      param='day = Parameter("day", required=True)')
    proc = compile_flow(flow, tmp_path / "dags", check=False)
    assert proc.returncode != 0
    assert "the parameter day is required and has no default, but runs start from events" \
        in say(proc)


# -- runs on Airflow ---------------------------------------------------------------


@pytest.fixture(scope="module")
def deployed(airflow):
    airflow.start_scheduler(harness.worker_env("subprocess", BASE, MFLOCAL))
    api = airflow.api()
    for f in ("source_flow.py", "chained_flow.py", "event_flow.py"):
        compile_flow(TRIGGERS / f, airflow.dags)
    for dag_id in ("TriggerSourceFlow", "ChainedFlow", "EventFlow"):
        api.wait_for_dag(dag_id)
    return api


def wait_for_triggered_run(api, dag_id, after, timeout=300):
    """The first asset-triggered run of *dag_id* queued after *after*, once finished."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = api.get("/api/v2/dags/%s/dagRuns" % dag_id, limit=50)["dag_runs"]
        for r in runs:
            if r["run_type"] == "asset_triggered" and r["queued_at"] > after:
                return r["dag_run_id"], api.wait_for_run(dag_id, r["dag_run_id"],
                                                         timeout=max(5, deadline - time.time()))
        time.sleep(2)
    raise TimeoutError("no asset-triggered run of %s after %s" % (dag_id, after))


def now_iso(api):
    # Airflow's own clock, in its format (queued_at compares as a string).
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def metaflow_run(flow, dag_id, airflow_run_id):
    from metaflow import Run, namespace

    from metaflow_services.spec import run_id_for

    namespace(None)
    return Run("%s/%s" % (flow, run_id_for(dag_id, airflow_run_id)))


@pytest.mark.e2e
def test_a_finished_run_starts_the_flow_waiting_for_it(deployed):
    api = deployed
    before = now_iso(api)
    source_run = api.trigger("TriggerSourceFlow", {"size": 5}, run_id="src__%d" % time.time())
    assert api.wait_for_run("TriggerSourceFlow", source_run) == "success"
    chained_run, state = wait_for_triggered_run(api, "ChainedFlow", before)
    assert state == "success"
    upstream = metaflow_run("TriggerSourceFlow", "TriggerSourceFlow", source_run)
    run = metaflow_run("ChainedFlow", "ChainedFlow", chained_run)
    assert run.data.upstream_pathspec == upstream.pathspec
    assert run.data.upstream_rows == 5  # read through current.trigger.run
    assert run.data.event_name == "metaflow.TriggerSourceFlow.end"
    assert run.data.end_saw == upstream.pathspec
    triggers = json.loads(run["start"].task.metadata_dict["execution-triggers"])
    assert triggers[0]["type"] == "run" and triggers[0]["id"].startswith(upstream.pathspec + "/")


def publish(airflow, *args, **env):
    run_env = dict(os.environ, MFS_AIRFLOW_URL=airflow.url, MFS_AIRFLOW_PASSWORD=airflow.password)
    run_env.update(env)
    return subprocess.run([str(VENV_BIN / "metaflow-services"), "publish", *args], env=run_env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)


@pytest.mark.e2e
def test_a_published_event_starts_its_flow_with_parameters_from_the_payload(deployed, airflow):
    api = deployed
    before = now_iso(api)
    proc = publish(airflow, "table.ready", "--payload",
                   json.dumps({"table_name": "sales", "row_count": 120, "other": "x"}))
    assert proc.returncode == 0, say(proc)
    assert "Published event table.ready" in proc.stdout
    run_id, state = wait_for_triggered_run(api, "EventFlow", before)
    assert state == "success"
    run = metaflow_run("EventFlow", "EventFlow", run_id)
    assert run.data.seen == "sales:120"
    assert (run.data.event_name, run.data.event_type) == ("table.ready", "event")

    # From Python, with a payload that lacks a mapped field: its default.
    from metaflow_services.events import Event

    before = now_iso(api)
    event_id = Event("table.ready", url=airflow.url, password=airflow.password).publish(
        {"table_name": "returns"})
    assert event_id
    run_id, state = wait_for_triggered_run(api, "EventFlow", before)
    assert state == "success"
    assert metaflow_run("EventFlow", "EventFlow", run_id).data.seen == "returns:0"


@pytest.mark.e2e
def test_publishing_what_nothing_waits_for_or_with_a_wrong_password_is_refused(deployed,
                                                                               airflow):
    proc = publish(airflow, "nobody.listens", "--payload", "{}")
    assert proc.returncode == 1
    assert "No deployed flow waits for the event nobody.listens" in say(proc)
    proc = publish(airflow, "table.ready", "--payload", "[1, 2]")
    assert proc.returncode == 2 and "--payload must be a JSON object" in say(proc)
    proc = publish(airflow, "table.ready", MFS_AIRFLOW_PASSWORD="wrong")
    assert proc.returncode == 1
    assert "refused the user admin's password" in say(proc)


def test_project_branches_schedules_and_several_flows(tmp_path, seaweedfs):
    """Metaflow's rules: under @project, a flow named without project and
    branch is the one of the same project and branch; several flows are all
    of them; with @schedule too, either starts a run."""
    from metaflow_services.dag import build_dag
    from metaflow_services.spec import read_specs

    out = tmp_path / "dags"
    flow = write_flow(tmp_path, "AfterBothFlow",
                      '@project(name="shop")\n'
                      '@schedule(cron="0 6 * * *")\n'
                      '@trigger_on_finish(flows=["PrepFlow", "other.prod.LoadFlow"])',
                      imports="project, schedule, trigger_on_finish")
    compile_flow(flow, out)
    spec = next(s for s in read_specs(out) if s["flow"]["name"] == "AfterBothFlow")
    assert spec["dag_id"] == "shop.user.tester.AfterBothFlow"
    assert [f["name"] for f in spec["triggers"]["flows"]] == [
        "metaflow.shop.user.tester.PrepFlow.end", "metaflow.other.prod.LoadFlow.end"]
    assert spec["finish_event"] == "metaflow.shop.user.tester.AfterBothFlow.end"
    dag = build_dag(spec)
    timetable = dag.timetable
    assert type(timetable).__name__ == "AssetOrTimeSchedule"
    assets = timetable.asset_condition
    assert type(assets).__name__ == "AssetAll"
    assert sorted(a.name for a in assets.objects) == [
        "metaflow.other.prod.LoadFlow.end", "metaflow.shop.user.tester.PrepFlow.end"]
    assert dag.task_dict["end"].outlets[0].name == spec["finish_event"]
