"""Airflow's scheduler, woken by a task's end: ``python -P -m
metaflow_services.scheduler [airflow scheduler options]``.

After a loop with nothing to do, Airflow's scheduler sleeps for up to
``[scheduler] scheduler_idle_sleep_time`` (1 s). A task that ends in that
sleep waits for the rest of it before the scheduler queues what comes next:
about 0.6 s per step of a linear flow, more than a step's own Metaflow task
takes. A shorter sleep would cost CPU all day on an idle VM (0.2 s: 11% of a
core for the scheduler alone, against 3%).

This runs Airflow's own ``airflow scheduler`` with two changes:

- While it sleeps, it also watches the LocalExecutor's result queue, where
  a worker puts each finished task: a task's end wakes it; when nothing ends
  it sleeps as long as before (every loop empties the queue, so a sleep does
  not end at once on a result already seen). Edge workers' tasks are seen
  after the sleep, as before.
- The supervisor of each task (in the LocalExecutor's workers, forked from
  the scheduler) reports a task's end as soon as its process exits
  (``_notice_exits_at_once``).

When Airflow's internals differ from what this expects, it changes nothing.
"""

from __future__ import annotations

import sys
import time
import weakref
from multiprocessing.connection import wait

# LocalExecutors this process started (normally one).
_executors = weakref.WeakSet()


def install() -> bool:
    """Make the scheduler's idle sleep end when a local task ends; False when
    this Airflow is not the one it was written for (nothing is changed)."""
    try:
        from airflow.executors.local_executor import LocalExecutor
        from airflow.jobs import scheduler_job_runner
    except ImportError:
        return False
    if getattr(scheduler_job_runner, "time", None) is not time or not callable(
            getattr(LocalExecutor, "start", None)):
        return False
    original_start = LocalExecutor.start

    def start(self, *args, **kwargs):
        result = original_start(self, *args, **kwargs)
        try:
            _executors.add(self)
        except TypeError:  # not weakly referable: sleep as Airflow does
            pass
        return result

    LocalExecutor.start = start
    scheduler_job_runner.time = _WakingTime()
    try:
        _notice_exits_at_once()
    except ImportError:
        pass
    return True


def _notice_exits_at_once():
    """Airflow's supervisor of a task (in a LocalExecutor worker, forked from
    this process) waits for the task's sockets, then checks whether the task
    exited. A task that closed its sockets but was not yet reaped leaves it
    waiting on no socket at all, until its select times out (5 s, [workers]
    min_heartbeat_interval): every other step was reported 5 s late, holding
    its slot. With every socket closed, it now waits for the process itself."""
    import inspect

    from airflow.sdk.execution_time.supervisor import WatchedSubprocess

    original = WatchedSubprocess._service_subprocess
    if list(inspect.signature(original).parameters) != [
            "self", "max_wait_time", "raise_on_timeout", "expect_signal"]:
        return

    def _service_subprocess(self, max_wait_time, raise_on_timeout=False, expect_signal=None):
        if getattr(self, "_exit_code", 0) is None and not self.selector.get_map():
            try:
                self._process.wait(timeout=max(0.01, max_wait_time))
            except Exception:  # still running (psutil's TimeoutExpired): checked below
                pass
            max_wait_time = 0
        return original(self, max_wait_time, raise_on_timeout, expect_signal)

    WatchedSubprocess._service_subprocess = _service_subprocess


class _WakingTime:
    """The time module as the scheduler's module sees it: its sleep ends
    early when a LocalExecutor's result queue has something to read."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds):
        readers = [r for r in map(_result_reader, list(_executors)) if r is not None]
        if not readers or seconds <= 0:
            time.sleep(max(seconds, 0))
            return
        try:
            wait(readers, timeout=seconds)
        except (OSError, ValueError):  # a queue closed while the executor ends
            time.sleep(seconds)


def _result_reader(executor):
    """The reading end of the executor's result queue (a multiprocessing
    SimpleQueue), or None."""
    reader = getattr(getattr(executor, "result_queue", None), "_reader", None)
    if reader is None or getattr(reader, "closed", True):
        return None
    return reader


def main():
    if not install():
        print("metaflow-services: this Airflow's scheduler differs from the one "
              "metaflow_services/scheduler.py knows; it runs unchanged (a finished "
              "task is noticed after the idle sleep).", file=sys.stderr, flush=True)
    from airflow.__main__ import main as airflow_main

    sys.argv = ["airflow", "scheduler"] + sys.argv[1:]
    sys.exit(airflow_main())


if __name__ == "__main__":
    main()
