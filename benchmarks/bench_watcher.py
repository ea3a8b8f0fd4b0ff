"""Benchmark: the flow-watcher on a dags folder. Prints numbers; asserts nothing.

    .venv/bin/python benchmarks/bench_watcher.py

- time from dropping a flow file to its DAG being visible in Airflow's REST
  API, and to its first task running (after a trigger at visibility);
- the watcher's CPU use while idle, watching 50 flows, against an idle
  `sleep` process as the baseline, measured over 60 s.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_runtime as br  # noqa: E402

local = br.local
REPO = HERE.parent


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    base, mflocal = local.scratch_dir("mfs-bench-watch-")
    s3, pg = local.SeaweedFS(base), local.Postgres(base)
    env = local.metaflow_env(s3, mflocal, "bench")
    os.environ.update(env)
    af = watcher = idle = None
    try:
        print("starting PostgreSQL, SeaweedFS, Airflow, the watcher ...", flush=True)
        s3.start()
        pg.start()
        af = local.Airflow(base, pg, env, max_map_length=1024)
        af.start(local.worker_env("subprocess", base, mflocal))
        flows = af.dags   # as in the stack: flows go into Airflow's dags folder
        watcher = local.Process("watcher", [str(local.VENV_BIN / "metaflow-services"), "watch",
                                              "--flows", str(flows)],
                                  dict(os.environ), base)
        api = af.api()
        time.sleep(3)
        t0 = time.time()
        shutil.copy(REPO / "examples" / "flows" / "hello_flow.py", flows / "hello_flow.py")

        def visible():
            r = api.session.get(api.url + "/api/v2/dags/HelloFlow", timeout=10)
            return r.status_code == 200
        local.wait_for(visible, 300, "HelloFlow to appear", interval=0.2)
        t_visible = time.time() - t0
        api.patch("/api/v2/dags/HelloFlow", {"is_paused": False})
        run_id = api.trigger("HelloFlow")

        def running():
            return any(ti["state"] in ("running", "success")
                       for ti in api.task_instances("HelloFlow", run_id))
        local.wait_for(running, 300, "the first task to run", interval=0.2)
        t_running = time.time() - t0
        print("drop -> DAG visible in Airflow:   %.1f s" % t_visible)
        print("drop -> first task running:       %.1f s (triggered as soon as visible)" % t_running)

        for i in range(49):  # 50 flows in the folder
            d = flows / ("copy%02d" % i)
            d.mkdir()
            (d / "hello_flow.py").write_text(
                (REPO / "examples" / "flows" / "hello_flow.py").read_text()
                .replace("class HelloFlow", "class Hello%02dFlow" % i)
                .replace("HelloFlow()", "Hello%02dFlow()" % i))
        print("compiling 49 more flows ...", flush=True)
        state = af.dags / ".metaflow-services" / "state.json"
        local.wait_for(lambda: state.read_text().count('"status": "ok"') >= 50, 900,
                         "50 compiled flows", interval=2)
        idle = local.Process("idle", ["sleep", "600"], dict(os.environ), base)
        time.sleep(2)
        w0, i0, t = cpu_seconds(watcher.proc.pid), cpu_seconds(idle.proc.pid), time.time()
        time.sleep(60)
        dt = time.time() - t
        w = (cpu_seconds(watcher.proc.pid) - w0) / dt * 100
        b = (cpu_seconds(idle.proc.pid) - i0) / dt * 100
        print("watcher CPU while idle, 50 flows: %.2f%% of one core (idle baseline %.2f%%)" % (w, b))
    finally:
        for p in (watcher, idle):
            if p:
                p.stop()
        if af:
            af.stop()
        pg.stop()
        s3.stop()


if __name__ == "__main__":
    main()
