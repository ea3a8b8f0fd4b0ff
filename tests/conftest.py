"""Shared fixtures and session hooks. What tests import lives in support.py."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from support import (BASE, GRACE, MAX_MAP_LENGTH, METAFLOW_ENV, POSTGRES, SEAWEED,  # noqa: E402
                     UI_URL, harness)


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


@pytest.fixture(scope="session")
def seaweedfs():
    if SEAWEED.proc is None:
        SEAWEED.start()
    return SEAWEED


@pytest.fixture(scope="session")
def postgres():
    if POSTGRES.proc is None:
        POSTGRES.start()
    return POSTGRES


@pytest.fixture(scope="session")
def airflow(postgres, seaweedfs):
    """One real Airflow 3.3 (api-server, LocalExecutor scheduler,
    dag-processor) for all end-to-end tests; modules restart its scheduler
    with the worker settings they need (harness.Airflow.start_scheduler)."""
    env = dict(METAFLOW_ENV, MFS_METAFLOW_UI_URL=UI_URL, MFS_TIMEOUT_GRACE_SECONDS=str(GRACE))
    af = harness.Airflow(BASE, postgres, env, max_map_length=MAX_MAP_LENGTH)
    af.start({"MFS_EXECUTOR": "subprocess"})
    yield af
    af.stop()
