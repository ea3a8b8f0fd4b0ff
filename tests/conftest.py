"""Shared fixtures.

Ports, directories and the Metaflow client's environment are fixed when this
file is imported, before any test imports metaflow (Metaflow reads its
configuration once, at import). The services themselves start lazily, only for
the tests that need them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Test the installed package, never the source tree: with the repository on
# sys.path, Metaflow would find its extension twice and refuse to load.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

FLOWS = Path(__file__).parent / "flows"
VENV_BIN = Path(sys.executable).parent

BASE, MFLOCAL = harness.scratch_dir("mfs-tests-")

SEAWEED = harness.SeaweedFS(BASE)
POSTGRES = harness.Postgres(BASE)
TEST_USER = "tester"

# The client in this process, the compiler and the Airflow workers all see it.
METAFLOW_ENV = harness.metaflow_env(SEAWEED, MFLOCAL, TEST_USER)
os.environ.update(METAFLOW_ENV)


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


def docker_available():
    return subprocess.run(["docker", "info"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def compile_flow(flow_file, out_dir, env=None, extra_args=(), check=True):
    """Run `metaflow-services compile` as a user would; returns the process."""
    run_env = dict(os.environ)
    run_env.update(env or {})
    proc = subprocess.run(
        [str(VENV_BIN / "metaflow-services"), "compile", str(flow_file), "-o", str(out_dir),
         *extra_args],
        env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    if check and proc.returncode != 0:
        raise AssertionError("compile of %s failed:\n%s\n%s" % (flow_file, proc.stdout, proc.stderr))
    return proc


# Settings of the shared Airflow (see airflow()).
MAX_MAP_LENGTH = 8  # small, so a 20-way foreach exceeds it
UI_URL = "http://metaflow-ui.example.test"
GRACE = 30  # MFS_TIMEOUT_GRACE_SECONDS: the hard deadline is @timeout + GRACE


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
