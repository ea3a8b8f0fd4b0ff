"""Issue 14 on the deployed default stack, from a laptop that has only the
profile `fab client-config` wrote (no SSH key): Metaflow's Deployer API
deploys three flows through the object store, a run of the first starts the
second (@trigger_on_finish, which reads the first run through
current.trigger), and an event published with `metaflow-services publish`
starts the third with parameters from its payload. Everything the laptop
sees comes through the VM's published ports (Airflow's API on 443, S3 on
9000, the metadata service on 8443)."""

from __future__ import annotations

import json
import subprocess
import textwrap
import time

import pytest

from deploylab import DATA_DIR, REPO, VENV_BIN

pytestmark = pytest.mark.deploy

TRIGGERS = REPO / "tests" / "flows" / "triggers"

LAPTOP = textwrap.dedent('''
    import json, sys, time
    from metaflow import Deployer, Run, namespace
    from metaflow_services.airflow_client import AirflowClient

    flows = sys.argv[1]
    out = {}
    deployed = {name: Deployer("%s/%s_flow.py" % (flows, name)).airflow3().create()
                for name in ("source", "chained", "event")}
    out["dag_ids"] = sorted(d.deployer.name for d in deployed.values())
    airflow = AirflowClient.from_settings()

    def triggered_run(dag_id, after, timeout=600):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for r in airflow.get("/api/v2/dags/%s/dagRuns" % dag_id, "runs")["dag_runs"]:
                if r["run_type"] == "asset_triggered" and r["queued_at"] > after \\
                        and r["state"] in ("success", "failed"):
                    return r
            time.sleep(3)
        raise SystemExit("no asset-triggered run of %s" % dag_id)

    def now():
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())

    namespace(None)
    before = now()
    run = deployed["source"].trigger(size=4)
    out["source_status"] = run.wait_for_completion(check_interval=3, timeout=600)
    out["source_pathspec"] = run.run.pathspec
    chained = triggered_run("ChainedFlow", before)
    out["chained_state"] = chained["state"]
    from metaflow_services.spec import run_id_for
    data = Run("ChainedFlow/" + run_id_for("ChainedFlow", chained["dag_run_id"])).data
    out["chained"] = [data.upstream_pathspec, data.upstream_rows, data.event_name]
    print(json.dumps(out))
''')


def test_the_deployer_and_a_chain_of_flows_from_a_laptop_profile(deployed, lab, tmp_path):
    script = tmp_path / "laptop.py"
    script.write_text(LAPTOP)
    proc = subprocess.run([str(VENV_BIN / "python"), str(script), str(TRIGGERS)],
                          env=lab.laptop_env(), cwd=str(tmp_path), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dag_ids"] == ["ChainedFlow", "EventFlow", "TriggerSourceFlow"]
    assert out["source_status"] == "success"
    assert out["chained_state"] == "success"
    assert out["chained"] == [out["source_pathspec"], 4, "metaflow.TriggerSourceFlow.end"]
    # The VM installed what the laptop sent, next to the flows' generated DAGs.
    gen = lab.vm.root / DATA_DIR.lstrip("/") / "dags" / ".metaflow-services"
    assert (gen / "deployed__ChainedFlow.py").exists()


def laptop_python(lab, code):
    proc = subprocess.run([str(VENV_BIN / "python"), "-c", code], env=lab.laptop_env(),
                          cwd="/tmp", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_an_event_published_from_a_laptop_starts_its_flow(deployed, lab):
    before = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    proc = subprocess.run([str(VENV_BIN / "metaflow-services"), "publish", "table.ready",
                           "--payload", json.dumps({"table_name": "sales", "row_count": 7})],
                          env=lab.laptop_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = lab.triggered_run("EventFlow", before)
    assert found and found["state"] == "success", found
    from metaflow_services.spec import run_id_for

    run_id = run_id_for("EventFlow", found["dag_run_id"])
    # The payload's fields became the parameters (read with the laptop's client).
    seen = laptop_python(lab, "from metaflow import Run, namespace; namespace(None); "
                              "d = Run('EventFlow/%s').data; print(d.seen, d.event_name)" % run_id)
    assert seen == "sales:7 table.ready"
    meta = lab.metadata("flows/EventFlow/runs/%s/steps/start/tasks/t-0/metadata" % run_id)
    triggers = [m for m in meta if m["field_name"] == "execution-triggers"]
    assert triggers and json.loads(triggers[0]["value"])[0]["name"] == "table.ready"
