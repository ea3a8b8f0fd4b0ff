"""Apache Airflow 3 on loopback for the local stack: api-server, scheduler
(LocalExecutor: its forked workers run the tasks) and dag-processor on the
local PostgreSQL, plus a small client of Airflow's REST API."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import requests

from .services import VENV_BIN, LocalStackError, Process, binary, free_port, wait_for


def fernet_key():
    """A key for Airflow's Fernet encryption (what Fernet.generate_key makes)."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


class Airflow:
    """api-server + scheduler (LocalExecutor) + dag-processor on PostgreSQL."""

    USER = "admin"
    INSTALL = "Apache Airflow (pip install 'metaflow-services[airflow]')"

    def __init__(self, base: Path, postgres, task_env: dict, max_map_length=8,
                 db="airflow", airflow_env=None, port=None, password=None, keys=None,
                 size_default_pool=False):
        self.home = base / ("airflow" if db == "airflow" else db)
        self.dags = base / ("dags" if db == "airflow" else db + "-dags")
        self.db = db
        self.port = port or free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.password = password or secrets.token_urlsafe(12)
        # The api-server's signing keys: generated unless given (kept by `local`).
        self.keys = dict(keys or {"jwt_secret": secrets.token_urlsafe(32),
                                  "secret_key": secrets.token_urlsafe(24),
                                  "fernet_key": fernet_key()})
        self.postgres = postgres
        self.task_env = dict(task_env)
        self.max_map_length = max_map_length
        self.airflow_env = dict(airflow_env or {})  # wins over the defaults below
        self.size_default_pool = size_default_pool
        self.procs = {}
        self.pids = None

    def env(self, extra=None):
        env = dict(os.environ)
        env.update(self.task_env)
        env.update({
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
            # As on the VM: flow files in the dags folder are not DAG files.
            "AIRFLOW__CORE__MIGHT_CONTAIN_DAG_CALLABLE": "metaflow_services.watcher.might_contain_dag",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__CORE__MAX_MAP_LENGTH": str(self.max_map_length),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            # Variables (the platform's @secrets) and connections encrypted at rest.
            "AIRFLOW__CORE__FERNET_KEY": self.keys.get("fernet_key", ""),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": self.url + "/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "%s:admin" % self.USER,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.postgres.url(self.db),
            # psycopg 3 serves Airflow's async engine too (else it wants asyncpg).
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": self.postgres.url(self.db),
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API_AUTH__JWT_SECRET": self.keys["jwt_secret"],
            "AIRFLOW__API__SECRET_KEY": self.keys["secret_key"],
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "3",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "3",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "PATH": "%s:%s" % (VENV_BIN, os.environ.get("PATH", "")),
        })
        env.update(self.airflow_env)
        env.update(extra or {})
        return env

    def start(self, worker_env=None, pids=None):
        """Migrates the database and starts the three processes; returns when
        the api-server answers. `pids`: a folder to write their pid files to."""
        airflow = binary("airflow", self.INSTALL)
        self.home.mkdir(parents=True, exist_ok=True)
        self.dags.mkdir(parents=True, exist_ok=True)
        self.pids = pids
        path = self.home / "passwords.json"
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({self.USER: self.password}, f)
        self.postgres.ensure_database(self.db)
        proc = subprocess.run([airflow, "db", "migrate"], env=self.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise LocalStackError("airflow db migrate failed:\n" + proc.stdout[-3000:])
        self._start("api-server", [airflow, "api-server", "--port", str(self.port)], self.env())
        self._start("dag-processor", [airflow, "dag-processor"], self.env())
        self.start_scheduler(worker_env or {})
        wait_for(self._healthy, 180, "Airflow api-server")
        if self.size_default_pool:
            # As on the VM (airflow-init): users' tasks take at most as many
            # slots as the LocalExecutor has workers. Airflow 3.3's
            # LocalExecutor does not count what it was handed against its
            # parallelism, so with the default pool (128 slots) the scheduler
            # hands it every runnable task; one that waits for a worker for
            # more than 10 minutes fails ("Invalid auth token": its token
            # expired in the queue). The tests' Airflow keeps Airflow's pool.
            self.api().set_pool_slots("default_pool",
                                      int(self.env()["AIRFLOW__CORE__PARALLELISM"]))

    def _start(self, name, argv, env):
        self.procs[name] = p = Process(name, argv, env, self.home)
        if self.pids:
            p.write_pidfile(Path(self.pids) / ("airflow-%s.pid" % name))

    def start_scheduler(self, worker_env):
        """(Re)start the scheduler; with the LocalExecutor its forked workers run
        the tasks, so worker_env (e.g. MFS_EXECUTOR) reaches every task."""
        old = self.procs.pop("scheduler", None)
        if old:
            old.stop()
        self.worker_env = dict(worker_env)
        # As in the stack (compose.yaml): Airflow's scheduler, woken by a
        # task's end (metaflow_services/scheduler.py).
        python = Path(binary("airflow", self.INSTALL)).with_name("python")
        python = str(python) if python.exists() else sys.executable
        # -P: the working directory (a checkout, for tests) is not put first
        # on sys.path, as with the `airflow` command.
        self._start("scheduler", [python, "-P", "-m", "metaflow_services.scheduler"],
                    self.env(worker_env))

    def _healthy(self):
        for name, p in self.procs.items():
            if not p.alive():
                raise RuntimeError("airflow %s exited:\n%s" % (name, p.tail()))
        r = requests.get(self.url + "/api/v2/monitor/health", timeout=5)
        return r.status_code == 200

    def api(self):
        return AirflowAPI(self.url, self.USER, self.password)

    def stop(self):
        for p in self.procs.values():
            p.stop()


class AirflowAPI:
    def __init__(self, url, user, password):
        self.url = url
        self.session = requests.Session()
        r = requests.post(url + "/auth/token", json={"username": user, "password": password},
                          timeout=30)
        r.raise_for_status()
        self.session.headers["Authorization"] = "Bearer " + r.json()["access_token"]

    def set_pool_slots(self, pool, slots):
        r = self.session.patch(self.url + "/api/v2/pools/" + pool, params={"update_mask": "slots"},
                               json={"slots": slots}, timeout=30)
        r.raise_for_status()

    def get(self, path, **params):
        r = self.session.get(self.url + path, params=params, timeout=30)
        r.raise_for_status()
        return r.json()

    def post(self, path, body):
        r = self.session.post(self.url + path, json=body, timeout=30)
        if r.status_code >= 400:
            raise RuntimeError("POST %s -> %s %s" % (path, r.status_code, r.text))
        return r.json()

    def patch(self, path, body):
        r = self.session.patch(self.url + path, json=body, timeout=30)
        r.raise_for_status()
        return r.json()

    def wait_for_dag(self, dag_id, timeout=120):
        def present():
            r = self.session.get(self.url + "/api/v2/dags/" + dag_id, timeout=10)
            return r.status_code == 200

        try:
            wait_for(present, timeout, "DAG %s to be parsed" % dag_id, interval=1)
        except TimeoutError:
            errors = self.get("/api/v2/importErrors")
            raise TimeoutError("DAG %s did not appear; import errors: %s" % (dag_id, errors))
        self.patch("/api/v2/dags/" + dag_id, {"is_paused": False})

    def trigger(self, dag_id, conf=None, run_id=None):
        body = {"logical_date": None, "conf": conf or {}}
        if run_id:
            body["dag_run_id"] = run_id
        return self.post("/api/v2/dags/%s/dagRuns" % dag_id, body)["dag_run_id"]

    def run_state(self, dag_id, run_id):
        return self.get("/api/v2/dags/%s/dagRuns/%s" % (dag_id, run_id))["state"]

    def wait_for_run(self, dag_id, run_id, timeout=600):
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.run_state(dag_id, run_id)
            if state in ("success", "failed"):
                return state
            time.sleep(2)
        raise TimeoutError("DAG run %s/%s still %s after %ss" % (dag_id, run_id, state, timeout))

    def task_instances(self, dag_id, run_id):
        """Every task instance of the run: Airflow's API pages them (100 at
        most, whatever `limit` asks)."""
        found = []
        while True:
            page = self.get("/api/v2/dags/%s/dagRuns/%s/taskInstances" % (dag_id, run_id),
                            limit=100, offset=len(found))["task_instances"]
            found += page
            if len(page) < 100:
                return found

    def task_log_content(self, dag_id, run_id, task_id, try_number=1, map_index=-1):
        """A task instance's log as Airflow's API gives it: a list of events
        (dicts with "event", "timestamp", ...) or, for some logs, text."""
        r = self.session.get(
            self.url + "/api/v2/dags/%s/dagRuns/%s/taskInstances/%s/logs/%d"
            % (dag_id, run_id, task_id, try_number),
            params={"map_index": map_index, "full_content": "true"},
            headers={"Accept": "application/json"}, timeout=30)
        r.raise_for_status()
        return r.json().get("content")

    def task_log(self, dag_id, run_id, task_id, try_number=1, map_index=-1):
        content = self.task_log_content(dag_id, run_id, task_id, try_number, map_index)
        if isinstance(content, list):
            lines = []
            for c in content:
                if not isinstance(c, dict):
                    lines.append(str(c))
                    continue
                lines.append(c.get("event", ""))
                for err in c.get("error_detail") or ():  # a failure's exception text
                    lines.append("%s: %s" % (err.get("exc_type"), err.get("exc_value")))
            return "\n".join(lines)
        return str(content)
