"""Health checks of a deployed stack, and its smoke test.

They run where the task runtime runs, in the Airflow scheduler container,
whose environment has everything they need (docs/configuration.md): the
database URL, the object store's endpoint and keys, the metadata service's
URL, the Docker socket. Entry point: ``metaflow-services doctor``, used

* by ``fab deploy`` (``--ensure-bucket``, ``--smoke-test``) and ``fab status``,
* by the dag-processor's and triggerer's container healthchecks (``--job``),
* by an operator on the VM:
  ``docker compose exec airflow-scheduler metaflow-services doctor``,
* and from a workstation, through the entry point a Metaflow profile names:
  ``metaflow-services doctor --profile NAME`` (``workstation_checks``).

Every check returns a ``Check``: what was checked, whether it passed, what was
found and, when it failed, what to do.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

SMOKE_DAG_ID = "metaflow_services_smoke_test"
SMOKE_FLOW = "MetaflowServicesSmokeTest"
SMOKE_FLOW_SOURCE = '''\
"""Deployed by `fab deploy` to check the platform end to end: the run starts a
step container, stores artifacts in the object store and records metadata."""
from metaflow import FlowSpec, step


class MetaflowServicesSmokeTest(FlowSpec):
    @step
    def start(self):
        import socket

        self.greeting = "hello from %s" % socket.gethostname()
        self.next(self.end)

    @step
    def end(self):
        self.checked = self.greeting.startswith("hello")
        print(self.greeting)


if __name__ == "__main__":
    MetaflowServicesSmokeTest()
'''


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _env(name, default=None):
    return os.environ.get(name, default)


def _db_url():
    url = _env("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------


def check_database() -> Check:
    import psycopg

    try:
        with psycopg.connect(_db_url(), connect_timeout=10) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            rev = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        return Check("database", True, "PostgreSQL %s, Airflow schema %s"
                     % (version, rev[0] if rev else "?"))
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return Check("database", False, "cannot query Airflow's database: %s" % _one_line(e),
                     "check the postgres service: docker compose logs postgres")


def bucket_name():
    root = _env("METAFLOW_DATASTORE_SYSROOT_S3", "")
    return root[len("s3://"):].split("/", 1)[0] if root.startswith("s3://") else ""


def s3_client():
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=_env("METAFLOW_S3_ENDPOINT_URL"),
                        config=Config(retries={"max_attempts": 3}, connect_timeout=10,
                                      read_timeout=30, s3={"addressing_style": "path"}))


def check_object_store(ensure_bucket=False) -> Check:
    from botocore.exceptions import ClientError

    bucket = bucket_name()
    endpoint = _env("METAFLOW_S3_ENDPOINT_URL", "AWS S3")
    if not bucket:
        return Check("object-store", False, "METAFLOW_DATASTORE_SYSROOT_S3 is not an s3:// URL",
                     "set it in the scheduler's environment (docs/configuration.md)")
    try:
        client = s3_client()
        try:
            client.head_bucket(Bucket=bucket)
            return Check("object-store", True, "bucket %s exists at %s" % (bucket, endpoint))
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code"))
            if code not in ("404", "NoSuchBucket", "NotFound") or not ensure_bucket:
                raise
        client.create_bucket(Bucket=bucket)
        return Check("object-store", True, "bucket %s created at %s" % (bucket, endpoint))
    except Exception as e:  # noqa: BLE001
        return Check("object-store", False, "bucket %s at %s: %s" % (bucket, endpoint,
                                                                      _one_line(e)),
                     "check the object store service and the S3 keys; `fab deploy` creates "
                     "the bucket")


def check_metadata() -> Check:
    import requests

    mode = _env("METAFLOW_DEFAULT_METADATA", "local")
    if mode != "service":
        root = _env("METAFLOW_DATASTORE_SYSROOT_LOCAL", "")
        ok = bool(root) and os.access(root, os.W_OK)
        return Check("metadata", ok, "local metadata in %s%s" % (root, "" if ok else
                                                                  " (not writable)"),
                     "" if ok else "mount the shared metadata volume writable")
    url = _env("METAFLOW_SERVICE_URL", "").rstrip("/")
    try:
        r = requests.get(url + "/ping", timeout=10)
        ok = r.status_code == 200 and "pong" in r.text
        return Check("metadata", ok, "metadata service %s: %s" % (url, "pong" if ok else
                                                                 "HTTP %d" % r.status_code),
                     "" if ok else "docker compose logs metadata")
    except Exception as e:  # noqa: BLE001
        return Check("metadata", False, "metadata service %s: %s" % (url, _one_line(e)),
                     "docker compose logs metadata")


def check_metaflow_ui() -> Check:
    """The UI backend (the Metaflow UI's API and websocket) and the UI's web
    server, from inside the stack (MFS_METAFLOW_UI_BACKEND_URL and
    MFS_METAFLOW_UI_INTERNAL_URL; unset without the Metaflow services)."""
    import requests

    backend = _env("MFS_METAFLOW_UI_BACKEND_URL", "").rstrip("/")
    ui = _env("MFS_METAFLOW_UI_INTERNAL_URL", "").rstrip("/")
    if not backend and not ui:
        return Check("metaflow-ui", True, "not deployed (metaflow_services: false)")
    problems, seen = [], []
    for name, url, expect in (("UI backend", backend + "/ping", "pong"),
                              ("UI", ui + "/", "Metaflow UI")):
        try:
            r = requests.get(url, timeout=10)
            if r.status_code == 200 and expect in r.text:
                seen.append("%s %s: ok" % (name, url))
            else:
                problems.append("%s %s: HTTP %d" % (name, url, r.status_code))
        except Exception as e:  # noqa: BLE001
            problems.append("%s %s: %s" % (name, url, _one_line(e)))
    return Check("metaflow-ui", not problems, "; ".join(problems + seen),
                 "" if not problems else "docker compose logs metaflow-ui-backend metaflow-ui")


def check_docker() -> Check:
    if _env("MFS_EXECUTOR", "subprocess") != "docker":
        return Check("docker", True, "not used (MFS_EXECUTOR=%s)" % _env("MFS_EXECUTOR",
                                                                        "subprocess"))
    try:
        import docker

        client = docker.from_env(timeout=20)
        client.ping()
        image = _env("MFS_STEP_IMAGE")
        if image:
            try:
                client.images.get(image)
                found = "step image %s present" % image
            except docker.errors.ImageNotFound:
                if _env("MFS_DOCKER_PULL", "missing") == "never":
                    return Check("docker", False, "step image %s is not on this host" % image,
                                 "load it (fab deploy --bundle) or build it")
                found = "step image %s will be pulled on first use" % image
        else:
            found = "no MFS_STEP_IMAGE (flows must be compiled with --image)"
        return Check("docker", True, "engine %s reachable; %s"
                     % (client.version().get("Version", "?"), found))
    except Exception as e:  # noqa: BLE001
        return Check("docker", False, "Docker engine not reachable: %s" % _one_line(e),
                     "mount /var/run/docker.sock into the scheduler and add the docker group")


def check_airflow() -> Check:
    import requests

    url = _airflow_url()
    try:
        r = requests.get(url + "/api/v2/monitor/health", timeout=10)
        data = r.json()
    except Exception as e:  # noqa: BLE001
        return Check("airflow", False, "api-server %s: %s" % (url, _one_line(e)),
                     "docker compose logs airflow-api-server")
    parts, bad = [], []
    for comp in ("metadatabase", "scheduler", "triggerer", "dag_processor"):
        status = (data.get(comp) or {}).get("status")
        parts.append("%s %s" % (comp, status))
        if status != "healthy":
            bad.append(comp)
    return Check("airflow", not bad, ", ".join(parts),
                 "" if not bad else "docker compose logs airflow-%s"
                 % bad[0].replace("_", "-").replace("metadatabase", "api-server"))


def job_alive(job_type, max_age=90) -> Check:
    """Whether this container's Airflow job (dag-processor, triggerer) is
    running and heartbeating, read from the database (cheaper than `airflow
    jobs check`, which imports all of Airflow every 30 seconds)."""
    import psycopg

    hostname = socket.getfqdn()
    try:
        with psycopg.connect(_db_url(), connect_timeout=10) as conn:
            row = conn.execute(
                "SELECT EXTRACT(EPOCH FROM (now() - max(latest_heartbeat))) FROM job "
                "WHERE job_type = %s AND state = 'running' AND hostname = %s",
                (job_type, hostname)).fetchone()
    except Exception as e:  # noqa: BLE001
        return Check("job", False, "%s: database not reachable: %s" % (job_type, _one_line(e)))
    age = row[0] if row else None
    if age is None:
        return Check("job", False, "no running %s on %s" % (job_type, hostname))
    ok = float(age) <= max_age
    return Check("job", ok, "%s on %s: last heartbeat %.0fs ago" % (job_type, hostname, age))


# ---------------------------------------------------------------------------
# Airflow REST
# ---------------------------------------------------------------------------


def _airflow_url():
    return _env("MFS_AIRFLOW_INTERNAL_URL", "http://airflow-api-server:8080").rstrip("/")


class AirflowClient:
    def __init__(self, user, password, url=None):
        import requests

        self.url = url or _airflow_url()
        self.session = requests.Session()
        r = requests.post(self.url + "/auth/token", json={"username": user, "password": password},
                          timeout=30)
        if r.status_code >= 400:
            raise RuntimeError("Airflow login as %s failed: HTTP %d" % (user, r.status_code))
        self.session.headers["Authorization"] = "Bearer " + r.json()["access_token"]

    def request(self, method, path, **kw):
        r = self.session.request(method, self.url + path, timeout=30, **kw)
        if r.status_code >= 400:
            raise RuntimeError("%s %s: HTTP %d %s" % (method, path, r.status_code, r.text[:300]))
        return r.json() if r.content else {}


def last_runs(client, limit=5):
    data = client.request("GET", "/api/v2/dags/~/dagRuns",
                          params={"limit": limit, "order_by": "-start_date"})
    return data.get("dag_runs", [])


# ---------------------------------------------------------------------------
# The smoke test
# ---------------------------------------------------------------------------


def smoke_test(user, password, timeout=600, say=print) -> Check:
    """A hello flow compiled with `metaflow-services compile` into the dags
    folder, triggered through Airflow's REST API, checked in Airflow and
    through the Metaflow client (run status, metadata and artifacts)."""
    from .spec import run_id_for

    t0 = time.time()
    dags = _env("MFS_DAGS_FOLDER", "/opt/airflow/dags")
    with tempfile.TemporaryDirectory(prefix="mfs-smoke-") as tmp:
        flow_file = os.path.join(tmp, "smoke_test_flow.py")
        with open(flow_file, "w") as f:
            f.write(SMOKE_FLOW_SOURCE)
        env = dict(os.environ, METAFLOW_USER=_env("METAFLOW_USER") or "smoke-test")
        proc = subprocess.run([sys.executable, "-m", "metaflow_services.cli", "compile", flow_file,
                               "-o", dags, "--dag-id", SMOKE_DAG_ID],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            return Check("smoke-test", False, "compiling the hello flow failed: %s"
                         % proc.stdout.strip()[-800:], "see the output above")
    say("compiled %s into %s/%s.py (%.0fs)" % (SMOKE_FLOW, dags, SMOKE_DAG_ID, time.time() - t0))

    client = AirflowClient(user, password)
    deadline = time.time() + 180
    while True:
        try:
            client.request("GET", "/api/v2/dags/%s" % SMOKE_DAG_ID)
            break
        except RuntimeError:
            if time.time() > deadline:
                errors = client.request("GET", "/api/v2/importErrors").get("import_errors", [])
                mine = [e for e in errors if SMOKE_DAG_ID in e.get("filename", "")]
                return Check("smoke-test", False, "Airflow did not load the DAG within 180s%s"
                             % (": %s" % mine[0].get("stack_trace", "")[-500:] if mine else ""),
                             "docker compose logs airflow-dag-processor")
            time.sleep(2)
    client.request("PATCH", "/api/v2/dags/%s" % SMOKE_DAG_ID, json={"is_paused": False})
    airflow_run = "smoke__%s" % time.strftime("%Y%m%dT%H%M%S")
    client.request("POST", "/api/v2/dags/%s/dagRuns" % SMOKE_DAG_ID,
                   json={"logical_date": None, "dag_run_id": airflow_run, "conf": {}})
    say("triggered %s run %s" % (SMOKE_DAG_ID, airflow_run))

    deadline = time.time() + timeout
    last = None
    while True:
        state = client.request("GET", "/api/v2/dags/%s/dagRuns/%s"
                               % (SMOKE_DAG_ID, airflow_run))["state"]
        tis = client.request("GET", "/api/v2/dags/%s/dagRuns/%s/taskInstances"
                             % (SMOKE_DAG_ID, airflow_run)).get("task_instances", [])
        progress = ", ".join("%s %s" % (t["task_id"], t.get("state") or "none")
                             for t in sorted(tis, key=lambda t: t["task_id"]))
        if progress != last:
            say("%3.0fs  %s" % (time.time() - t0, progress or state))
            last = progress
        if state in ("success", "failed"):
            break
        if time.time() > deadline:
            return Check("smoke-test", False, "the run is still %s after %ds" % (state, timeout),
                         "docker compose logs airflow-scheduler")
        time.sleep(3)
    if state != "success":
        failed = [t["task_id"] for t in tis if t.get("state") != "success"]
        return Check("smoke-test", False, "the run %s failed (tasks: %s)"
                     % (airflow_run, ", ".join(failed)),
                     "open it in the Airflow UI (DAG %s) for the task logs" % SMOKE_DAG_ID)

    from metaflow import Run, namespace

    namespace(None)
    pathspec = "%s/%s" % (SMOKE_FLOW, run_id_for(SMOKE_DAG_ID, airflow_run))
    run = Run(pathspec)
    if not run.successful or run.data.checked is not True or \
            not str(run.data.greeting).startswith("hello"):
        return Check("smoke-test", False, "Metaflow run %s: successful=%s, artifacts %r"
                     % (pathspec, run.successful, getattr(run.data, "greeting", None)),
                     "check the object store and the metadata")
    return Check("smoke-test", True, "run %s succeeded in %.0fs; Metaflow run %s has its "
                 "artifacts (%r)" % (airflow_run, time.time() - t0, pathspec, run.data.greeting))


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------

CHECKS = {
    "database": check_database,
    "object-store": None,   # takes ensure_bucket
    "metadata": check_metadata,
    "metaflow-ui": check_metaflow_ui,
    "docker": check_docker,
    "airflow": check_airflow,
}


def versions():
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("apache-airflow", "metaflow", "metaflow-services", "docker", "boto3"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def doctor(args) -> int:
    """`metaflow-services doctor`: see cli.py for the arguments."""
    if args.profile:
        return _print(workstation_checks(args.profile, args.airflow_user,
                                         _env("MFS_DOCTOR_AIRFLOW_PASSWORD")), args.json)
    if args.job:
        c = job_alive(args.job, args.max_age)
        print(("ok: " if c.ok else "FAILED: ") + c.detail)
        return 0 if c.ok else 1
    if args.versions:
        for k, v in versions().items():
            print("%-18s %s" % (k, v))
        return 0

    results = []
    names = args.only or list(CHECKS)
    for name in names:
        if name == "object-store":
            results.append(check_object_store(ensure_bucket=args.ensure_bucket))
        else:
            results.append(CHECKS[name]())
    password = _env("MFS_DOCTOR_AIRFLOW_PASSWORD")
    if args.last_runs:
        if not password:
            results.append(Check("last-runs", False, "no MFS_DOCTOR_AIRFLOW_PASSWORD given"))
        else:
            try:
                runs = last_runs(AirflowClient(args.airflow_user, password), args.last_runs)
                detail = "; ".join("%s %s %s" % (r["dag_id"], r["dag_run_id"], r["state"])
                                   for r in runs) or "no runs yet"
                results.append(Check("last-runs", True, detail))
            except Exception as e:  # noqa: BLE001
                results.append(Check("last-runs", False, _one_line(e)))
    say = (lambda s: None) if args.json else (lambda s: print(s, flush=True))
    if args.smoke_test:
        if not password:
            results.append(Check("smoke-test", False, "no Airflow password given",
                                 "set MFS_DOCTOR_AIRFLOW_PASSWORD (fab deploy does)"))
        else:
            try:
                results.append(smoke_test(args.airflow_user, password, args.timeout, say))
            except Exception as e:  # noqa: BLE001
                results.append(Check("smoke-test", False, _one_line(e),
                                     "docker compose logs airflow-scheduler"))
    return _print(results, args.json)


def _print(results, as_json=False) -> int:
    if as_json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        for r in results:
            line = "%s %-13s %s" % ("ok  " if r.ok else "FAIL", r.name, r.detail)
            if not r.ok and r.fix:
                line += "  (what to do: %s)" % r.fix
            print(line)
    return 0 if all(r.ok for r in results) else 1


# ---------------------------------------------------------------------------
# From a workstation: the deployment a Metaflow profile points at
# ---------------------------------------------------------------------------


def load_profile(name):
    home = os.path.expanduser(os.environ.get("METAFLOW_HOME", "~/.metaflowconfig"))
    path = os.path.join(home, "config_%s.json" % name)
    try:
        with open(path) as f:
            return path, json.load(f)
    except OSError:
        return path, None


def _reach_problem(e, url, ca):
    """A one-line diagnosis of a failed request, and what to do."""
    import requests

    text = str(e)
    if isinstance(e, requests.exceptions.SSLError) or "CERTIFICATE_VERIFY_FAILED" in text:
        return ("TLS certificate of %s not trusted (CA file: %s)" % (url, ca or "none"),
                "run fab client-config again (it saves the VM's certificate next to the profile)")
    if isinstance(e, (requests.exceptions.ConnectionError, OSError)) or "connect" in text.lower():
        return ("cannot reach %s: %s" % (url, text.splitlines()[0][:160]),
                "check the address and firewall, or open `fab -H HOST tunnel` and use a "
                "profile made with `fab client-config --tunnel`")
    if isinstance(e, requests.exceptions.Timeout):
        return ("%s did not answer in time" % url, "check the VM: fab -H HOST status")
    return ("%s: %s" % (type(e).__name__, text[:160]), "fab -H HOST status")


def workstation_checks(profile_name, airflow_user="admin", password=None):
    import requests

    path, prof = load_profile(profile_name)
    if prof is None:
        return [Check("profile", False, "no Metaflow profile %s" % path,
                      "write it: fab -H HOST client-config --name %s" % profile_name)]
    ca = prof.get("METAFLOW_S3_VERIFY_CERTIFICATE") or os.environ.get("REQUESTS_CA_BUNDLE")
    verify = ca or True
    http = requests.Session()
    http.trust_env = False  # else REQUESTS_CA_BUNDLE wins over the profile's CA
    results = [Check("profile", True, path)]

    airflow = prof.get("MFS_AIRFLOW_URL")
    if not airflow:
        results.append(Check("airflow", False, "the profile names no Airflow URL",
                             "write it again with fab client-config"))
    else:
        try:
            r = http.get(airflow + "/api/v2/monitor/health", timeout=15, verify=verify)
            r.raise_for_status()
            health = r.json()
            bad = [k for k, v in health.items() if isinstance(v, dict)
                   and v.get("status") not in (None, "healthy")]
            results.append(Check("airflow", not bad, "%s: %s" % (
                airflow, "healthy" if not bad else "unhealthy: " + ", ".join(bad)),
                "" if not bad else "fab -H HOST status; fab -H HOST logs -s airflow-" + bad[0]))
            denied = http.get(airflow + "/api/v2/dags", timeout=15, verify=verify).status_code
            results.append(Check("airflow-auth", denied in (401, 403),
                                 "the REST API without a token: HTTP %d" % denied,
                                 "" if denied in (401, 403) else "the API answers without "
                                 "credentials: check the deployment's auth settings"))
            if password:
                r = http.post(airflow + "/auth/token", json={"username": airflow_user,
                                                             "password": password},
                              timeout=15, verify=verify)
                results.append(Check("airflow-login", r.status_code in (200, 201),
                                     "user %s: HTTP %d" % (airflow_user, r.status_code),
                                     "get the password: fab -H HOST secrets --name "
                                     "MFS_AIRFLOW_PASSWORD_%s" % airflow_user.upper()))
        except Exception as e:  # noqa: BLE001
            results.append(Check("airflow", False, *_reach_problem(e, airflow, ca)))

    results.append(_check_profile_s3(prof, ca))

    if prof.get("METAFLOW_DEFAULT_METADATA") == "service":
        url = prof.get("METAFLOW_SERVICE_URL", "")
        try:
            ok = http.get(url + "/ping", timeout=15, verify=verify,
                          headers={"x-api-key": prof.get("METAFLOW_SERVICE_AUTH_KEY", "")})
            denied = http.get(url + "/ping", timeout=15, verify=verify).status_code
            results.append(Check("metadata", ok.status_code == 200,
                                 "%s/ping with the key: HTTP %d" % (url, ok.status_code),
                                 "" if ok.status_code == 200 else
                                 "write the profile again with fab client-config; "
                                 "fab -H HOST logs -s metadata"))
            results.append(Check("metadata-auth", denied in (401, 403),
                                 "without the key: HTTP %d" % denied))
        except Exception as e:  # noqa: BLE001
            results.append(Check("metadata", False, *_reach_problem(e, url, ca)))
        ui = prof.get("MFS_METAFLOW_UI_URL", "")
        if ui:
            try:
                status = http.get(ui.rstrip("/") + "/", timeout=15, verify=verify).status_code
                results.append(Check("metaflow-ui", status == 401,
                                     "%s: HTTP %d%s" % (ui, status, " (asks for its password)"
                                                        if status == 401 else ""),
                                     "" if status == 401 else "fab -H HOST status; "
                                     "fab -H HOST logs -s metaflow-ui"))
            except Exception as e:  # noqa: BLE001
                results.append(Check("metaflow-ui", False, *_reach_problem(e, ui, ca)))
    else:
        results.append(Check("metadata", True, "local (this deployment runs without the "
                                               "metadata service)"))
    return results


def _check_profile_s3(prof, ca):
    import boto3
    from botocore.config import Config

    root = prof.get("METAFLOW_DATASTORE_SYSROOT_S3", "")
    bucket = root[len("s3://"):].split("/", 1)[0]
    endpoint = prof.get("METAFLOW_S3_ENDPOINT_URL")
    params = dict(prof.get("METAFLOW_DATATOOLS_CLIENT_PARAMS") or {})
    params.pop("config", None)
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, verify=ca or True,
                          config=Config(s3={"addressing_style": "path"},
                                        retries={"max_attempts": 2}, connect_timeout=10),
                          **params)
        s3.head_bucket(Bucket=bucket)
        return Check("object-store", True, "%s: bucket %s readable with the profile's keys"
                     % (endpoint, bucket))
    except Exception as e:  # noqa: BLE001
        code = getattr(e, "response", {}).get("Error", {}).get("Code", "") if hasattr(
            e, "response") else ""
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return Check("object-store", False, "%s refused the profile's keys (%s)"
                         % (endpoint, code), "write the profile again with fab client-config")
        if code in ("404", "NoSuchBucket"):
            return Check("object-store", False, "no bucket %s at %s" % (bucket, endpoint),
                         "fab -H HOST deploy creates it")
        what, fix = _reach_problem(e, endpoint, ca)
        return Check("object-store", False, what, fix)


def _one_line(e):
    text = str(e).strip().splitlines()
    return "%s: %s" % (type(e).__name__, text[0] if text else "")
