"""Metaflow's Deployer API and `python flow.py airflow3 create | trigger |
delete` (issue 14) on the tests' real Airflow and S3 server: from a
workstation with only a Metaflow profile (as `fab client-config` writes it:
the object store's keys and Airflow's address), the DAG travels through the
object store to the deployment's flow-watcher (here a `metaflow-services
watch` process on this machine), runs are triggered through Airflow's REST
API, found again with from_deployment and deleted."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time

import pytest

import harness
from support import BASE, FLOWS, MFLOCAL, VENV_BIN

pytestmark = pytest.mark.e2e

FLOW = FLOWS / "deployer" / "deployer_flow.py"
PROFILE = "lab"


@pytest.fixture(scope="module")
def lab(airflow, seaweedfs, tmp_path_factory):
    """A workstation's profile of the 'deployment' (this machine's Airflow and
    S3), and the deployment's flow-watcher installing deployed DAGs."""
    airflow.start_scheduler(harness.worker_env("subprocess", BASE, MFLOCAL))
    home = tmp_path_factory.mktemp("metaflowconfig")
    s3 = seaweedfs.env()
    profile = {k: v for k, v in s3.items() if k.startswith("METAFLOW_")}
    profile.update({
        "METAFLOW_DATATOOLS_CLIENT_PARAMS": {"aws_access_key_id": s3["AWS_ACCESS_KEY_ID"],
                                             "aws_secret_access_key": s3["AWS_SECRET_ACCESS_KEY"],
                                             "region_name": "us-east-1"},
        "MFS_AIRFLOW_URL": airflow.url,
    })
    (home / ("config_%s.json" % PROFILE)).write_text(json.dumps(profile))
    dags = airflow.dags / "deployed-here"
    flows = tmp_path_factory.mktemp("vm-flows")
    log = open(BASE / "deployer-watcher.log", "w")
    watcher = subprocess.Popen([str(VENV_BIN / "metaflow-services"), "watch", "--flows",
                                str(flows), "--dags", str(dags)],
                               stdout=log, stderr=subprocess.STDOUT)
    env = {"METAFLOW_HOME": str(home), "MFS_AIRFLOW_PASSWORD": airflow.password}
    yield {"home": home, "dags": dags, "env": env, "api": airflow.api()}
    watcher.terminate()
    watcher.wait(timeout=30)
    log.close()


def test_deployer_creates_triggers_finds_and_deletes_a_flow_through_a_profile(lab, monkeypatch):
    from metaflow import Deployer
    from metaflow_extensions.metaflow_services.plugins.airflow3_deployer_objects import (
        Airflow3DeployedFlow)

    monkeypatch.setenv("METAFLOW_HOME", str(lab["home"]))
    deployed = Deployer(str(FLOW), profile=PROFILE, env=lab["env"]).airflow3().create()
    assert deployed.deployer.name == "DeployerFlow"
    installed = lab["dags"] / "deployed__DeployerFlow.py"
    assert installed.exists(), "the deployment's watcher installed the DAG"
    lab["api"].wait_for_dag("DeployerFlow")  # unpauses it (this Airflow pauses new DAGs)

    run = deployed.trigger(alpha=21)
    assert run.pathspec.startswith("DeployerFlow/af-")
    assert run.wait_for_completion(check_interval=2, timeout=300) == "success"
    assert run.status == "success"
    assert run.run.data.result == 42 and run.run.successful

    # Found again from its DAG id alone, as another script would.
    again = Airflow3DeployedFlow.from_deployment("DeployerFlow", profile=PROFILE,
                                                 env=lab["env"])
    second = again.trigger()
    assert second.wait_for_completion(check_interval=2, timeout=300) == "success"
    assert second.run.data.result == 2  # the default alpha

    assert again.delete()
    deadline = time.time() + 60
    while installed.exists() and time.time() < deadline:
        time.sleep(1)
    assert not installed.exists(), "the watcher removed the withdrawn DAG"


def flow_cli(*args, **env):
    run_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, str(FLOW), "--no-pylint", "airflow3", *args],
                          env=run_env, cwd=str(FLOW.parent), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=300)


def test_the_cli_says_what_is_wrong_and_changes_nothing(lab):
    env = dict(lab["env"], METAFLOW_PROFILE=PROFILE)
    proc = flow_cli("--dag-id", "NeverDeployed", "trigger", **env)
    assert proc.returncode != 0
    assert "has no DAG NeverDeployed" in proc.stderr
    proc = flow_cli("--dag-id", "NeverDeployed", "delete", **env)
    assert proc.returncode != 0
    assert "There is no deployed DAG NeverDeployed in the deployment" in proc.stderr
    bad = dict(env, MFS_AIRFLOW_PASSWORD="wrong")
    proc = flow_cli("trigger", **bad)
    assert proc.returncode != 0 and "refused the user admin's password" in proc.stderr


def test_a_deployed_dag_the_deployment_cannot_read_is_refused(lab):
    """The deployment's watcher refuses a DAG file compiled for another spec
    version, and the workstation hears why; nothing is installed."""
    from metaflow_services import inbox, objectstore

    s3 = objectstore.s3_client()
    bucket = objectstore.bucket_name()
    etag = inbox.put_dag(s3, bucket, "Broken", "SPEC = {'spec_version': 99, 'dag_id': 'Broken'}\n")
    with pytest.raises(inbox.InboxError, match="compiled for DAG spec version 99"):
        inbox.wait_installed(s3, bucket, "Broken", etag, timeout=60)
    assert not (lab["dags"] / "deployed__Broken.py").exists()
    assert inbox.withdraw(s3, bucket, "Broken")


def test_only_the_spec_of_a_deployed_dag_file_is_installed(lab, tmp_path):
    """The bucket's keys let a workstation deploy flows, not run code in
    Airflow's dag-processor: code added to a deployed DAG file, or a flow
    file name that would end the file's docstring, never reaches the
    installed file, which is rendered again from the spec."""
    from metaflow import Deployer

    from metaflow_services import inbox, objectstore

    local = tmp_path / "dags"
    env = {k: v for k, v in lab["env"].items() if k != "MFS_AIRFLOW_PASSWORD"}
    Deployer(str(FLOW), env=env).airflow3(dag_id="TamperedFlow", dags_folder=str(local)).create()
    text = (local / "TamperedFlow.py").read_text()
    marker = tmp_path / "ran"
    head, literal = text.split("SPEC = ", 1)
    # A flow file name that would end the docstring, and a line of code.
    literal = literal.replace("'deployer_flow.py'", repr('x"""; open(%r, "w") #' % str(marker)), 1)
    tampered = head + "SPEC = " + literal + "\nopen(%r, 'w').write('ran')\n" % str(marker)
    s3, bucket = objectstore.s3_client(), objectstore.bucket_name()
    etag = inbox.put_dag(s3, bucket, "TamperedFlow", tampered)
    try:
        inbox.wait_installed(s3, bucket, "TamperedFlow", etag, timeout=60)
        installed = lab["dags"] / "deployed__TamperedFlow.py"
        tree = ast.parse(installed.read_text())
        # The template's four statements: docstring, import, SPEC, dag.
        assert [type(n).__name__ for n in tree.body] == ["Expr", "ImportFrom", "Assign", "Assign"]
        assert isinstance(tree.body[0].value.value, str)
        assert inbox.spec_of(installed.read_text()) == inbox.spec_of(tampered)
        lab["api"].wait_for_dag("TamperedFlow")  # Airflow parsed the installed file
        assert not marker.exists()
    finally:
        assert inbox.withdraw(s3, bucket, "TamperedFlow")


def test_the_deployer_into_a_local_dags_folder(lab, tmp_path):
    """dags_folder=DIR (a local Airflow's folder): the DAG file is written
    there, and delete removes it."""
    from metaflow import Deployer

    folder = tmp_path / "dags"
    env = {k: v for k, v in lab["env"].items() if k != "MFS_AIRFLOW_PASSWORD"}
    deployed = Deployer(str(FLOW), env=env).airflow3(dag_id="LocalDeployerFlow",
                                                     dags_folder=str(folder)).create()
    assert deployed.deployer.name == "LocalDeployerFlow"
    dag_file = folder / "LocalDeployerFlow.py"
    assert "SPEC = " in dag_file.read_text()
    assert deployed.delete() and not dag_file.exists()
