"""Shared fixtures and session hooks. What tests import lives in support.py."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from support import (BASE, DEPLOY_ORDER, GRACE, MAX_MAP_LENGTH, METAFLOW_ENV, POSTGRES,  # noqa: E402
                     SEAWEED, TASK_SLOTS, UI_URL, harness)


def pytest_sessionfinish(session, exitstatus):
    for svc in (POSTGRES, SEAWEED):
        try:
            svc.stop()
        except Exception:
            pass
    if exitstatus == 0 and not os.environ.get("MFS_KEEP_TEST_DIRS"):
        shutil.rmtree(BASE, ignore_errors=True)
    else:
        print("\ntest services' logs and data: %s" % BASE)


# Local services started by the fixtures below, stopped before the deploy tests
# (which need none of them and run last) and again, harmlessly, at the end.
_RUNNING = []


@pytest.fixture(scope="session")
def seaweedfs():
    if SEAWEED.proc is None:
        SEAWEED.start()
        _RUNNING.append(SEAWEED)
    return SEAWEED


@pytest.fixture(scope="session")
def postgres():
    if POSTGRES.proc is None:
        POSTGRES.start()
        _RUNNING.append(POSTGRES)
    return POSTGRES


@pytest.fixture(scope="session")
def airflow(postgres, seaweedfs):
    """One real Airflow 3.3 (api-server, LocalExecutor scheduler,
    dag-processor) for all end-to-end tests; modules restart its scheduler
    with the worker settings they need (harness.Airflow.start_scheduler)."""
    env = dict(METAFLOW_ENV, MFS_METAFLOW_UI_URL=UI_URL, MFS_TIMEOUT_GRACE_SECONDS=str(GRACE),
               MFS_TASK_SLOTS=str(TASK_SLOTS))
    af = harness.Airflow(BASE, postgres, env, max_map_length=MAX_MAP_LENGTH)
    af.start({"MFS_EXECUTOR": "subprocess"})
    _RUNNING.append(af)
    yield af
    af.stop()


@pytest.fixture(scope="module")
def metaflow_service(postgres, seaweedfs):
    """The real Metaflow metadata service and UI backend (containers of the
    test image mfs-metadata:test, built by scripts/prepare) on the test
    PostgreSQL and SeaweedFS."""
    svc = harness.MetaflowService(BASE, postgres, seaweedfs)
    _RUNNING.append(svc)
    try:
        svc.start()
    except Exception:
        svc.stop()
        raise
    yield svc
    svc.stop()


# The deploy test modules share one VM and run in support.DEPLOY_ORDER.


def pytest_collection_modifyitems(session, config, items):
    """The deploy tests run last. Their VM's stack (a whole Airflow, PostgreSQL
    and object store) stays up until the session ends and would load this
    machine under the end-to-end tests, whose step deadlines (@timeout plus
    grace) are real."""
    def key(item):
        if item.get_closest_marker("deploy") is None:
            return (0, 0)
        name = item.module.__name__.rsplit(".", 1)[-1]
        # A module missing here would run after the lean variant and the new
        # VM: tests/test_layout.py checks that every deploy module is listed.
        return (1, DEPLOY_ORDER.index(name) if name in DEPLOY_ORDER else len(DEPLOY_ORDER))
    items.sort(key=key)


def pytest_runtest_setup(item):
    # The same the other way round: the local Airflow, PostgreSQL and S3
    # server of the other tests stop before the deploy tests start.
    if item.get_closest_marker("deploy") and _RUNNING:
        for svc in reversed(_RUNNING):
            svc.stop()
        _RUNNING.clear()
