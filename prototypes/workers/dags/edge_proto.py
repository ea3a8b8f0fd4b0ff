"""Prototype DAGs for issue 7 (a record, not product code).

edge_proto: one task on the default executor (LocalExecutor, the first one in
[core] executor) and one routed to the EdgeExecutor, queue "gpu".
edge_kill:  one task on the EdgeExecutor, queue "big", retries=1, that sleeps on
its first try (the prototype kills the worker running it) and finishes quickly
on its second.
"""
import datetime
import os
import socket
import time

from airflow.sdk import DAG, get_current_context, task

START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)


def where():
    ctx = get_current_context()
    return {"marker": os.environ.get("PROTO_MARKER", "unset"), "pid": os.getpid(),
            "fqdn": socket.getfqdn(), "try_number": ctx["ti"].try_number}


with DAG("edge_proto", start_date=START, schedule=None, catchup=False):

    @task(task_id="on_local")
    def on_local():
        return where()

    @task(task_id="on_worker", executor="EdgeExecutor", queue="gpu")
    def on_worker():
        return where()

    on_local() >> on_worker()


with DAG("edge_kill", start_date=START, schedule=None, catchup=False):

    @task(task_id="sleeper", executor="EdgeExecutor", queue="big", retries=1,
          retry_delay=datetime.timedelta(seconds=5))
    def sleeper():
        w = where()
        print("running", w, flush=True)
        time.sleep(int(os.environ.get("PROTO_SLEEP", "600")) if w["try_number"] == 1 else 2)
        return w

    sleeper()


with DAG("edge_mapped", start_date=START, schedule=None, catchup=False):
    # A mapped task routed to a queue, taking 2 of the worker's slots per
    # instance (a worker started with -c 2 runs one at a time); a task needing
    # more slots than any worker has; a task on a queue no worker serves.

    @task(executor="EdgeExecutor", queue="gpu", pool_slots=2)
    def body(i):
        time.sleep(3)
        return dict(where(), i=i)

    @task(task_id="too_big", executor="EdgeExecutor", queue="gpu", pool_slots=3)
    def too_big():
        return where()

    @task(task_id="no_worker", executor="EdgeExecutor", queue="nosuchqueue")
    def no_worker():
        return where()

    body.expand(i=[1, 2, 3])
    too_big()
    no_worker()
