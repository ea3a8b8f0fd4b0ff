"""DAGs deployed from a workstation (Metaflow's Deployer API, ``python
flow.py airflow3 create`` with a profile) reach the VM through the object
store: the one channel a laptop with a profile from ``fab client-config``
already has (the keys of the bucket, through the VM's TLS proxy), so no SSH
key is needed.

- The workstation compiles the flow (its code package goes to the bucket as
  usual) and puts the DAG file at ``s3://BUCKET/mfs-deployer/dags/<stem>.py``.
- The VM's flow-watcher checks that folder every few seconds. A new or changed
  file is checked (a DAG spec this version reads, a DAG id no flow file in the
  dags folder holds) and its DAG file is written again from the spec alone by
  this version's template, so whatever else the upload holds never runs in
  Airflow (the bucket's keys are not the right to run code in its
  dag-processor). It is installed as ``.metaflow-services/deployed__<stem>.py``
  (worker VMs get it like every generated DAG); a removed object removes its
  file. Its verdict goes to ``mfs-deployer/status/<stem>.json`` with the ETag
  it judged, which the workstation waits for.

Imported by the watcher on the VM and by the compiler's CLI on workstations:
the standard library and boto3 only.
"""

from __future__ import annotations

import ast
import json
import logging
import time
from pathlib import Path

from . import objectstore
from .spec import SPEC_VERSION, render_dag_file, write_atomic

log = logging.getLogger("metaflow_services.inbox")

PREFIX = "mfs-deployer/"
DAGS = PREFIX + "dags/"
STATUS = PREFIX + "status/"
INSTALLED_PREFIX = "deployed__"


class InboxError(Exception):
    pass


def spec_of(text: str) -> dict:
    """The SPEC literal of a generated DAG file, without running it."""
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "SPEC":
            return ast.literal_eval(node.value)
    raise ValueError("no SPEC in the file")


# -- the workstation's side -------------------------------------------------------


def put_dag(s3, bucket, stem, text) -> str:
    """Hand the DAG file to the VM; returns the ETag to wait for."""
    got = s3.put_object(Bucket=bucket, Key=DAGS + stem + ".py", Body=text.encode("utf-8"))
    return got["ETag"].strip('"')


def wait_installed(s3, bucket, stem, etag, timeout=180, say=None):
    """Wait for the VM's verdict on this version of the DAG file; raise
    InboxError with the VM's message when it refused it."""
    deadline = time.time() + timeout
    told = False
    while time.time() < deadline:
        status = read_status(s3, bucket, stem)
        if status and status.get("etag") == etag:
            if status["state"] != "installed":
                raise InboxError(status.get("message") or "refused")
            return status
        if say and not told and time.time() > deadline - timeout + 15:
            say("Waiting for the VM's flow-watcher to install the DAG ...")
            told = True
        time.sleep(1)
    raise InboxError(
        "the VM did not pick up the DAG within %d s: is its flow-watcher running "
        "(fab -H HOST status; fab -H HOST logs -s flow-watcher)?" % timeout)


def read_status(s3, bucket, stem):
    try:
        body = s3.get_object(Bucket=bucket, Key=STATUS + stem + ".json")["Body"].read()
        return json.loads(body)
    except Exception as e:  # noqa: BLE001 - absent or unreadable: no verdict yet
        if objectstore.error_code(e) in ("404", "NoSuchKey", ""):
            return None
        raise


def get_dag(s3, bucket, stem):
    """The deployed DAG file's text, or None."""
    try:
        return s3.get_object(Bucket=bucket, Key=DAGS + stem + ".py")["Body"].read().decode()
    except Exception as e:  # noqa: BLE001
        if objectstore.error_code(e) in ("404", "NoSuchKey"):
            return None
        raise


def withdraw(s3, bucket, stem) -> bool:
    """Remove a deployed DAG (the VM deletes its file); False when there was none."""
    if get_dag(s3, bucket, stem) is None:
        return False
    s3.delete_object(Bucket=bucket, Key=DAGS + stem + ".py")
    return True


# -- the VM's side -----------------------------------------------------------------


class Inbox:
    """Installs the DAG files workstations deployed (run by the flow-watcher)."""

    def __init__(self, s3, bucket, dags: Path, interval=3.0):
        self.s3, self.bucket, self.dags, self.interval = s3, bucket, Path(dags), interval
        self._next = 0.0
        self._judged = {}  # stem -> etag judged (refused ones are not retried)

    def poll(self, held_by_flow_files, now=None):
        """One round (every *interval* seconds); *held_by_flow_files* is
        {dag_id: flow file} of the watcher's own flows."""
        now = time.time() if now is None else now
        if now < self._next:
            return 0
        self._next = now + self.interval
        try:
            return self._sync(held_by_flow_files)
        except Exception as e:  # noqa: BLE001 - the object store may be restarting
            log.warning("Deployed DAGs: cannot read the object store: %s", e)
            return 0

    def _sync(self, held):
        remote = {k[:-3]: etag for k, etag in objectstore.listing(self.s3, self.bucket, DAGS).items()
                  if k.endswith(".py") and "/" not in k}
        installed = {p.name[len(INSTALLED_PREFIX):-3]: p
                     for p in self.dags.glob(INSTALLED_PREFIX + "*.py")}
        changed = 0
        for stem, etag in remote.items():
            path = installed.get(stem)
            if self._judged.get(stem) == etag or (path and objectstore.md5_file(path) == etag):
                continue
            self._judged[stem] = etag
            changed += self._install(stem, etag, held)
        for stem in set(installed) - set(remote):
            installed[stem].unlink(missing_ok=True)
            self._judged.pop(stem, None)
            log.info("Removed the deployed DAG %s (withdrawn from the object store).", stem)
            changed += 1
        return changed

    def _install(self, stem, etag, held):
        body = self.s3.get_object(Bucket=self.bucket, Key=DAGS + stem + ".py")["Body"].read()
        try:
            spec = spec_of(body.decode("utf-8"))
            problem = self._problem(stem, spec, held)
            # Only the spec is taken: the file is this version's rendering of it.
            text = None if problem else render_dag_file(spec)
        except (ValueError, SyntaxError, UnicodeDecodeError, KeyError, TypeError,
                AttributeError) as e:
            problem = "the deployed file is not a DAG file this deployment generates (%r)" % e
        if problem:
            log.warning("Refused the deployed DAG %s: %s", stem, problem)
            self._status(stem, etag, "refused", problem)
            return 0
        self.dags.mkdir(parents=True, exist_ok=True)
        write_atomic(str(self.dags / (INSTALLED_PREFIX + stem + ".py")), text)
        log.info("Installed the deployed DAG %s (flow %s).", spec["dag_id"], spec["flow"]["name"])
        self._status(stem, etag, "installed", "", dag_id=spec["dag_id"])
        return 1

    @staticmethod
    def _problem(stem, spec, held):
        if spec.get("spec_version") != SPEC_VERSION:
            return ("it was compiled for DAG spec version %r; this deployment reads version %d: "
                    "install the deployment's metaflow-services version on the workstation"
                    % (spec.get("spec_version"), SPEC_VERSION))
        dag_id = spec.get("dag_id")
        if dag_id in held:
            return ("the DAG %s already comes from the flow file %s in the dags folder: remove "
                    "that file, or deploy under another name (dag_id)" % (dag_id, held[dag_id]))
        return None

    def _status(self, stem, etag, state, message, **extra):
        body = dict(extra, state=state, message=message, etag=etag, at=time.time())
        self.s3.put_object(Bucket=self.bucket, Key=STATUS + stem + ".json",
                           Body=json.dumps(body).encode())
