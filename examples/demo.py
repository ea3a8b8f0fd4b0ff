"""Try metaflow-services on this machine, without a VM: PostgreSQL, SeaweedFS
and Airflow 3 (api-server, scheduler, dag-processor) start as local processes
on loopback, the sample flow is compiled into a DAG, triggered through
Airflow's REST API and checked through the Metaflow client.

    scripts/demo            (keeps Airflow running until Ctrl-C)
    scripts/demo --once     (stops after the run)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
sys.path.insert(0, str(REPO / "tests"))

import harness  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--once", action="store_true", help="stop everything after the run")
    ap.add_argument("--executor", choices=["docker", "subprocess"], default=None,
                    help="default: docker if the step image mfs-step:test exists")
    args = ap.parse_args()
    executor = args.executor or ("docker" if _image_exists("mfs-step:test") else "subprocess")

    base, mflocal = harness.scratch_dir("mfs-demo-")
    s3, pg = harness.SeaweedFS(base), harness.Postgres(base)
    env = harness.metaflow_env(s3, mflocal, os.environ.get("METAFLOW_USER", "demo"))
    os.environ.update(env)
    worker = harness.worker_env(executor, base, mflocal)
    af = harness.Airflow(base, pg, env, max_map_length=1024)
    try:
        step("Starting PostgreSQL, SeaweedFS (S3) and Airflow 3 in %s" % base)
        s3.start()
        pg.start()
        af.start(worker)
        step("Compiling examples/flows/hello_flow.py into %s" % af.dags)
        subprocess.run([str(harness.VENV_BIN / "metaflow-services"), "compile",
                        str(REPO / "examples" / "flows" / "hello_flow.py"), "-o", str(af.dags)],
                       check=True)
        api = af.api()
        api.wait_for_dag("HelloFlow")
        step("Triggering HelloFlow with count=7 through Airflow's REST API (%s executor)"
             % executor)
        run_id = api.trigger("HelloFlow", {"count": 7})
        t = time.time()
        state = api.wait_for_run("HelloFlow", run_id)
        step("Airflow run %s finished: %s in %.0f s" % (run_id, state, time.time() - t))
        from metaflow import Run, namespace

        from metaflow_services.spec import run_id_for

        namespace(None)
        run = Run("HelloFlow/%s" % run_id_for("HelloFlow", run_id))
        print("Metaflow run %s: successful=%s, total=%s" % (
            run.pathspec, run.successful, run["add_up"].task.data.total))
        print("Logs of the end step, through the Metaflow client:\n  "
              + run["end"].task.stdout.strip().replace("\n", "\n  "))
        if state != "success":
            sys.exit(1)
        if not args.once:
            print("\nAirflow UI: %s (user %s, password %s). Ctrl-C stops everything."
                  % (af.url, af.USER, af.password))
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        af.stop()
        pg.stop()
        s3.stop()


def step(msg):
    print("\033[1m==> %s\033[0m" % msg, flush=True)


def _image_exists(tag):
    return subprocess.run(["docker", "image", "inspect", tag], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


if __name__ == "__main__":
    main()
