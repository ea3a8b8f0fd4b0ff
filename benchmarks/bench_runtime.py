"""Benchmark: Metaflow flows run by Metaflow's own runtime vs. through Airflow
with each executor, all in one run on this machine. Prints numbers; asserts
nothing.

    .venv/bin/python benchmarks/bench_runtime.py [--executors docker,subprocess]

Measures, for a 10-step linear flow and a 100-way foreach:
- end-to-end wall time (trigger to finished), and its ratio to Metaflow's runtime;
- per-step overhead: from the Airflow task instance's start to the step's user
  code starting (each step records time.time() as its first statement);
- the parse time of a generated DAG file (what the dag-processor pays).
Targets (issue 2): overhead <= 3 s with docker (aim 1.5 s), linear flow within
2x of Metaflow's runtime, DAG parse < 0.2 s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Metaflow must not see the source tree (it would find its extension twice).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]

from metaflow_services import local  # noqa: E402  (the local stack's services)

FLOWS = {"linear10": ("linear10_flow.py", "Linear10Flow"),
         "foreach100": ("foreach100_flow.py", "Foreach100Flow")}
PARALLELISM = 8


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--executors", default="docker,subprocess")
    ap.add_argument("--step-image", default="mfs-step:test")
    args = ap.parse_args()
    executors = [e for e in args.executors.split(",") if e]

    base, mflocal = local.scratch_dir("mfs-bench-")
    s3, pg = local.SeaweedFS(base), local.Postgres(base)
    env = local.metaflow_env(s3, mflocal, "bench")
    os.environ.update(env)
    af = None
    results = {"machine": os.uname().nodename, "when": datetime.datetime.utcnow().isoformat()}
    try:
        print("starting PostgreSQL, SeaweedFS, Airflow ...", flush=True)
        s3.start()
        pg.start()
        af = local.Airflow(base, pg, env, max_map_length=1024)
        af.start({"MFS_EXECUTOR": "subprocess"})
        api = af.api()
        for key, (fname, dag_id) in FLOWS.items():
            subprocess.run([str(local.VENV_BIN / "metaflow-services"), "compile",
                            str(HERE / "flows" / fname), "-o", str(af.dags)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            api.wait_for_dag(dag_id)

        results["dag_parse_seconds"] = parse_time(af.dags / "Foreach100Flow.py")
        print("DAG parse: %.3f s (warm Airflow, as the dag-processor parses)"
              % results["dag_parse_seconds"], flush=True)

        for key, (fname, flow) in FLOWS.items():
            t = metaflow_native(HERE / "flows" / fname)
            results["%s/metaflow" % key] = {"wall_seconds": t}
            print("%-12s metaflow runtime      wall %6.1f s" % (key, t), flush=True)

        for executor in executors:
            af.start_scheduler(local.worker_env(executor, base, mflocal, args.step_image))
            time.sleep(5)
            api = af.api()
            for key, (fname, dag_id) in FLOWS.items():
                r = airflow_run(api, dag_id)
                results["%s/%s" % (key, executor)] = r
                native = results["%s/metaflow" % key]["wall_seconds"]
                print("%-12s airflow + %-10s wall %6.1f s (%.2fx metaflow)  per-step overhead "
                      "median %.2f s, p90 %.2f s, max %.2f s  (%d tasks)"
                      % (key, executor, r["wall_seconds"], r["wall_seconds"] / native,
                         r["overhead_median"], r["overhead_p90"], r["overhead_max"],
                         r["tasks"]), flush=True)
    finally:
        if af:
            af.stop()
        pg.stop()
        s3.stop()
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    path = out / ("runtime-%s.json" % time.strftime("%Y%m%d-%H%M%S"))
    path.write_text(json.dumps(results, indent=1))
    print("results written to %s" % path)


def parse_time(dag_file, repeats=5):
    """Seconds to import a generated DAG file with Airflow already imported."""
    code = ("import time, runpy, airflow.sdk, sys\n"
            "ts = []\n"
            "for i in range(%d):\n"
            "    for m in [m for m in sys.modules if m.startswith('metaflow_services')]:\n"
            "        del sys.modules[m]\n"
            "    t = time.perf_counter(); runpy.run_path(%r); ts.append(time.perf_counter() - t)\n"
            "print(min(ts))\n" % (repeats, str(dag_file)))
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         check=True).stdout
    return float(out.strip().splitlines()[-1])


def metaflow_native(flow_file):
    t = time.time()
    subprocess.run([sys.executable, str(flow_file), "--no-pylint", "run", "--max-workers",
                    str(PARALLELISM)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, cwd=str(flow_file.parent))
    return time.time() - t


def airflow_run(api, dag_id):
    from metaflow import Run, namespace

    from metaflow_services.spec import run_id_for

    t = time.time()
    run_id = api.trigger(dag_id, run_id="bench__%d" % time.time())
    state = api.wait_for_run(dag_id, run_id, timeout=1800)
    wall = time.time() - t
    if state != "success":
        raise SystemExit("benchmark run %s/%s ended %s" % (dag_id, run_id, state))
    namespace(None)
    run = Run("%s/%s" % (dag_id, run_id_for(dag_id, run_id)))
    starts = {}
    for step in run:
        for task in step:
            starts[(step.id, task.id)] = task.data.started
    overheads = []
    for ti in api.task_instances(dag_id, run_id):
        ti_start = datetime.datetime.fromisoformat(ti["start_date"].replace("Z", "+00:00")).timestamp()
        # Tasks of this Airflow task instance: one, except for grouped splits.
        step = ti["task_id"]
        mine = [v for (s, tid), v in starts.items() if s == step and
                (ti["map_index"] < 0 or tid == "t-%d" % ti["map_index"])]
        for user_start in mine:
            overheads.append(user_start - ti_start)
    overheads.sort()
    return {"wall_seconds": wall, "tasks": len(overheads),
            "overhead_median": statistics.median(overheads),
            "overhead_p90": overheads[int(len(overheads) * 0.9) - 1],
            "overhead_max": overheads[-1]}


if __name__ == "__main__":
    main()
