"""@pypi on the deployed default stack through a company's package index
(issue 17): a private HTTPS index on the test network (the host's side of
the VM's link, 10.213.0.1) whose certificate only a CA of the test's own
signs, as a mirror behind a company CA or a TLS-inspecting proxy is. The
user sets packages.index_url and packages.ca_bundle, re-runs fab deploy, and
a flow pinning a package from that index runs; fab status shows the index
and that the VM reaches it.

The air-gapped case (a wheelhouse from the bundle, no network) runs on the
worker VM in test_deploy_workers.py; the messages for an untrusted or
unreachable index and the wheelhouse's refusals in tests/test_packages.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_deploy_stack_dags import artifact, scp
from test_deploy_stack_flows import dag, wait

import pyindex
from deploylab import CACHE, DATA_DIR, VM_IP, _timed
from vm import HOST_IP

pytestmark = pytest.mark.deploy

FLOW = Path(__file__).resolve().parents[1] / "flows" / "indexed" / "indexed_flow.py"
PORT = 8470


@pytest.fixture(scope="module")
def index(deployed, lab):
    folder = CACHE / "pyindex"
    certs = pyindex.make_ca(folder / "tls", [HOST_IP])
    pyindex.download(["toolz==0.12.1"], folder / "wheels")
    idx = pyindex.Index(folder / "wheels", HOST_IP, PORT, certs, folder / "requests.log")
    yield idx
    idx.stop()


def test_the_vm_does_not_trust_the_index_on_its_own(index, lab):
    res = lab.vm.run("curl -sS -o /dev/null %s/" % index.url, check=False)
    assert res.returncode == 60, (res.returncode, res.stderr)   # peer certificate not trusted


def test_deploy_with_the_index_and_its_ca(index, lab):
    with _timed("fab deploy with packages.index_url and ca_bundle"):
        res = lab.deploy("--set", "packages.index_url=%s" % index.url,
                         "--set", "packages.ca_bundle=%s" % index.certs["ca"],
                         "--smoke-test", "never")
    (CACHE / "deploy-packages.log").write_text(str(res))
    assert res.returncode == 0, str(res)
    assert "CA bundle %s: written" % index.certs["ca"] in res.output, res.output
    assert "environment images get packages from the wheelhouse, then %s" % index.url \
        in res.output, res.output
    env = lab.compose("exec -T airflow-scheduler printenv MFS_PIP_INDEX_URL MFS_PIP_CERT")
    assert env.split() == [index.url, "/etc/mfs/packages/ca.pem"], env
    lab.results["indexed"] = True

    status = lab.fab("status", "--config", str(lab.config))
    assert "package index: %s (CA bundle /opt/metaflow-services/packages/ca.pem), reachable " \
           "from the VM (HTTP 200)" % index.url in status.output, status.output


def test_a_pypi_flow_gets_its_package_from_the_private_index(index, lab):
    assert lab.results.get("indexed"), "needs the deploy with the index"
    res = scp(lab, "deployer", FLOW, DATA_DIR + "/dags/", recursive=False)
    assert res.returncode == 0, res.stderr
    api = lab.airflow()
    wait("IndexedFlow's DAG", lambda: dag(api, "IndexedFlow"), 240)
    api.patch("https://%s/api/v2/dags/IndexedFlow" % VM_IP, json={"is_paused": False},
              timeout=30).raise_for_status()
    run_id, state, tis = lab.run_dag("IndexedFlow", {}, timeout=900)
    assert state == "success", tis
    from metaflow_services.spec import run_id_for

    mf_run = run_id_for("IndexedFlow", run_id)
    assert artifact(lab, "IndexedFlow", mf_run, "toolz") == "0.12.1"
    assert artifact(lab, "IndexedFlow", mf_run, "firsts") == [1, 2, 4]
    # The VM (its build container, through the VM's NAT) fetched it from there.
    fetched = {(who, path) for who, path in index.requests()}
    assert (VM_IP, "/files/toolz-0.12.1-py3-none-any.whl") in fetched, fetched
