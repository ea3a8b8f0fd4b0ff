"""Benchmark: what Airflow's dag-processor pays to parse a flow's DAG.
Prints numbers; asserts nothing.

    .venv/bin/python benchmarks/bench_dag_parse.py [--repeat 7]

The flows of benchmarks/flows and examples/flows are compiled (code packages
into a local SeaweedFS) into a folder, as the flow-watcher does. Then, like
the dag-processor (a parent that has Airflow imported forks one child per
file), each file is imported in a forked child and timed:

- each generated DAG file (target: under 0.2 s);
- the baseline, measured in the same run: a plain Airflow DAG file with as
  many tasks as the largest flow has steps (EmptyOperator);
- for scale, importing a flow file itself (what parsing flow files directly
  would cost: Metaflow's import). The stack never does this.

The last line is `parse_seconds_per_flow=<median over the flows>`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLOWS = [REPO / "benchmarks" / "flows" / "linear10_flow.py",
         REPO / "benchmarks" / "flows" / "foreach100_flow.py",
         REPO / "examples" / "flows" / "hello_flow.py"]

PLAIN = '''
import datetime
from airflow.sdk import DAG
from airflow.providers.standard.operators.empty import EmptyOperator

with DAG("plain_baseline", start_date=datetime.datetime(2024, 1, 1), schedule=None):
    prev = None
    for i in range({n}):
        t = EmptyOperator(task_id="t%d" % i)
        if prev is not None:
            prev >> t
        prev = t
'''


def compile_flows(out: Path, env) -> list:
    files = []
    for flow in FLOWS:
        proc = subprocess.run([sys.executable, "-m", "metaflow_services.cli", "compile",
                               str(flow), "-o", str(out), "--json"], env=env, cwd=str(flow.parent),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit("compiling %s failed:\n%s" % (flow, proc.stderr[-2000:]))
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        files.append((summary["flow"], Path(summary["dag_file"]), len(summary["steps"])))
    return files


def timed_import_in_child(path: Path) -> tuple:
    """(seconds, imported metaflow?) for importing *path* in a forked child."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        import importlib.util

        t0 = time.perf_counter()
        try:
            sys.path.insert(0, str(path.parent))
            spec = importlib.util.spec_from_file_location("mfs_bench_%d" % os.getpid(), path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            ok = 1
        except Exception:
            ok = 0
        took = time.perf_counter() - t0
        os.write(w, json.dumps([took, "metaflow" in sys.modules, ok]).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    took, metaflow, ok = json.loads(data)
    if not ok:
        raise SystemExit("importing %s failed" % path)
    return took, metaflow


def median_import(path, repeat):
    runs = [timed_import_in_child(path) for _ in range(repeat)]
    return statistics.median(t for t, _ in runs), runs[0][1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=7, help="imports per file (median)")
    args = ap.parse_args()

    from metaflow_services import local

    base, mflocal = local.scratch_dir("mfs-bench-parse-")
    s3 = local.SeaweedFS(base)
    try:
        print("starting SeaweedFS and compiling %d flows ..." % len(FLOWS), flush=True)
        s3.start()
        env = dict(os.environ, **local.metaflow_env(s3, mflocal, "bench"),
                   METAFLOW_TEMPDIR=tempfile.gettempdir())
        out = base / "dags"
        generated = compile_flows(out, env)
        os.environ.update(env)   # the flow-file import below needs the same settings
        largest = max(n for _, _, n in generated)
        plain = out / "plain_baseline.py"
        plain.write_text(PLAIN.format(n=largest))

        # The dag-processor's parent has Airflow and the SDK imported already.
        import airflow.sdk  # noqa: F401
        from airflow.providers.standard.operators.empty import EmptyOperator  # noqa: F401

        base_s, _ = median_import(plain, args.repeat)
        print("%-34s %7.3f s  (baseline: plain DAG, %d tasks)" % ("plain_baseline.py", base_s,
                                                                   largest))
        per_flow = []
        for flow, dag_file, steps in generated:
            s, mf = median_import(dag_file, args.repeat)
            per_flow.append(s)
            print("%-34s %7.3f s  %4.1fx baseline, %d steps, imports Metaflow: %s"
                  % (dag_file.name, s, s / base_s, steps, "YES" if mf else "no"))
        for flow_file in FLOWS[:1]:
            s, _ = median_import(flow_file, max(3, args.repeat // 2))
            print("%-34s %7.3f s  (the flow file itself, for scale: Metaflow's import)"
                  % (flow_file.name, s))
        print("target: under 0.2 s per flow")
        print("parse_seconds_per_flow=%.3f" % statistics.median(per_flow))
    finally:
        s3.stop()


if __name__ == "__main__":
    main()
