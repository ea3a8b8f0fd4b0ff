"""@pypi / @pypi_base / requirements.txt: each distinct step environment is
built once into an image on the worker's Docker engine and reused; a bad pin
fails with pip's message and leaves no image. Real Airflow, real Docker, real
PyPI (through this machine's package index settings)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import time

import pytest

import harness
from support import BASE, FLOWS, MFLOCAL, compile_flow, docker_available

pytestmark = pytest.mark.e2e

BUILD_LINE = "Building the step environment image"


def _spec(path):
    from metaflow_services.spec import normalize

    tree = ast.parse(path.read_text())
    node = [n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "SPEC"][0]
    return normalize(ast.literal_eval(node.value))


@pytest.fixture(scope="module")
def env_runs(airflow):
    if not docker_available():
        pytest.fail("environment images need a Docker engine (scripts/host-setup starts one)")
    from metaflow_services.images import environment_tag

    compile_flow(FLOWS / "pinned" / "pinned_flow.py", airflow.dags)
    compile_flow(FLOWS / "badpin" / "bad_pin_flow.py", airflow.dags)
    spec = _spec(airflow.dags / "PinnedFlow.py")
    tags = {environment_tag("mfs-step:test", s["environment"]) for s in spec["steps"].values()}
    bad_tag = environment_tag("mfs-step:test",
                              _spec(airflow.dags / "BadPinFlow.py")["steps"]["start"]["environment"])
    # Start from a host without these images, so the first run builds them.
    subprocess.run(["docker", "rmi", "-f", *tags, bad_tag], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    worker = harness.worker_env(
        "docker", BASE, MFLOCAL,
        # PyPI is reached through this machine's TLS-inspecting proxy.
        MFS_PIP_CERT=os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
        MFS_LOCK_DIR=str(BASE / "locks"), MFS_STATE_DIR=str(BASE / "state"))
    airflow.start_scheduler(worker)
    api = airflow.api()
    api.wait_for_dag("PinnedFlow")
    api.wait_for_dag("BadPinFlow")
    runs = {}
    runs["first"] = api.trigger("PinnedFlow", run_id="pinned_first__%d" % time.time())
    runs["bad"] = api.trigger("BadPinFlow", run_id="badpin__%d" % time.time())
    states = {k: api.wait_for_run(d, runs[k], timeout=900)
              for k, d in (("first", "PinnedFlow"), ("bad", "BadPinFlow"))}
    runs["second"] = api.trigger("PinnedFlow", run_id="pinned_second__%d" % time.time())
    states["second"] = api.wait_for_run("PinnedFlow", runs["second"], timeout=900)
    return {"api": api, "runs": runs, "states": states, "tags": tags, "bad_tag": bad_tag}


def _logs(api, dag_id, run_id):
    return {(ti["task_id"], ti["map_index"]): api.task_log(dag_id, run_id, ti["task_id"],
                                                          max(ti["try_number"], 1), ti["map_index"])
            for ti in api.task_instances(dag_id, run_id)}


def _mf_run(airflow_run_id):
    from metaflow import Run, namespace

    from metaflow_services.spec import run_id_for

    namespace(None)
    return Run("PinnedFlow/%s" % run_id_for("PinnedFlow", airflow_run_id))


def test_each_step_sees_its_pinned_versions(env_runs):
    assert env_runs["states"]["first"] == "success"
    run = _mf_run(env_runs["runs"]["first"])
    start = run["start"].task.data
    assert (start.start_six, start.start_toolz) == ("1.16.0", "0.12.1")
    join = run["join"].task.data
    assert (join.each_six, join.each_toolz) == (["1.15.0"], ["0.12.0"])


def test_run_records_image_and_resolved_versions(env_runs):
    run = _mf_run(env_runs["runs"]["first"])
    for task in run["each"]:
        meta = {m.name: m.value for m in task.metadata}
        assert meta["mfs-image"] in env_runs["tags"]
        assert meta["mfs-base-image"] == "mfs-step:test"
        resolved = json.loads(meta["mfs-environment"])
        assert resolved["six"] == "1.15.0" and resolved["toolz"] == "0.12.0"


def test_concurrent_tasks_build_each_environment_once(env_runs):
    logs = _logs(env_runs["api"], "PinnedFlow", env_runs["runs"]["first"])
    builds = {key: log.count(BUILD_LINE) for key, log in logs.items()}
    each = [n for (task, _), n in builds.items() if task == "each"]
    assert len(each) == 3 and sum(each) == 1, builds  # three tasks at once, one build
    assert sum(builds.values()) == 2, builds  # two distinct environments in the flow


def test_second_run_reuses_the_images(env_runs):
    assert env_runs["states"]["second"] == "success"
    logs = _logs(env_runs["api"], "PinnedFlow", env_runs["runs"]["second"])
    assert not any(BUILD_LINE in log for log in logs.values())


def test_bad_pin_fails_with_pips_message_and_keeps_no_image(env_runs):
    assert env_runs["states"]["bad"] == "failed"
    log = env_runs["api"].task_log("BadPinFlow", env_runs["runs"]["bad"], "start")
    assert "Building the step environment failed, no image was kept." in log
    assert "environment: six==0.0.999" in log
    assert "No matching distribution found for six==0.0.999" in log
    out = subprocess.run(["docker", "image", "inspect", env_runs["bad_tag"]],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert out.returncode != 0


def test_images_lists_them_and_prune_keeps_those_in_use(env_runs, airflow):
    env = dict(os.environ, MFS_STEP_IMAGE="mfs-step:test", MFS_STATE_DIR=str(BASE / "state"))
    out = subprocess.run([str(harness.VENV_BIN / "metaflow-services"), "images", "--json"],
                         env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
    listed = {r["tag"]: r for r in json.loads(out)}
    for tag in env_runs["tags"]:
        assert listed[tag]["last_used"] and listed[tag]["size_bytes"] > 0
    # An image no DAG uses any more is pruned; the ones in use are kept.
    import io

    import docker

    client = docker.from_env()
    unused = "metaflow-services/env:unused0000000000"
    client.images.build(fileobj=io.BytesIO(
        b"FROM mfs-step:test\nLABEL metaflow-services.environment=unused\n"), tag=unused)
    out = subprocess.run([str(harness.VENV_BIN / "metaflow-services"), "prune-images",
                          "--dags-folder", str(airflow.dags)],
                         env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
    assert "removing %s" % unused in out
    assert not any(tag in out for tag in env_runs["tags"])
    remaining = {t for img in client.images.list(name="metaflow-services/env") for t in img.tags}
    assert unused not in remaining and env_runs["tags"] <= remaining
