"""The lean variant (`metaflow_services: false`): no metadata service, UI
backend or UI; runs record Metaflow's metadata in a volume the scheduler and
every step share, and a laptop profile says so. Runs last, on the main VM the
other modules used: switching the option is a changed option of a running
deployment (the Metaflow services stop, the proxy drops their port).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from deploylab import DATA_DIR, TEST_OPTIONS, VM_IP

pytestmark = pytest.mark.deploy

LEAN_ONLY = ("metadata", "metaflow-ui-backend", "metaflow-ui", "metaflow-migrate")


@pytest.fixture(scope="module")
def lean(deployed, lab, tmp_path_factory):
    config = tmp_path_factory.mktemp("lean") / "deploy-lean.yaml"
    config.write_text(TEST_OPTIONS + "metaflow_services: false\n")
    res = lab.deploy(config=config, bundle=False)
    assert res.returncode == 0, str(res)
    lab.results["lean_deploy"] = res
    return res


def test_the_metaflow_services_are_gone_and_their_port_closed(lean, lab):
    cs = lab.wait_healthy(timeout=300)
    assert not set(cs) & set(LEAN_ONLY), sorted(cs)
    out = subprocess.run(["ip", "netns", "exec", "mfs-deploy-vm", "ss", "-Hlnt"],
                         stdout=subprocess.PIPE, text=True, check=True).stdout
    ports = {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines()}
    assert 443 in ports and 9000 in ports and 8443 not in ports, ports


def test_a_flow_runs_and_records_its_metadata_on_the_shared_volume(lean, lab):
    from metaflow_services.spec import run_id_for

    api = lab.airflow()
    flow = lab.vm.root / DATA_DIR.lstrip("/") / "dags" / "deploy_check_flow.py"
    assert flow.exists(), "the check flow is part of the deployment the lean variant inherits"
    api.patch("https://%s/api/v2/dags/DeployCheckFlow" % VM_IP, json={"is_paused": False},
              timeout=30).raise_for_status()
    run_id, state, tis = lab.run_dag("DeployCheckFlow", {"n": 2}, timeout=600)
    assert state == "success", tis
    mf_run = run_id_for("DeployCheckFlow", run_id)
    meta = json.loads(lab.sh(
        "cat /var/lib/docker/volumes/metaflow-services-metaflow-local/_data/.metaflow/"
        "DeployCheckFlow/%s/_meta/_self.json" % mf_run))
    tags = set(meta.get("tags", [])) | set(meta.get("system_tags", []))
    assert "airflow_run_id:%s" % run_id in tags, tags
    tasks = lab.sh("ls /var/lib/docker/volumes/metaflow-services-metaflow-local/_data/.metaflow/"
                   "DeployCheckFlow/%s/square" % mf_run).split()
    assert len([t for t in tasks if t != "_meta"]) == 2, tasks


def test_status_and_client_config_say_local_metadata(lean, lab):
    res = lab.fab("status")
    assert res.returncode == 0, str(res)
    assert "ok   metadata      local metadata in /var/lib/metaflow-local" in res.output, res.output
    assert "not deployed (metaflow_services: false)" in res.output
    res = lab.fab("client-config", "--name", "lean")
    assert res.returncode == 0, str(res)
    cfg = json.loads((lab.home / ".metaflowconfig" / "config_lean.json").read_text())
    assert cfg["METAFLOW_DEFAULT_METADATA"] == "local"
    assert "METAFLOW_SERVICE_URL" not in cfg
