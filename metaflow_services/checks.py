"""What `metaflow-services doctor` checks inside the stack, and the Airflow
REST client the checks and the smoke test share.

They run where the task runtime runs, in the Airflow scheduler container,
whose environment has everything they need (docs/configuration.md): the
database URL, the object store's endpoint and keys, the metadata service's
URL, the Docker socket. Every check returns a ``Check``: what was checked,
whether it passed, what was found and, when it failed, what to do; none
raises.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from . import objectstore
from .airflow_client import airflow_url


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


def check_database() -> Check:
    import psycopg

    try:
        with psycopg.connect(_db_url(), connect_timeout=10) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            rev = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        return Check("database", True, "PostgreSQL %s, Airflow schema %s"
                     % (version, rev[0] if rev else "?"))
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return Check("database", False, "cannot query Airflow's database: %s" % one_line(e),
                     "check the postgres service: docker compose logs postgres")


def check_object_store(ensure_bucket=False) -> Check:
    from botocore.exceptions import ClientError

    bucket = objectstore.bucket_name()
    endpoint = _env("METAFLOW_S3_ENDPOINT_URL", "AWS S3")
    if not bucket:
        return Check("object-store", False, "METAFLOW_DATASTORE_SYSROOT_S3 is not an s3:// URL",
                     "set it in the scheduler's environment (docs/configuration.md)")
    try:
        client = objectstore.s3_client()
        try:
            client.head_bucket(Bucket=bucket)
            return Check("object-store", True, "bucket %s exists at %s" % (bucket, endpoint))
        except ClientError as e:
            if objectstore.error_code(e) not in ("404", "NoSuchBucket", "NotFound") \
                    or not ensure_bucket:
                raise
        client.create_bucket(Bucket=bucket)
        return Check("object-store", True, "bucket %s created at %s" % (bucket, endpoint))
    except Exception as e:  # noqa: BLE001
        return Check("object-store", False, "bucket %s at %s: %s" % (bucket, endpoint,
                                                                      one_line(e)),
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
        return Check("metadata", False, "metadata service %s: %s" % (url, one_line(e)),
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
            problems.append("%s %s: %s" % (name, url, one_line(e)))
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
        return Check("docker", False, "Docker engine not reachable: %s" % one_line(e),
                     "mount /var/run/docker.sock into the scheduler and add the docker group")


def check_airflow() -> Check:
    import requests

    url = airflow_url()
    try:
        r = requests.get(url + "/api/v2/monitor/health", timeout=10)
        data = r.json()
    except Exception as e:  # noqa: BLE001
        return Check("airflow", False, "api-server %s: %s" % (url, one_line(e)),
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
        return Check("job", False, "%s: database not reachable: %s" % (job_type, one_line(e)))
    age = row[0] if row else None
    if age is None:
        return Check("job", False, "no running %s on %s" % (job_type, hostname))
    ok = float(age) <= max_age
    return Check("job", ok, "%s on %s: last heartbeat %.0fs ago" % (job_type, hostname, age))


def last_runs(client, limit=5):
    data = client.request("GET", "/api/v2/dags/~/dagRuns",
                          params={"limit": limit, "order_by": "-start_date"})
    return data.get("dag_runs", [])


def one_line(e):
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return "%s: %s" % (type(e).__name__, text[0] if text else "")
