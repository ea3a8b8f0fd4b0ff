"""The Metaflow metadata service and its UI backend for the local stack:
containers of an image of metaflow-service (mfs-metadata:test, which
scripts/prepare builds from the vendored upstream source with
tests/images/build metadata) on the host's network, with a `metaflow` role and
database in the local PostgreSQL. The UI backend reads task logs and artifacts
from the local S3 server, as in the deployed stack."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import requests

from .services import LocalStackError, binary, free_ports, wait_for

IMAGE = "mfs-metadata:test"
LABEL = "metaflow-services.local"  # value: the stack's folder


class MetaflowService:
    """`names` maps migrate/metadata/ui-backend to container names; `labels`
    are put on every container (so a later command can find them)."""

    DB = "metaflow"
    ROLES = ("migrate", "metadata", "ui-backend")

    def __init__(self, base: Path, postgres, seaweedfs, image=None, port=None, ui_port=None,
                 names=None, labels=None, db_password=None):
        self.dir = base / "metaflow-service"
        self.postgres = postgres
        self.seaweedfs = seaweedfs
        self.image = image or IMAGE
        free = iter(free_ports(2))
        self.port, self.ui_port = port or next(free), ui_port or next(free)
        self.url = "http://127.0.0.1:%d" % self.port
        self.ui_url = "http://127.0.0.1:%d" % self.ui_port
        tag = "%d-%s" % (os.getpid(), secrets.token_hex(3))
        self.names = dict(names or {role: "mfs-local-%s-%s" % (role, tag) for role in self.ROLES})
        self.labels = dict(labels or {})
        self.db_password = db_password or secrets.token_urlsafe(16)
        self.started = []

    def check(self):
        """Fails with what to do when Docker or the image is missing."""
        docker = binary("docker", "Docker (Debian: apt-get install docker.io)")
        info = subprocess.run([docker, "info"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if info.returncode != 0:
            raise LocalStackError("the Docker engine does not answer (docker info failed)",
                                  "start dockerd, or leave out --metadata-service")
        found = subprocess.run([docker, "image", "inspect", self.image], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        if found.returncode != 0:
            raise LocalStackError("image %s not found" % self.image,
                                  "build it with tests/images/build metadata (scripts/prepare "
                                  "does) or pass --metadata-image")

    def _db_env(self):
        return {"MF_METADATA_DB_HOST": "127.0.0.1", "MF_METADATA_DB_PORT": str(self.postgres.port),
                "MF_METADATA_DB_USER": "metaflow", "MF_METADATA_DB_PSWD": self.db_password,
                "MF_METADATA_DB_NAME": self.DB, "MF_MIGRATION_ENDPOINTS_ENABLED": "0"}

    def _docker_run(self, role, argv, env, detach=True):
        name = self.names[role]
        cmd = ["docker", "run", "--name", name, "--network", "host", "--init"]
        for k, v in self.labels.items():
            cmd += ["--label", "%s=%s" % (k, v)]
        for k, v in env.items():
            cmd += ["-e", "%s=%s" % (k, v)]
        cmd += ["-d"] if detach else []
        proc = subprocess.run(cmd + [self.image] + argv, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        self.started.append(name)
        if proc.returncode != 0:
            raise LocalStackError("%s (%s) failed:\n%s%s" % (
                role, " ".join(argv), proc.stdout[-3000:], self.logs(role)))
        return proc.stdout

    def logs(self, role, tail=60):
        proc = subprocess.run(["docker", "logs", "--tail", str(tail), self.names[role]],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return proc.stdout if proc.returncode == 0 else ""

    def ui_env(self):
        env = dict(self._db_env(), **self.seaweedfs.env())
        env.update({
            "MF_UI_METADATA_HOST": "127.0.0.1", "MF_UI_METADATA_PORT": str(self.ui_port),
            "PATH_PREFIX": "/api", "UI_ENABLED": "0",
            "METAFLOW_DEFAULT_METADATA": "service", "METAFLOW_SERVICE_URL": self.url,
            # One worker per cache (the default 16/16/8 processes take ~2 GB).
            "CACHE_ARTIFACT_MAX_ACTIONS": "1", "CACHE_DAG_MAX_ACTIONS": "1",
            "CACHE_LOG_MAX_ACTIONS": "1",
            "CACHE_ARTIFACT_STORAGE_LIMIT": "200000000", "CACHE_DAG_STORAGE_LIMIT": "100000000",
            "CACHE_LOG_STORAGE_LIMIT": "100000000",
            "MAX_PROCESSABLE_S3_ARTIFACT_SIZE_KB": "1024",
        })
        return env

    def start(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        self.remove()
        self.postgres.ensure_role("metaflow", self.db_password)
        self.postgres.ensure_database(self.DB, owner="metaflow")
        db = self._db_env()
        self._docker_run("migrate", ["/opt/latest/bin/python3", "/root/run_goose.py", "--wait", "60"],
                         db, detach=False)
        self._docker_run("metadata", ["/opt/latest/bin/python3", "-m",
                                      "services.metadata_service.server"],
                         dict(db, MF_METADATA_HOST="127.0.0.1", MF_METADATA_PORT=str(self.port),
                              MF_METADATA_DB_POOL_MAX="10"))
        self._docker_run("ui-backend", ["/opt/latest/bin/python3", "-m",
                                        "services.ui_backend_service.ui_server"], self.ui_env())
        wait_for(lambda: self.pings("metadata"), 120, "the metadata service")
        wait_for(lambda: self.pings("ui-backend"), 180, "the Metaflow UI backend")
        return self

    def running(self, role):
        state = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", self.names[role]],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return state.stdout.strip() == "true"

    def pings(self, role):
        if not self.running(role):
            raise RuntimeError("the %s container exited:\n%s" % (role, self.logs(role)))
        url = self.url + "/ping" if role == "metadata" else self.ui_url + "/api/ping"
        return requests.get(url, timeout=5).status_code == 200

    def remove(self):
        """Removes this stack's containers of an earlier start, if any."""
        subprocess.run(["docker", "rm", "-f"] + list(self.names.values()),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self):
        """Removes the containers (their logs stay in self.dir)."""
        for role, name in self.names.items():
            if name in self.started:
                (self.dir / ("%s.log" % role)).write_text(self.logs(role, tail=2000))
        if self.started:
            subprocess.run(["docker", "rm", "-f"] + self.started, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        self.started = []
