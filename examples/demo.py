"""Try metaflow-services on this machine, without a VM: `metaflow-services
local up` starts PostgreSQL, SeaweedFS and Airflow 3 (api-server, scheduler,
dag-processor) as local processes on loopback, the sample flow is compiled
into the stack's dags folder, triggered through Airflow's REST API and checked
through the Metaflow client.

    scripts/demo                     (keeps the stack running until Ctrl-C)
    scripts/demo --once              (stops it after the run)
    scripts/demo --metadata-service  (runs recorded in the Metaflow metadata service)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Metaflow must not see the source tree (it would find its extension twice).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
CLI = str(Path(sys.executable).parent / "metaflow-services")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--once", action="store_true", help="stop everything after the run")
    ap.add_argument("--executor", choices=["docker", "subprocess"], default=None,
                    help="default: docker if the step image mfs-step:test exists")
    ap.add_argument("--metadata-service", action="store_true",
                    help="also run the Metaflow metadata service (image mfs-metadata:test)")
    args = ap.parse_args()
    executor = args.executor or ("docker" if _image_exists("mfs-step:test") else "subprocess")

    folder = Path(tempfile.mkdtemp(prefix="mfs-demo-", dir="/tmp"))
    up = [CLI, "local", "up", "--dir", str(folder), "--executor", executor]
    # Free ports: the demo must not clash with a stack or service already running.
    up += ["--airflow-port", "0", "--s3-port", "0", "--postgres-port", "0"]
    if args.metadata_service:
        up += ["--metadata-service", "--metadata-port", "0", "--ui-backend-port", "0"]
    step(" ".join(["metaflow-services"] + up[1:]))
    if subprocess.run(up).returncode != 0:
        sys.exit(1)
    down = [CLI, "local", "down", "--dir", str(folder)]
    try:
        ok = run_hello(folder, executor)
        if ok and not args.once:
            print("\nThe stack keeps running (see above for the Airflow URL and login). "
                  "Ctrl-C stops it.")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        ok = True
    finally:
        step("metaflow-services local down --dir %s" % folder)
        subprocess.run(down + (["--purge"] if ok else []))
    if not ok:
        print("The stack's logs stay in %s." % folder)
        sys.exit(1)


def run_hello(folder, executor):
    from metaflow_services.local import LocalStack

    stack = LocalStack(folder)
    os.environ.update(stack.client_env())  # before Metaflow is imported: it reads it once
    dags = folder / "dags"
    step("metaflow-services compile examples/flows/hello_flow.py -o %s" % dags)
    subprocess.run([CLI, "compile", str(REPO / "examples" / "flows" / "hello_flow.py"),
                    "-o", str(dags)], check=True)
    api = stack.api()
    api.wait_for_dag("HelloFlow")
    step("Triggering HelloFlow with count=7 through Airflow's REST API (%s executor)" % executor)
    run_id = api.trigger("HelloFlow", {"count": 7})
    t = time.time()
    state = api.wait_for_run("HelloFlow", run_id)
    step("Airflow run %s finished: %s in %.0f s" % (run_id, state, time.time() - t))
    if state != "success":
        return False
    from metaflow import Run, namespace

    from metaflow_services.spec import run_id_for

    namespace(None)
    run = Run("HelloFlow/%s" % run_id_for("HelloFlow", run_id))
    print("Metaflow run %s: successful=%s, total=%s" % (
        run.pathspec, run.successful, run["add_up"].task.data.total))
    print("Logs of the end step, through the Metaflow client:\n  "
          + run["end"].task.stdout.strip().replace("\n", "\n  "))
    return bool(run.successful)


def step(msg):
    print("\033[1m==> %s\033[0m" % msg, flush=True)


def _image_exists(tag):
    return subprocess.run(["docker", "image", "inspect", tag], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


if __name__ == "__main__":
    main()
