"""Real services for the end-to-end tests: the product's local stack
(metaflow_services.local: PostgreSQL, SeaweedFS, Airflow 3 and the Metaflow
metadata service on loopback), started in-process with free ports and a
scratch folder per session, plus what only tests need."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

from metaflow_services.local import (VENV_BIN, Airflow, AirflowAPI, Postgres,  # noqa: F401
                                     Process, SeaweedFS, free_port, free_ports, metaflow_env,
                                     scratch_dir, wait_for, worker_env)
from metaflow_services.local import MetaflowService as _MetaflowService


class MetaflowService(_MetaflowService):
    """The metadata service and UI backend of one test session (the test
    image mfs-metadata:test, or $MFS_TEST_METADATA_IMAGE): containers named
    and labelled after the session's pid, so a later session removes those of
    a session that died without stopping them."""

    LABEL = "metaflow-services.test"          # value: "metaflow-service"
    PID_LABEL = "metaflow-services.test-pid"  # the test session that started it

    def __init__(self, base: Path, postgres, seaweedfs, image=None):
        tag = "%d-%s" % (os.getpid(), secrets.token_hex(3))
        super().__init__(base, postgres, seaweedfs,
                         image=image or os.environ.get("MFS_TEST_METADATA_IMAGE"),
                         names={role: "mfs-test-%s-%s" % (role, tag) for role in self.ROLES},
                         labels={self.LABEL: "metaflow-service", self.PID_LABEL: str(os.getpid())},
                         db_password="metaflow-test")

    @classmethod
    def remove_leftovers(cls):
        """Containers of earlier test sessions that died without stopping them
        (their session's process is gone)."""
        out = subprocess.run(["docker", "ps", "-a", "--filter", "label=%s=metaflow-service" % cls.LABEL,
                              "--format", '{{.Names}} {{.Label "%s"}}' % cls.PID_LABEL],
                             stdout=subprocess.PIPE, text=True, check=True).stdout
        stale = []
        for line in out.splitlines():
            name, _, pid = line.partition(" ")
            try:
                os.kill(int(pid), 0)
            except (ValueError, ProcessLookupError):
                stale.append(name)
            except PermissionError:  # alive, another user's
                pass
        if stale:
            subprocess.run(["docker", "rm", "-f"] + stale, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)

    def start(self):
        self.remove_leftovers()
        return super().start()
