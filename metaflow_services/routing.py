"""Where a step runs once worker VMs exist (docs/workers.md).

A deployment without workers runs every step on the main VM with Airflow's
LocalExecutor, exactly as before: ``route`` returns no operator arguments.
Once ``fab add-worker`` has added a worker, the deployment publishes its queues
in ``MFS_WORKER_QUEUES`` (JSON: queue -> the largest worker serving it), and
every step goes to Airflow's Edge executor on a queue:

- ``@worker(queue="gpu")`` names the queue;
- otherwise the ``default`` queue (the main VM's own edge worker and every
  worker added without ``--queue``), unless ``@resources`` asks for more than
  its largest worker has: then the smallest queue whose largest worker holds it.

A step no worker can hold is refused with a message naming the step, what it
asks for and the queues there are: by the compiler (a compile error) and again
when the DAG file is parsed (an import error in the Airflow UI), because
workers can be removed after a flow was compiled.

Stdlib only: dag.py imports this at parse time.
"""

from __future__ import annotations

import json
import math
import os

from .errors import ExitCode, ServicesError

QUEUES_ENV = "MFS_WORKER_QUEUES"
# On a worker VM: the scheduler has routed every task already, and the task
# parses its DAG file only to run it, so nothing is checked (compose/worker.yaml).
ANY = "any"
DEFAULT_QUEUE = "default"
EDGE_EXECUTOR = "EdgeExecutor"
_NEEDS = ("cpu", "memory", "gpu")  # as in @resources; memory in MB


class RoutingError(ServicesError, ValueError):
    """No queue can hold a step, or MFS_WORKER_QUEUES is malformed."""

    exit_code = ExitCode.USAGE


def queues_from_env(environ=None) -> dict | None:
    """{queue: {"cpu", "memory", "gpu", "workers"}}; empty without workers;
    None on a worker VM (``any``)."""
    raw = ((environ if environ is not None else os.environ).get(QUEUES_ENV) or "").strip()
    if not raw:
        return {}
    if raw == ANY:
        return None
    try:
        queues = json.loads(raw)
    except ValueError as e:
        raise RoutingError("%s is not valid JSON (%s): run `fab deploy` again to rewrite it."
                           % (QUEUES_ENV, e))
    if not isinstance(queues, dict):
        raise RoutingError("%s must be a JSON object of queues." % QUEUES_ENV)
    return queues


def route(flow_name: str, step_name: str, step: dict, queues: dict | None) -> dict:
    """The operator arguments that send this step to a queue ({} on a single
    VM, and on a worker VM, where they no longer matter)."""
    if queues is None:
        return {}
    wanted = step.get("queue")
    needs = {k: float((step.get("resources") or {}).get(k) or 0) for k in _NEEDS}
    where = "Flow %s, step %s" % (flow_name, step_name)
    if not queues:
        if wanted:
            raise RoutingError(
                "%s: @worker(queue=%r) needs a worker VM serving that queue, and this "
                "deployment has none. Add one with `fab add-worker -H HOST --queue %s`, "
                "or remove @worker from the step." % (where, wanted, wanted))
        return {}
    if wanted:
        if wanted not in queues:
            raise RoutingError(
                "%s: @worker(queue=%r): no worker serves that queue (queues: %s). Add one "
                "with `fab add-worker -H HOST --queue %s`, or use one of those queues."
                % (where, wanted, _describe(queues), wanted))
        if not _holds(queues[wanted], needs):
            raise RoutingError(
                "%s asks for %s, more than any worker of queue %r has (%s). Lower "
                "@resources, or add a bigger worker to that queue."
                % (where, _asks(needs), wanted, _describe({wanted: queues[wanted]})))
        queue = wanted
    elif DEFAULT_QUEUE in queues and _holds(queues[DEFAULT_QUEUE], needs):
        queue = DEFAULT_QUEUE
    else:
        fitting = sorted((q for q in queues if _holds(queues[q], needs)),
                         key=lambda q: tuple(float(queues[q].get(k) or 0) for k in _NEEDS))
        if not fitting:
            raise RoutingError(
                "%s asks for %s, more than any worker has (%s). Lower @resources, or add "
                "a worker that big with `fab add-worker -H HOST --queue NAME`."
                % (where, _asks(needs), _describe(queues)))
        queue = fitting[0]
    # The edge worker takes a job only when it has this many free slots, and a
    # worker has one slot per CPU: steps are packed by the CPUs they ask for.
    return {"executor": EDGE_EXECUTOR, "queue": queue,
            "pool_slots": max(1, math.ceil(needs["cpu"]))}


def _holds(capacity, needs):
    return all(needs[k] <= float(capacity.get(k) or 0) for k in _NEEDS)


def _asks(needs):
    return "@resources(%s)" % ", ".join("%s=%g" % (k, needs[k]) for k in _NEEDS if needs[k])


def _describe(queues):
    return "; ".join(
        "%s: %s on %s" % (q, ", ".join("%s=%g" % (k, float(c.get(k) or 0)) for k in _NEEDS),
                          ", ".join(c.get("workers") or []) or "no workers")
        for q, c in sorted(queues.items()))
