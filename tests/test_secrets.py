"""@secrets from the platform (issue 16) on the tests' real Airflow: a secret
set with `metaflow-services secrets set` (what `fab secrets.set` runs in the
scheduler container) is stored encrypted, reaches the step that names it as
environment variables through Metaflow's provider "metaflow-services", and
its value is nowhere else: not in Airflow's task logs, XCom or task
instances (rendered fields), not in Metaflow's logs or artifacts, not in the
DAG file, not in a step that does not name it."""

from __future__ import annotations

import hashlib
import json
import os
import secrets as secrets_mod
import subprocess
import textwrap
import time

import pytest

import harness
from support import BASE, FLOWS, MFLOCAL, VENV_BIN, compile_flow, two_step_flow

SECRET_FLOW = FLOWS / "platform_secrets" / "secret_flow.py"


def cli(airflow, *args, stdin=""):
    return subprocess.run([str(VENV_BIN / "metaflow-services"), "secrets", *args],
                          env=airflow.env(), input=stdin, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=120)


def say(proc):
    return " ".join((proc.stdout + proc.stderr).split())


# -- what the compiler and the command refuse ---------------------------------


def test_a_source_that_cannot_name_a_platform_secret_is_refused(tmp_path, seaweedfs):
    flow = tmp_path / "dotted_flow.py"
    flow.write_text(textwrap.dedent(two_step_flow(
        imp="Parameter, secrets", name="DottedFlow",
        step_deco='@secrets(sources=[{"type": "metaflow-services", "id": "has space"}])')))
    proc = compile_flow(flow, tmp_path / "dags", check=False)
    assert proc.returncode != 0
    assert "@secrets source 'has space' is not a platform secret name" in say(proc)
    assert "fab -H HOST secrets.set NAME" in say(proc)
    # Another backend's sources are Metaflow's business, not the platform's.
    other = tmp_path / "other_flow.py"
    other.write_text(textwrap.dedent(two_step_flow(
        imp="Parameter, secrets", name="OtherFlow",
        step_deco='@secrets(sources=["aws-secrets-manager.prod/db", "mine"])')))
    compile_flow(other, tmp_path / "dags")
    from metaflow_services.spec import read_specs

    spec = next(s for s in read_specs(tmp_path / "dags") if s["flow"]["name"] == "OtherFlow")
    assert spec["steps"]["start"]["secrets"] == ["mine"]


# -- on Airflow ---------------------------------------------------------------


@pytest.fixture(scope="module")
def deployed(airflow):
    airflow.start_scheduler(harness.worker_env("subprocess", BASE, MFLOCAL))
    value = "pw-" + secrets_mod.token_urlsafe(18)
    proc = cli(airflow, "set", "db", stdin="# the test database\nDB_USER=alice\n"
                                            "DB_PASSWORD=%s\n" % value)
    assert proc.returncode == 0, say(proc)
    assert "set db: DB_PASSWORD, DB_USER" in proc.stdout and value not in proc.stdout
    compile_flow(SECRET_FLOW, airflow.dags)
    api = airflow.api()
    api.wait_for_dag("SecretFlow")
    return api, value


def test_secrets_are_stored_encrypted_and_listed_without_values(deployed, airflow, postgres):
    _, value = deployed
    listed = cli(airflow, "list")
    assert listed.returncode == 0 and "db\tDB_PASSWORD,DB_USER" in listed.stdout
    assert value not in listed.stdout
    import psycopg

    with psycopg.connect(postgres.url("airflow").replace("postgresql+psycopg", "postgresql")) \
            as conn:
        val, encrypted = conn.execute("SELECT val, is_encrypted FROM variable WHERE key = %s",
                                      ("mfs_secret__db",)).fetchone()
    assert encrypted is True and value not in val and "DB_USER" not in val
    # Bad input names the problem and keeps what is stored.
    bad = cli(airflow, "set", "db", stdin="just a password\n")
    assert bad.returncode == 2
    assert "line 1 of the value of secret db is not KEY=VALUE" in say(bad)
    assert "just a password" not in say(bad)
    meta = cli(airflow, "set", "db", stdin="METAFLOW_USER=x\n")
    assert meta.returncode == 2 and "'METAFLOW_USER' cannot be an environment variable" in say(meta)
    assert "db\tDB_PASSWORD,DB_USER" in cli(airflow, "list").stdout
    assert cli(airflow, "delete", "nothing-here").returncode == 1


@pytest.mark.e2e
def test_a_step_gets_the_secret_it_names_and_the_value_goes_nowhere_else(deployed, airflow):
    api, value = deployed
    run_id = api.trigger("SecretFlow", run_id="secret__%d" % time.time())
    assert api.wait_for_run("SecretFlow", run_id) == "success"
    from metaflow import Run, namespace

    from metaflow_services.spec import run_id_for

    namespace(None)
    run = Run("SecretFlow/%s" % run_id_for("SecretFlow", run_id))
    seen = run["start"].task.data.seen
    assert seen["user"] == "alice"
    assert seen["digest"] == hashlib.sha256(value.encode()).hexdigest()
    assert seen["mode"] == 0o600  # the subprocess executor's private file
    assert not os.path.exists(seen["file"]), "the secrets file outlives the task"
    assert run["end"].task.data.others_see == []
    assert "connected as alice" in run["start"].task.stdout

    places = {"the DAG file": (airflow.dags / "SecretFlow.py").read_text()}
    for ti in api.task_instances("SecretFlow", run_id):
        places["task instance %s" % ti["task_id"]] = json.dumps(ti)
        places["log of %s" % ti["task_id"]] = api.task_log("SecretFlow", run_id, ti["task_id"])
        entries = api.get("/api/v2/dags/SecretFlow/dagRuns/%s/taskInstances/%s/xcomEntries"
                          % (run_id, ti["task_id"]))["xcom_entries"]
        for e in entries:
            full = api.get("/api/v2/dags/SecretFlow/dagRuns/%s/taskInstances/%s/xcomEntries/%s"
                           % (run_id, ti["task_id"], e["key"]), map_index=e["map_index"])
            places["xcom %s of %s" % (e["key"], ti["task_id"])] = json.dumps(full)
    assert any("xcom" in k for k in places), "the run pushed no XCom to look at"
    for step in run:
        for task in step:
            places["Metaflow log of %s" % task.pathspec] = task.stdout + task.stderr
            for artifact in task:
                places["artifact %s of %s" % (artifact.id, task.pathspec)] = repr(artifact.data)
    leaks = [where for where, text in places.items() if value in text]
    assert not leaks, "the secret's value is in: %s" % ", ".join(leaks)


@pytest.mark.e2e
def test_a_step_naming_a_secret_that_is_not_set_fails_saying_how_to_set_it(deployed, airflow,
                                                                            tmp_path):
    api, _ = deployed
    flow = tmp_path / "unset_flow.py"
    flow.write_text(textwrap.dedent(two_step_flow(
        imp="Parameter, secrets", name="UnsetSecretFlow", step_deco='@secrets(sources=["nope"])')))
    compile_flow(flow, airflow.dags)
    api.wait_for_dag("UnsetSecretFlow")
    run_id = api.trigger("UnsetSecretFlow", run_id="unset__%d" % time.time())
    assert api.wait_for_run("UnsetSecretFlow", run_id) == "failed"
    log = " ".join(api.task_log("UnsetSecretFlow", run_id, "start").split())
    assert "asks for the platform secret nope (@secrets), which is not set" in log
    assert "fab -H HOST secrets.set nope" in log
    deleted = cli(airflow, "delete", "db")
    assert deleted.returncode == 0 and "deleted db" in deleted.stdout
    assert "db\t" not in cli(airflow, "list").stdout
