"""What the tests share: ports, directories and the Metaflow client's
environment, fixed when this module is imported (by conftest.py, before any
test imports metaflow: Metaflow reads its configuration once, at import). The
services themselves start lazily, only for the tests that need them.

Tests import from here, never from conftest: pytest loads every conftest.py
under the module name "conftest", so a second one (tests/deploy/) would
shadow this one.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Test the installed package, never the source tree: with the repository on
# sys.path, Metaflow would find its extension twice and refuse to load.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

FLOWS = Path(__file__).parent / "flows"
VENV_BIN = Path(sys.executable).parent

BASE, MFLOCAL = harness.scratch_dir("mfs-tests-")

# The deploy test modules in the order they run (conftest.py sorts them): the
# first deploy and what users do with it; worker VMs; backup, upgrade and
# restore (onto a new bare VM): after the workers, whose bundle has the images
# of the first deploy, not the upgrade's; the lean variant last (it switches
# the Metaflow services off). Every module must be listed (tests/test_layout.py).
DEPLOY_ORDER = ["test_deploy_refusals", "test_deploy_stack", "test_deploy_stack_dags",
                "test_deploy_stack_flows", "test_deploy_packages", "test_deploy_metaflow",
                "test_deploy_security", "test_deploy_triggers", "test_deploy_readme",
                "test_deploy_workers", "test_deploy_upkeep", "test_deploy_lean"]

SEAWEED = harness.SeaweedFS(BASE)
POSTGRES = harness.Postgres(BASE)
TEST_USER = "tester"

# The client in this process, the compiler and the Airflow workers all see it.
METAFLOW_ENV = harness.metaflow_env(SEAWEED, MFLOCAL, TEST_USER)
os.environ.update(METAFLOW_ENV)

# Settings of the shared Airflow (conftest.airflow()).
MAX_MAP_LENGTH = 8
# Airflow's slots as the runtime sees them (MFS_TASK_SLOTS; the deploy sets the
# VM's): a foreach wider than two per slot maps over ranges of splits.
TASK_SLOTS = 2
UI_URL = "http://metaflow-ui.example.test"
# MFS_TIMEOUT_GRACE_SECONDS: the hard deadline is @timeout + GRACE, counted
# from the step's start (Metaflow's import included). The product's default:
# with 30, a step's start under the e2e batch's load (many containers on two
# cores) sometimes took longer than the grace, and the backstop killed the
# step before @timeout's own alarm could fire (@catch then saw a crash).
GRACE = 60


def deploy_module(name):
    """`deploy.<name>` (the Fabric tasks' package at the repository root),
    imported without leaving the repository on sys.path (see above): once the
    package is loaded, its submodules resolve through its own __path__."""
    if getattr(sys.modules.get("deploy"), "__file__", "") is None:
        del sys.modules["deploy"]  # the tests/deploy folder, seen as a namespace package
    sys.path.insert(0, str(REPO))
    try:
        return importlib.import_module("deploy." + name)
    finally:
        sys.path.remove(str(REPO))


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


VALUE_FLOW = '''from metaflow import FlowSpec, step
from helper import VALUE


class {name}(FlowSpec):
    """{doc}"""

    @step
    def start(self):
        self.value = VALUE
        self.next(self.end)

    @step
    def end(self):
        print("value", self.value)


if __name__ == "__main__":
    {name}()
'''

PLAIN_DAG = '''"""A plain Airflow DAG that lives next to the flows: Airflow's, untouched."""
import datetime

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG

with DAG("{dag_id}", start_date=datetime.datetime(2024, 1, 1), schedule=None,
         is_paused_upon_creation=False):
    BashOperator(task_id="hello", bash_command="echo plain dag ran")
'''


def value_flow(name, doc="A flow: its start step keeps VALUE from helper.py next to it."):
    """The text of a flow file named *name* whose `value` artifact comes from
    the helper module next to it (the watcher and dags folder tests)."""
    return VALUE_FLOW.format(name=name, doc=doc)


def plain_dag(dag_id="plain_dag"):
    return PLAIN_DAG.format(dag_id=dag_id)


TWO_STEPS = """
    from metaflow import FlowSpec, step, {imp}
    {flow_deco}
    class {name}(FlowSpec):
        {param}
        {step_deco}
        @step
        def start(self):
            self.next(self.end)
        @step
        def end(self):
            pass
    if __name__ == "__main__":
        {name}()
"""


def two_step_flow(imp="Parameter", flow_deco="", param="", step_deco="", name="BadFlow"):
    """The text (indented: dedent it) of a two-step flow with the given
    imports, decorators and parameter line."""
    return TWO_STEPS.format(imp=imp, flow_deco=flow_deco, param=param, step_deco=step_deco,
                            name=name)


def process_running(pid):
    """Whether a process runs (a zombie has ended)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False

