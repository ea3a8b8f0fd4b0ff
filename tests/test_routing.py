"""Routing steps to worker VMs (docs/workers.md): `@worker(queue=...)` and
`@resources` pick an Edge-executor queue once workers exist; a deployment
without workers compiles exactly as before; a step no worker can hold is
refused by the compiler and again when Airflow parses the DAG file."""

from __future__ import annotations

import json
import textwrap

import pytest

from support import compile_flow
from test_compile import build, refused

QUEUES = {
    "default": {"cpu": 2, "memory": 3900, "gpu": 0, "workers": ["main", "vm1"]},
    "gpu": {"cpu": 8, "memory": 30000, "gpu": 1, "workers": ["gpu1"]},
    "big": {"cpu": 16, "memory": 120000, "gpu": 0, "workers": ["big1"]},
}
WORKERS = {"MFS_WORKER_QUEUES": json.dumps(QUEUES)}

ROUTED = """
    from metaflow import FlowSpec, step, resources, worker

    class RoutedFlow(FlowSpec):
        @step
        def start(self):
            self.items = [1, 2, 3]
            self.next(self.train, foreach="items")

        @worker(queue="gpu")
        @step
        def train(self):
            self.next(self.join)

        @step
        def join(self, inputs):
            self.next(self.crunch)

        @resources(cpu=4, memory=8000)
        @step
        def crunch(self):
            self.next(self.end)

        @step
        def end(self):
            pass

    if __name__ == "__main__":
        RoutedFlow()
"""


def compiled_dag(tmp_path, body, env=None):
    flow = tmp_path / "flow.py"
    flow.write_text(textwrap.dedent(body))
    compile_flow(flow, tmp_path / "dags", env=env)
    (dag_file,) = (tmp_path / "dags").glob("*.py")
    return dag_file


def routes(dag):
    return {t.task_id: (t.executor, t.queue, t.pool_slots) for t in dag.tasks}


def test_without_workers_every_step_stays_on_the_main_vm(tmp_path, seaweedfs, monkeypatch):
    body = ROUTED.replace('@worker(queue="gpu")', "").replace("cpu=4, memory=8000", "cpu=64")
    monkeypatch.delenv("MFS_WORKER_QUEUES", raising=False)
    dag = build(compiled_dag(tmp_path, body))
    # No executor argument: the LocalExecutor runs it, as on every single VM.
    assert {t: r[0] for t, r in routes(dag).items()} == dict.fromkeys(
        ["start", "train", "join", "crunch", "end"], None)


def test_steps_go_to_the_queue_they_name_or_the_smallest_that_holds_them(
        tmp_path, seaweedfs, monkeypatch):
    dag_file = compiled_dag(tmp_path, ROUTED, env=WORKERS)
    monkeypatch.setenv("MFS_WORKER_QUEUES", json.dumps(QUEUES))
    r = routes(build(dag_file))
    assert r["start"] == ("EdgeExecutor", "default", 1)
    assert r["train"] == ("EdgeExecutor", "gpu", 1)      # @worker, inside the mapped foreach body
    assert r["join"] == ("EdgeExecutor", "default", 1)
    assert r["crunch"] == ("EdgeExecutor", "gpu", 4)     # 4 CPUs: "gpu" (8) is smaller than "big"
    assert r["end"] == ("EdgeExecutor", "default", 1)


def test_a_queue_no_worker_serves_is_refused_at_compile_time(tmp_path, seaweedfs):
    msg = refused(tmp_path, ROUTED.replace('queue="gpu"', 'queue="tpu"'), env=WORKERS)
    assert "Flow RoutedFlow, step train: @worker(queue='tpu'): no worker serves that queue" in msg
    assert "default: cpu=2, memory=3900, gpu=0 on main, vm1" in msg
    assert "fab add-worker -H HOST --queue tpu" in msg


def test_a_queue_on_a_deployment_without_workers_is_refused(tmp_path, seaweedfs):
    msg = refused(tmp_path, ROUTED, env={"MFS_WORKER_QUEUES": ""})
    assert ("Flow RoutedFlow, step train: @worker(queue='gpu') needs a worker VM serving "
            "that queue, and this deployment has none") in msg


def test_resources_no_worker_has_are_refused(tmp_path, seaweedfs):
    msg = refused(tmp_path, ROUTED.replace("cpu=4, memory=8000", "memory=500000"), env=WORKERS)
    # (Metaflow's @resources asks for cpu=1 unless told otherwise.)
    assert ("Flow RoutedFlow, step crunch asks for @resources(cpu=1, memory=500000), more "
            "than any worker has (big: cpu=16, memory=120000, gpu=0 on big1;") in msg
    msg = refused(tmp_path, ROUTED.replace('@worker(queue="gpu")',
                                           '@worker(queue="default")\n        @resources(gpu=1)'),
                  env=WORKERS)
    assert ("step train asks for @resources(cpu=1, memory=4096, gpu=1), more than any worker "
            "of queue 'default' has") in msg


def test_a_bad_queue_name_is_refused(tmp_path, seaweedfs):
    msg = refused(tmp_path, ROUTED.replace('queue="gpu"', 'queue="g p u"'), env=WORKERS)
    assert "step train: @worker(queue='g p u'): a queue name is letters, digits" in msg


def test_a_removed_worker_makes_the_dag_an_import_error_naming_the_step(
        tmp_path, seaweedfs, monkeypatch):
    from metaflow_services.routing import RoutingError

    dag_file = compiled_dag(tmp_path, ROUTED, env=WORKERS)
    monkeypatch.setenv("MFS_WORKER_QUEUES", json.dumps({"default": QUEUES["default"]}))
    with pytest.raises(RoutingError) as e:
        build(dag_file)
    assert ("Flow RoutedFlow, step crunch asks for @resources(cpu=4, memory=8000), more than "
            "any worker has (default: cpu=2, memory=3900, gpu=0 on main, vm1)") in str(e.value)


def test_a_worker_vm_parses_every_dag_file_whatever_its_routes(tmp_path, seaweedfs, monkeypatch):
    """A task on a worker VM parses its DAG file to run it; the scheduler has
    routed it already, and the worker does not know the main VM's queues."""
    dag_file = compiled_dag(tmp_path, ROUTED, env=WORKERS)
    monkeypatch.setenv("MFS_WORKER_QUEUES", "any")
    dag = build(dag_file)
    assert set(routes(dag)) == {"start", "train", "join", "crunch", "end"}
