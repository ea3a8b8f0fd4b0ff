"""Local prototype for issue 7: Airflow 3.3.2 with LocalExecutor + EdgeExecutor
(apache-airflow-providers-edge3) and edge workers as separate "VMs" (process
groups with their own AIRFLOW_HOME, their own copy of the DAGs folder, and NO
database connection), all on this machine. A record, not product code.

    python3 -m venv /tmp/w
    /tmp/w/bin/pip install apache-airflow==3.3.2 apache-airflow-providers-edge3 'psycopg[binary]'
    /tmp/w/bin/python proto.py [--base /tmp/wproto] [--scenario NAME]

Scenarios:
  routing   edge_proto: one task on LocalExecutor, one on EdgeExecutor queue "gpu".
  failover  edge_kill on queue "big" with two workers; SIGKILL every process of the
            worker running the task (a VM crash; --daemon-only: just the worker's
            process group, as run 1 did); record what Airflow does.
  forge     routing, then mint REST tokens with the worker's jwt_secret (--private-key:
            Airflow's own tokens signed with a key only the main side has).
  nodag     the worker's DAGs folder lacks the DAG file.
  mapped    mapped task with pool_slots on a 2-slot worker; a job needing 3 slots and a
            queue nobody serves (task_queued_timeout 60 s).
  revive    the same with ONE worker on "big", restarted --revive-after seconds later.
Prints a timeline and writes BASE/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg

HERE = Path(__file__).resolve().parent
PGBIN = "/usr/lib/postgresql/15/bin"
EDGE = "airflow.providers.edge3.executors.EdgeExecutor"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    def __init__(self, base: Path, venv: Path, hb_timeout: int, edge_hb: int,
                 private_key=False, all_admins=True):
        self.private_key, self.all_admins = private_key, all_admins
        self.queued_timeout = 600
        self.base, self.venv = base, venv
        self.pg_port, self.api_port = free_port(), free_port()
        self.url = "http://127.0.0.1:%d" % self.api_port
        self.procs = {}
        self.hb_timeout, self.edge_hb = hb_timeout, edge_hb
        self.t0 = time.time()

    # -- environment ------------------------------------------------------------
    def common_env(self, home: Path, dags: Path, hostname: str):
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update({
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            # Two executors: the first is the default for tasks without executor=.
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor," + EDGE,
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__FERNET_KEY": "",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "proto_hostname.get",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": self.url + "/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": str(self.all_admins),  # prototype only
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.base / "passwords.json"),
            "AIRFLOW__API_AUTH__JWT_SECRET": "proto-jwt-secret-" + "x" * 32,
            "AIRFLOW__API__SECRET_KEY": "proto-secret-key",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__EDGE__API_ENABLED": "True",
            "AIRFLOW__EDGE__API_URL": self.url + "/edge_worker/v1/rpcapi",
            "AIRFLOW__EDGE__HEARTBEAT_INTERVAL": str(self.edge_hb),
            "AIRFLOW__EDGE__JOB_POLL_INTERVAL": "2",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(self.hb_timeout),
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": str(self.queued_timeout),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "3",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "3",
            "PYTHONPATH": str(HERE),
            "PROTO_HOSTNAME": hostname,
            "PROTO_MARKER": hostname,
            "PATH": "%s/bin:%s" % (self.venv, os.environ.get("PATH", "")),
        })
        return env

    def main_env(self):
        env = self.common_env(self.base / "main", self.base / "main-dags", "main-vm")
        db = "postgresql+psycopg://postgres@127.0.0.1:%d/airflow" % self.pg_port
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = db
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] = db
        if self.private_key:
            # Airflow's own tokens (UI/REST, task identity) signed with a key only the
            # main VM has; [api_auth] jwt_secret then only serves the edge worker API.
            env["AIRFLOW__API_AUTH__JWT_PRIVATE_KEY_PATH"] = str(self.base / "jwt-key.pem")
        return env

    def worker_env(self, name):
        env = self.common_env(self.base / name, self.base / (name + "-dags"), name)
        # A worker VM has no route to the database: prove it does not need one.
        bogus = "postgresql+psycopg://nobody@127.0.0.1:9/none"
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = bogus
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] = bogus
        env["PROTO_SLEEP"] = "600"
        return env

    # -- processes --------------------------------------------------------------
    def start(self, name, argv, env, user=None):
        log = open(self.base / "logs" / (name + ".log"), "ab")
        if user:
            argv = ["runuser", "-u", user, "--"] + argv
        p = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True,
                             cwd=str(self.base))
        self.procs[name] = p
        return p

    def killpg(self, name, sig=signal.SIGKILL):
        p = self.procs.pop(name, None)
        if p and p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def kill_vm(self, name):
        """A worker VM dies: SIGKILL the worker and everything it started. The
        task supervisor and the task run in their own process groups (setpgid),
        so killing the worker's process group alone leaves the task running (run 1);
        they stay in the worker's session, and are its descendants."""
        p = self.procs.pop(name)
        stats = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open("/proc/%s/stat" % d) as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    stats[int(d)] = (int(fields[1]), int(fields[3]))  # ppid, session
                except OSError:
                    pass
        doomed = {pid for pid, (_, sid) in stats.items() if sid == p.pid} | {p.pid}
        grew = True
        while grew:
            more = {pid for pid, (ppid, _) in stats.items() if ppid in doomed} - doomed
            doomed |= more
            grew = bool(more)
        for pid in sorted(doomed):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()
        return sorted(doomed)

    def stop_all(self):
        for name in list(self.procs)[::-1]:
            self.killpg(name, signal.SIGTERM)

    def up(self):
        if self.base.exists():
            shutil.rmtree(self.base)
        (self.base / "logs").mkdir(parents=True)
        (self.base / "main").mkdir()
        shutil.copytree(HERE / "dags", self.base / "main-dags")
        (self.base / "passwords.json").write_text(json.dumps({"admin": "proto-admin-pw"}))
        if self.private_key:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import ed25519
            pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption())
            (self.base / "jwt-key.pem").write_bytes(pem)
        pg = self.base / "pg"
        pg.mkdir()
        shutil.chown(pg, "postgres")
        subprocess.run(["runuser", "-u", "postgres", "--", PGBIN + "/initdb", "-D", str(pg / "data"),
                        "-U", "postgres", "--auth=trust", "-E", "UTF8"], check=True,
                       stdout=subprocess.DEVNULL)
        self.start("postgres", [PGBIN + "/postgres", "-D", str(pg / "data"), "-p", str(self.pg_port),
                                "-k", str(pg), "-c", "listen_addresses=127.0.0.1",
                                "-c", "fsync=off"], dict(os.environ), user="postgres")
        self.wait(lambda: subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p",
                                          str(self.pg_port)]).returncode == 0, 30, "postgres")
        subprocess.run(["psql", "-q", "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres",
                        "-c", "CREATE DATABASE airflow"], check=True)
        t = time.time()
        subprocess.run([str(self.venv / "bin/airflow"), "db", "migrate"], env=self.main_env(),
                       check=True, stdout=open(self.base / "logs/migrate.log", "w"),
                       stderr=subprocess.STDOUT)
        self.note("db migrate %.0fs" % (time.time() - t))
        af = str(self.venv / "bin/airflow")
        self.start("api-server", [af, "api-server", "--port", str(self.api_port)], self.main_env())
        self.start("scheduler", [af, "scheduler"], self.main_env())
        self.start("dag-processor", [af, "dag-processor"], self.main_env())
        self.wait(self.healthy, 180, "api-server")
        self.note("main 'VM' up: %s" % self.url)

    def start_worker(self, name, queues, concurrency=2, wait=True):
        (self.base / name).mkdir(exist_ok=True)
        dags = self.base / (name + "-dags")
        if not dags.exists():
            shutil.copytree(HERE / "dags", dags)
        self.start(name, [str(self.venv / "bin/airflow"), "edge", "worker", "-q", queues,
                          "-c", str(concurrency), "--edge-hostname", name], self.worker_env(name))
        if not wait:
            return
        self.wait(lambda: self.worker_state(name) == "idle", 120, "edge worker %s" % name)
        self.note("worker %s up (queues %s)" % (name, queues))

    # -- observation --------------------------------------------------------------
    def db(self):
        return psycopg.connect("host=127.0.0.1 port=%d user=postgres dbname=airflow" % self.pg_port,
                               autocommit=True)

    def healthy(self):
        for n, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError("%s exited; see %s/logs/%s.log" % (n, self.base, n))
        try:
            import urllib.request
            with urllib.request.urlopen(self.url + "/api/v2/monitor/health", timeout=3) as r:
                return r.status == 200
        except OSError:
            return False

    def worker_state(self, name):
        try:
            with self.db() as c:
                row = c.execute("select state from edge_worker where worker_name=%s", (name,)).fetchone()
        except psycopg.Error:
            return None
        return row[0] if row else None

    def tis(self, dag_id):
        with self.db() as c:
            return c.execute(
                "select task_id, state, try_number, executor, queue, hostname, pid "
                "from task_instance where dag_id=%s order by task_id", (dag_id,)).fetchall()

    def edge_rows(self):
        with self.db() as c:
            w = c.execute("select worker_name, state, queues, last_update from edge_worker "
                          "order by worker_name").fetchall()
            j = c.execute("select dag_id, task_id, try_number, state, queue, edge_worker "
                          "from edge_job order by dag_id, try_number").fetchall()
        return w, j

    def airflow(self, *args):
        return subprocess.run([str(self.venv / "bin/airflow"), *args], env=self.main_env(),
                              check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True).stdout

    def trigger(self, dag_id):
        def parsed():
            with self.db() as c:
                return c.execute("select 1 from dag where dag_id=%s", (dag_id,)).fetchone()
        self.wait(parsed, 120, "DAG %s parsed" % dag_id)
        self.airflow("dags", "unpause", dag_id)
        self.airflow("dags", "trigger", dag_id)
        self.note("triggered %s" % dag_id)

    def note(self, msg):
        line = "[%7.1fs] %s" % (time.time() - self.t0, msg)
        print(line, flush=True)
        with open(self.base / "timeline.txt", "a") as f:
            f.write(line + "\n")

    @staticmethod
    def wait(pred, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if pred():
                return
            time.sleep(0.5)
        raise RuntimeError("timed out waiting for " + what)


def routing(lab, results):
    lab.start_worker("w-gpu", "gpu")
    lab.trigger("edge_proto")
    lab.wait(lambda: all(r[1] in ("success", "failed") for r in lab.tis("edge_proto"))
             and len(lab.tis("edge_proto")) == 2, 180, "edge_proto done")
    rows = lab.tis("edge_proto")
    for r in rows:
        lab.note("TI %s state=%s try=%s executor=%s queue=%s hostname=%s" % r[:6])
    with lab.db() as c:
        xcoms = c.execute("select task_id, value from xcom where dag_id='edge_proto'").fetchall()
    for t, v in xcoms:
        lab.note("XCom %s = %s" % (t, v if isinstance(v, (str, dict)) else bytes(v).decode()))
    results["routing"] = {"task_instances": [list(map(str, r)) for r in rows]}
    lab.killpg("w-gpu", signal.SIGTERM)


def nodag(lab, results):
    """A worker whose DAGs folder lacks the DAG file (the main VM has it)."""
    (lab.base / "w-gpu-dags").mkdir(parents=True)
    lab.start_worker("w-gpu", "gpu")
    lab.trigger("edge_proto")
    lab.wait(lambda: len(lab.tis("edge_proto")) == 2 and all(
        r[1] in ("success", "failed", "up_for_retry") for r in lab.tis("edge_proto")), 300, "done")
    rows = lab.tis("edge_proto")
    for r in rows:
        lab.note("TI %s state=%s try=%s executor=%s queue=%s hostname=%s" % r[:6])
    results["nodag"] = [list(map(str, r)) for r in rows]


def mapped(lab, results):
    """Mapped instances on a queue with pool_slots; a job larger than any worker;
    a queue no worker serves (task_queued_timeout lowered to 60 s here)."""
    lab.start_worker("w-gpu", "gpu", concurrency=2)
    lab.trigger("edge_mapped")
    t0 = time.time()
    def done():
        with lab.db() as c:
            rows = c.execute("select state from task_instance where dag_id='edge_mapped'").fetchall()
        return len(rows) == 5 and all(r[0] in ("success", "failed") for r in rows)
    try:
        lab.wait(done, 300, "edge_mapped done")
    except RuntimeError as e:
        lab.note(str(e))
    with lab.db() as c:
        rows = c.execute(
            "select task_id, map_index, state, try_number, executor, queue, pool_slots, hostname, "
            "to_char(start_date, 'HH24:MI:SS'), to_char(end_date, 'HH24:MI:SS') "
            "from task_instance where dag_id='edge_mapped' order by task_id, map_index").fetchall()
    for r in rows:
        lab.note("TI %s[%s] state=%s try=%s executor=%s queue=%s pool_slots=%s host=%s %s-%s" % r)
    _, jobs = lab.edge_rows()
    for j in jobs:
        lab.note("edge_job %s" % (j,))
    lab.note("waited %.0fs" % (time.time() - t0))
    results["mapped"] = [list(map(str, r)) for r in rows]


def forge(lab, results):
    """What a worker VM can do with the [api_auth] jwt_secret it must hold:
    mint an admin token for Airflow's REST API."""
    import urllib.error
    import urllib.request
    sys.path.insert(0, str(lab.venv / "lib/python3.11/site-packages"))
    from airflow.api_fastapi.auth.tokens import JWTGenerator
    secret = lab.worker_env("x")["AIRFLOW__API_AUTH__JWT_SECRET"]
    out = {}
    for aud in ("apache-airflow", "api"):
        tok = JWTGenerator(secret_key=secret, valid_for=300, audience=aud).generate(
            {"sub": "admin", "role": "admin"})
        req = urllib.request.Request(lab.url + "/api/v2/dags", headers={"Authorization": "Bearer " + tok})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                code = r.status
        except urllib.error.HTTPError as e:
            code = e.code
        out[aud] = code
        lab.note("forged admin token (aud=%s, signed with jwt_secret) -> GET /api/v2/dags: HTTP %s"
                 % (aud, code))
    req = urllib.request.Request(lab.url + "/api/v2/dags")
    try:
        urllib.request.urlopen(req, timeout=10)
        out["no-token"] = 200
    except urllib.error.HTTPError as e:
        out["no-token"] = e.code
    lab.note("no token -> HTTP %s" % out["no-token"])
    results["forge"] = out


def watch_kill(lab, dag_id, whole_vm=True, revive=None, timeout=900):
    """Wait for the sleeper to run, SIGKILL its worker's process group, and log
    every change of the task instance and of the edge_worker rows."""
    lab.trigger(dag_id)
    lab.wait(lambda: (lab.tis(dag_id) or [[None, None]])[0][1] == "running", 180, "sleeper running")
    time.sleep(5)
    ti = lab.tis(dag_id)[0]
    victim = ti[5]
    t_kill = time.time()
    if whole_vm:
        pids = lab.kill_vm(victim)
        lab.note("sleeper running on %s (try %s); SIGKILL all its processes %s"
                 % (victim, ti[2], pids))
    else:
        lab.note("sleeper running on %s (try %s); SIGKILL the worker's process group only"
                 % (victim, ti[2]))
        lab.killpg(victim, signal.SIGKILL)
    last, last_w, timeline, revived = None, None, [], False
    while time.time() - t_kill < timeout:
        ti = lab.tis(dag_id)[0]
        cur = (ti[1], ti[2], ti[5])
        w, _ = lab.edge_rows()
        cur_w = tuple((r[0], r[1]) for r in w)
        dt = time.time() - t_kill
        if cur != last:
            lab.note("+%5.1fs after kill: TI state=%s try=%s hostname=%s" % ((dt,) + cur))
            timeline.append({"t": round(dt, 1), "state": cur[0], "try": cur[1], "host": cur[2]})
            last = cur
        if cur_w != last_w:
            lab.note("+%5.1fs after kill: workers %s" % (dt, cur_w))
            timeline.append({"t": round(dt, 1), "workers": cur_w})
            last_w = cur_w
        if revive and dt >= revive:
            # Like a container restart policy: start it again whenever it exits
            # (a worker whose name is still "active" in the DB refuses to start).
            p = lab.procs.get(victim)
            if p is None or p.poll() is not None:
                lab.note("+%5.1fs: (re)starting worker %s%s" % (
                    dt, victim, "" if p is None else " (previous start exited %s)" % p.returncode))
                lab.procs.pop(victim, None)
                lab.start_worker(victim, "big", wait=False)
                time.sleep(4)
        if cur[0] in ("success", "failed") and (cur[1] or 0) >= 1:
            break
        time.sleep(1)
    _, jobs = lab.edge_rows()
    for j in jobs:
        lab.note("edge_job %s" % (j,))
    return {"victim": victim, "timeline": timeline, "edge_jobs": [list(map(str, j)) for j in jobs]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="/tmp/wproto")
    ap.add_argument("--venv", default="/tmp/w")
    ap.add_argument("--scenario", default="all", choices=["routing", "failover", "revive", "forge", "nodag", "mapped", "all"])
    ap.add_argument("--private-key", action="store_true",
                    help="sign Airflow's own tokens with a private key (forge scenario)")
    ap.add_argument("--hb-timeout", type=int, default=60,
                    help="[scheduler] task_instance_heartbeat_timeout (Airflow default 300)")
    ap.add_argument("--edge-hb", type=int, default=10,
                    help="[edge] heartbeat_interval (provider default 30)")
    ap.add_argument("--revive-after", type=int, default=30)
    ap.add_argument("--daemon-only", action="store_true",
                    help="failover: kill only the edge worker's process group (run 1 did this)")
    args = ap.parse_args()
    lab = Lab(Path(args.base), Path(args.venv), args.hb_timeout, args.edge_hb,
              private_key=args.private_key, all_admins=args.scenario != "forge")
    if args.scenario == "mapped":
        lab.queued_timeout = 60
    results = {"task_instance_heartbeat_timeout": args.hb_timeout,
               "edge_heartbeat_interval": args.edge_hb}
    try:
        lab.up()
        if args.scenario in ("routing", "all"):
            routing(lab, results)
        if args.scenario in ("failover", "all"):
            lab.start_worker("w-big-1", "big")
            lab.start_worker("w-big-2", "big")
            results["failover"] = watch_kill(lab, "edge_kill", whole_vm=not args.daemon_only)
            for n in ("w-big-1", "w-big-2"):
                lab.killpg(n, signal.SIGTERM)
        if args.scenario == "mapped":
            mapped(lab, results)
        if args.scenario == "nodag":
            nodag(lab, results)
        if args.scenario == "forge":
            routing(lab, results)
            forge(lab, results)
        if args.scenario == "revive":
            lab.start_worker("w-big-1", "big")
            results["revive"] = watch_kill(lab, "edge_kill", revive=args.revive_after)
    finally:
        (lab.base / "results.json").write_text(json.dumps(results, indent=1, default=str))
        lab.stop_all()


if __name__ == "__main__":
    sys.exit(main())
