"""Benchmark: step environments (@pypi). Prints numbers; asserts nothing.

    .venv/bin/python benchmarks/bench_environments.py

The same 5-step linear flow, plain (the step image) and pinned
(@pypi_base: the environment image), through Airflow with the docker
executor, in one run: the first pinned run (which builds the image), a second
pinned run (steady state), and the plain run as the baseline: wall time and
per-step overhead (Airflow task start to user code start).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_runtime as br  # noqa: E402  (also drops the source tree from sys.path)

local = br.local


def main():
    base, mflocal = local.scratch_dir("mfs-bench-env-")
    s3, pg = local.SeaweedFS(base), local.Postgres(base)
    env = local.metaflow_env(s3, mflocal, "bench")
    os.environ.update(env)
    af = None
    try:
        print("starting PostgreSQL, SeaweedFS, Airflow ...", flush=True)
        s3.start()
        pg.start()
        af = local.Airflow(base, pg, env, max_map_length=1024)
        af.start(local.worker_env(
            "docker", base, mflocal,
            MFS_PIP_CERT=os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
            MFS_LOCK_DIR=str(base / "locks"), MFS_STATE_DIR=str(base / "state")))
        api = af.api()
        for sub, dag_id in (("plain5", "Plain5Flow"), ("pinned5", "Pinned5Flow")):
            f = HERE / "flows" / sub / ("%s_flow.py" % sub)
            subprocess.run([str(local.VENV_BIN / "metaflow-services"), "compile", str(f), "-o",
                            str(af.dags)], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            api.wait_for_dag(dag_id)
        subprocess.run("docker images -q metaflow-services/env | xargs -r docker rmi -f",
                       shell=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        br.airflow_run(api, "Plain5Flow")  # warm-up: caches, first-container costs
        results = [("plain (step image)", br.airflow_run(api, "Plain5Flow")),
                   ("pinned, first run (builds the image)", br.airflow_run(api, "Pinned5Flow")),
                   ("pinned, second run (image reused)", br.airflow_run(api, "Pinned5Flow")),
                   ("plain again", br.airflow_run(api, "Plain5Flow"))]
        build = _build_seconds(api, "Pinned5Flow")
        print("environment image build (pip install of six, toolz on the step image): %.1f s"
              % build, flush=True)
        for label, r in results:
            print("%-40s wall %6.1f s  per-step overhead median %.2f s, max %.2f s"
                  % (label, r["wall_seconds"], r["overhead_median"], r["overhead_max"]),
                  flush=True)
    finally:
        if af:
            af.stop()
        pg.stop()
        s3.stop()


def _build_seconds(api, dag_id):
    import re

    runs = api.get("/api/v2/dags/%s/dagRuns" % dag_id, order_by="start_date")["dag_runs"]
    log = api.task_log(dag_id, runs[0]["dag_run_id"], "start")
    m = re.search(r"Built \S+ in ([0-9.]+) s", log)
    return float(m.group(1)) if m else float("nan")


if __name__ == "__main__":
    t = time.time()
    main()
    print("benchmark took %.0f s" % (time.time() - t))
