"""Benchmark (issue 15): a wide foreach through Airflow with the deploy's
defaults (docker executor) against Metaflow's own runtime (`python flow.py
run`), in one run on this machine with the same S3 server and metadata.
Prints numbers and, as its last line, ratio=<airflow seconds / metaflow
seconds>; asserts nothing.

    .venv/bin/python benchmarks/bench_foreach.py --width 300
    .venv/bin/python benchmarks/bench_foreach.py --linear 10     # the 10-step linear flow
    .venv/bin/python benchmarks/bench_foreach.py --width 10000 --skip-metaflow --metadata service

Where the time goes, for the foreach's body tasks (from Airflow's task
instances and the times each task's user code records):
- start:    the task instance starting -> its user code starting (container
            start, Python, Metaflow's import, code package, metadata calls);
- user:     the user code itself;
- finish:   user code done -> the task instance done (artifacts, metadata,
            container removal, XCom);
- waiting:  the body's span minus what its tasks kept slots busy for, per slot
            (Airflow's scheduling of mapped tasks, queueing behind parallelism).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]

from metaflow_services import local  # noqa: E402

# The deploy's default on a 4 GB, 2-core VM: 4 task slots (deploy/stack.py
# sizing); Metaflow's runtime gets the same number of workers.
SLOTS = 4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=300, help="splits of the foreach")
    ap.add_argument("--linear", type=int, choices=[10], help="run the 10-step linear flow instead")
    ap.add_argument("--executor", default="docker")
    ap.add_argument("--step-image", default="mfs-step:test")
    ap.add_argument("--slots", type=int, default=SLOTS)
    ap.add_argument("--metadata", choices=["local", "service"], default="local",
                    help="Metaflow's metadata: local files, or the real metadata service "
                         "(the deploy's default; reports its rows)")
    ap.add_argument("--skip-metaflow", action="store_true",
                    help="only the Airflow run (10,000 splits: Metaflow's runtime takes hours)")
    args = ap.parse_args()
    if args.linear:
        flow_file, dag_id, conf = HERE / "flows" / "linear10_flow.py", "Linear10Flow", {}
    else:
        flow_file, dag_id, conf = (HERE / "flows" / "wide_foreach_flow.py", "WideForeachFlow",
                                   {"width": args.width})

    base, mflocal = local.scratch_dir("mfs-bench-foreach-")
    s3, pg = local.SeaweedFS(base), local.Postgres(base)
    env = local.metaflow_env(s3, mflocal, "bench")
    af = svc = None
    try:
        print("starting PostgreSQL, SeaweedFS, Airflow ...", flush=True)
        s3.start()
        pg.start()
        if args.metadata == "service":
            svc = local.MetaflowService(base, pg, s3).start()
            env.update(METAFLOW_DEFAULT_METADATA="service", METAFLOW_SERVICE_URL=svc.url)
        os.environ.update(env)
        af = local.Airflow(base, pg, env, max_map_length=1024, size_default_pool=True,
                           airflow_env={"AIRFLOW__CORE__PARALLELISM": str(args.slots)})
        af.start(local.worker_env(args.executor, base, mflocal, args.step_image))
        api = af.api()
        subprocess.run([str(local.VENV_BIN / "metaflow-services"), "compile", str(flow_file),
                        "-o", str(af.dags)], check=True, stdout=subprocess.DEVNULL)
        api.wait_for_dag(dag_id)
        # The linear flow takes seconds: each side runs it once untimed
        # first, so one-off costs (Airflow's api-server answering its first
        # task, about 2.7 s; cold files for Python) do not count. A deployed
        # stack's smoke test has run a flow before any user's.
        warmups = 1 if args.linear else 0
        native = None
        if not args.skip_metaflow:
            for _ in range(warmups + 1):
                native = metaflow_run(flow_file, args)
        for i in range(warmups):
            airflow_run(api, dag_id, conf, "warmup%d" % i)
            print("(untimed first Airflow run done)", flush=True)

        rows0, db0 = metadata_rows(pg, svc), db_size(pg, af.db)
        usage = Usage({"scheduler": af.procs["scheduler"].pid, "postgres": pg.pid()})
        run_id, airflow = airflow_run(api, dag_id, conf, "bench")
        usage.stop()
        print("airflow + %s executor (%d slots): %.1f s" % (args.executor, args.slots, airflow),
              flush=True)
        print("peak memory (PSS): %s; Airflow's database grew %.1f MB%s" % (
            ", ".join("%s %.0f MB" % kv for kv in usage.peaks.items()),
            (db_size(pg, af.db) - db0) / 1e6,
            "" if svc is None else "; metadata service rows added: %s" % ", ".join(
                "%s %d" % (t, n - rows0[t]) for t, n in metadata_rows(pg, svc).items())),
            flush=True)
        if args.linear:
            linear_breakdown(api, dag_id, run_id)
        else:
            breakdown(api, dag_id, run_id, "work", args.slots)
    finally:
        if af:
            af.stop()
        if svc:
            svc.stop()
        pg.stop()
        s3.stop()
    if native:
        print("ratio=%.2f" % (airflow / native))


def airflow_run(api, dag_id, conf, prefix):
    """One run through Airflow: (its id, seconds from the trigger to its end
    as Airflow recorded it, not the poll that saw it, every 2 s)."""
    t = time.time()
    run_id = api.trigger(dag_id, conf, run_id="%s__%d" % (prefix, time.time()))
    state = api.wait_for_run(dag_id, run_id, timeout=6 * 3600)
    if state != "success":
        raise SystemExit("the Airflow run %s ended %s" % (run_id, state))
    ended = api.get("/api/v2/dags/%s/dagRuns/%s" % (dag_id, run_id))["end_date"]
    return run_id, (_ts(ended) if ended else time.time()) - t


def metaflow_run(flow_file, args):
    t = time.time()
    # Metaflow's runtime refuses more than 100 splits unless told.
    extra = [] if args.linear else ["--max-num-splits", str(args.width + 1),
                                    "--width", str(args.width)]
    proc = subprocess.run([sys.executable, str(flow_file), "--no-pylint", "run",
                           "--max-workers", str(args.slots)] + extra,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          cwd=str(flow_file.parent))
    if proc.returncode:
        raise SystemExit("python %s run failed:\n%s" % (flow_file.name, proc.stderr[-3000:]))
    native = time.time() - t
    print("metaflow runtime (%d workers): %.1f s" % (args.slots, native), flush=True)
    return native


def db_size(pg, db):
    return int(pg.query(db, "SELECT pg_database_size(current_database())")[0][0])


def metadata_rows(pg, svc):
    if svc is None:
        return {}
    return {t: int(pg.query(svc.DB, "SELECT count(*) FROM %s" % t)[0][0])
            for t in ("tasks_v3", "metadata_v3", "artifact_v3")}


class Usage:
    """Peak memory of process trees (PSS: shared pages counted once), sampled
    every 2 s: the scheduler with the task processes it forks, PostgreSQL."""

    def __init__(self, roots):
        self.roots = roots
        self.peaks = {name: 0.0 for name in roots}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.wait(2):
            children = {}
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rsplit(") ", 1)[1].split()
                except (OSError, IndexError):
                    continue
                children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
            for name, root in self.roots.items():
                tree, todo = [], [root]
                while todo:
                    pid = todo.pop()
                    tree.append(pid)
                    todo += children.get(pid, [])
                mb = sum(_pss_kb(pid) for pid in tree) / 1024
                self.peaks[name] = max(self.peaks[name], mb)

    def stop(self):
        self._stop.set()
        self._thread.join()


def _pss_kb(pid):
    try:
        for line in Path("/proc/%d/smaps_rollup" % pid).read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def breakdown(api, dag_id, run_id, body, slots):
    """Where the body's time goes: its task instances (one per split, or per
    range of splits), what an instance spends before its first split's user
    code, and what each split costs inside its instance."""
    from metaflow import Task

    mf_run = _metaflow_run(dag_id, run_id)

    spans, firsts, per_split, sizes = [], [], [], []
    for ti in api.task_instances(dag_id, run_id):
        if ti["task_id"] != body or not ti["start_date"] or not ti["end_date"]:
            continue
        lo, hi = _split_range(ti)
        t0, t1 = _ts(ti["start_date"]), _ts(ti["end_date"])
        spans.append((t0, t1))
        sizes.append(hi - lo)
        per_split.append((t1 - t0) / (hi - lo))
        first = Task("%s/%s/t-%d" % (mf_run, body, lo)).data
        firsts.append((first.started - t0, first.ended - first.started))
    if not spans:
        return
    span = max(e for _, e in spans) - min(s for s, _ in spans)
    busy = sum(e - s for s, e in spans) / slots
    print("body %r: %d task instances of %d-%d splits over %.1f s; per instance: %.2f s "
          "to its first split's user code (Airflow task, container, warm process, Metaflow "
          "task start); per split inside an instance: %.3f s (user code %.4f s); waiting "
          "for Airflow %.1f s (%.0f%% of the span)"
          % (body, len(spans), min(sizes), max(sizes), span,
             statistics.median(f for f, _ in firsts), statistics.median(per_split),
             statistics.median(u for _, u in firsts), max(0.0, span - busy),
             100 * max(0.0, span - busy) / span if span else 0), flush=True)
    _save("foreach", {
        "instances": len(spans), "sizes": sizes, "span": span, "first": firsts,
        "per_split": per_split})


def linear_breakdown(api, dag_id, run_id):
    """Where a linear run's time goes, step after step (medians over its
    tasks): the scheduler noticing the previous task's end (-> queued), the
    executor taking the queued task (-> running), the task instance's start to
    its user code (Airflow's task runner, container, warm process, Metaflow's
    task start), and the user code to the task instance's end."""
    from metaflow import Task

    mf_run = _metaflow_run(dag_id, run_id)

    tis = sorted((ti for ti in api.task_instances(dag_id, run_id) if ti["start_date"]),
                 key=lambda ti: _ts(ti["start_date"]))
    rows, prev_end = [], None
    for ti in tis:
        queued = _ts(ti["queued_when"]) if ti.get("queued_when") else None
        start, end = _ts(ti["start_date"]), _ts(ti["end_date"])
        started = Task("%s/%s/t-0" % (mf_run, ti["task_id"])).data.started
        row = {
            "task": ti["task_id"],
            "to_queued": (queued - prev_end) if queued and prev_end else None,
            "queued_to_running": (start - queued) if queued else None,
            "to_user_code": started - start,
            "user_code_to_end": end - started,
        }
        rows.append(row)
        prev_end = end
        row.update(log_phases(api, dag_id, run_id, ti, started))
    keys = ["to_queued", "queued_to_running", "to_user_code", "user_code_to_end"]
    keys += [k for k, _ in LOG_MARKS] + ["task_to_user_code", "finish"]
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None]
        if vals:
            print("per step, %-18s median %.2f s, max %.2f s" % (k, statistics.median(vals),
                                                                max(vals)), flush=True)
    first = rows[0]
    print("the first step (%s): %s" % (first["task"], ", ".join(
        "%s %.2f s" % (k, first[k]) for k in keys if first.get(k) is not None)), flush=True)
    _save("linear", rows)


# Lines of a task instance's log that end each phase of its start, in order
# (Airflow's task runner, then the platform's runtime, then the container).
LOG_MARKS = [
    ("runner_start", "::group::Pre Execute"),         # TI start -> task process logging
    ("dag_parse", "Worker startup parse complete"),   # -> the DAG file parsed
    ("plan", "Starting Metaflow task"),               # -> the runtime planned the task
    ("container", "Metaflow task(s), attempt"),       # -> the bootstrap's first line
    ("warm_to_task", "attempt 0 starting"),           # -> the task's fork starts
]


def log_phases(api, dag_id, run_id, ti, started):
    """Seconds of each phase of a task instance, from the times of its log
    lines; task_to_user_code ends at the user code's start, finish runs from
    "Post Execute" (the step's end) to the task instance's end."""
    content = api.task_log_content(dag_id, run_id, ti["task_id"], ti.get("try_number") or 1,
                                   ti["map_index"])
    events = [e for e in (content if isinstance(content, list) else []) if isinstance(e, dict)]
    out, prev = {}, _ts(ti["start_date"])
    for key, mark in LOG_MARKS:
        t = next((_ts(e["timestamp"]) for e in events
                  if mark in str(e.get("event")) and e.get("timestamp")), None)
        out[key] = None if t is None or prev is None else t - prev
        prev = t
    out["task_to_user_code"] = None if prev is None else started - prev
    post = next((_ts(e["timestamp"]) for e in events
                 if "Post Execute" in str(e.get("event")) and e.get("timestamp")), None)
    out["finish"] = None if post is None else _ts(ti["end_date"]) - post
    return out


def _metaflow_run(dag_id, run_id):
    """The Metaflow run (pathspec) of an Airflow run, read in any namespace."""
    from metaflow import namespace

    from metaflow_services.spec import run_id_for

    namespace(None)
    return "%s/%s" % (dag_id, run_id_for(dag_id, run_id))


def _save(kind, data):
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / ("%s-%s.json" % (kind, time.strftime("%Y%m%d-%H%M%S")))).write_text(json.dumps(data))


def _ts(v):
    """An Airflow API time as a Unix time."""
    return datetime.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()


def _split_range(ti):
    """[first, stop) of the splits a body task instance ran ("split 3" or
    "splits 0-37", the instance's label)."""
    label = ti.get("rendered_map_index") or ""
    nums = [int(x) for x in label.split()[-1].split("-")] if label.startswith("split") else []
    if not nums:
        return ti["map_index"], ti["map_index"] + 1
    return nums[0], nums[-1] + 1


if __name__ == "__main__":
    main()
