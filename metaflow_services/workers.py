"""What worker VMs and the main VM exchange through the object store
(docs/workers.md): `metaflow-services sync --role main|worker`, one loop on
each side.

- DAG files: an edge worker parses the DAG file of every task it runs, from
  its own DAGs folder. The main VM mirrors the generated DAG files of its
  dags folder (``.metaflow-services/*.py``) to
  ``s3://BUCKET/mfs-workers/dags/``; each worker mirrors it back down (deletes
  included), every few seconds.
- Metaflow's local metadata (a stack without the metadata service): a step
  run on a worker records its task's metadata on the worker. The worker ships
  the files it has not shipped yet as one tar object per round under
  ``mfs-workers/metadata/``; the main VM unpacks each into its own local
  metadata folder (never overwriting a file it has: Metaflow writes each
  metadata file once) and deletes the object. The Metaflow client and UI on
  the main VM then see every task, wherever it ran.

The object store is the one channel both sides already have, authenticated
and through the main VM's TLS proxy: no new port, no new credential.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
from pathlib import Path

from . import objectstore
from .spec import write_atomic
from .watcher import GENERATED

log = logging.getLogger("metaflow_services.workers")

PREFIX = "mfs-workers/"
DAGS = PREFIX + "dags/"
METADATA = PREFIX + "metadata/"
SHIPPED = ".mfs-shipped.json"  # the worker's record of what it shipped


def _dag_files(folder: Path) -> dict:
    """{path relative to the dags folder: path} of the generated DAG files
    (the flow-watcher's .metaflow-services/): the only DAGs whose tasks run on
    workers. Users' flow files and plain DAGs stay on the main VM."""
    gen = folder / GENERATED
    return {"%s/%s" % (GENERATED, p.name): p for p in gen.glob("*.py") if p.is_file()}


def push_dags(s3, bucket, dags: Path) -> int:
    """Mirror the main VM's DAG files up; returns how many objects changed."""
    remote = objectstore.listing(s3, bucket, DAGS)
    local = _dag_files(dags)
    changed = 0
    for name, path in local.items():
        if remote.get(name) != objectstore.md5_file(path):
            s3.put_object(Bucket=bucket, Key=DAGS + name, Body=path.read_bytes())
            changed += 1
    for name in set(remote) - set(local):
        s3.delete_object(Bucket=bucket, Key=DAGS + name)
        changed += 1
    return changed


def pull_dags(s3, bucket, dags: Path) -> int:
    """Mirror the DAG files down onto a worker; returns how many files changed."""
    remote = objectstore.listing(s3, bucket, DAGS)
    local = _dag_files(dags)
    changed = 0
    for name, etag in remote.items():
        folder, _, base = name.partition("/")
        if folder != GENERATED or "/" in base or not base.endswith(".py"):
            continue  # not a generated DAG file (an older main VM's layout)
        if name not in local or objectstore.md5_file(local[name]) != etag:
            body = s3.get_object(Bucket=bucket, Key=DAGS + name)["Body"].read()
            (dags / GENERATED).mkdir(parents=True, exist_ok=True)
            write_atomic(str(dags / name), body.decode("utf-8"))
            changed += 1
    for name in set(local) - set(remote):
        local[name].unlink(missing_ok=True)
        changed += 1
    for stale in dags.glob("*.py"):  # the layout before the dags folder held flows
        stale.unlink(missing_ok=True)
        changed += 1
    return changed


class MetadataShipper:
    """Worker side: ships local metadata files not shipped yet (by path, size
    and mtime), as one tar object per round."""

    def __init__(self, root: Path, worker: str, state: Path):
        self.root, self.worker, self.state = root, worker, state
        try:
            self.shipped = json.loads(state.read_text())
        except (OSError, ValueError):
            self.shipped = {}

    def ship(self, s3, bucket) -> int:
        new = {}
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                p = Path(dirpath) / f
                try:
                    st = p.stat()
                except OSError:
                    continue
                rel = str(p.relative_to(self.root))
                sig = [st.st_size, st.st_mtime_ns]
                if self.shipped.get(rel) != sig and f != SHIPPED and not f.endswith(".tmp"):
                    new[rel] = (p, sig)
        if not new:
            return 0
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for rel, (p, _) in sorted(new.items()):
                try:
                    tar.add(str(p), arcname=rel, recursive=False)
                except OSError:
                    pass
        key = "%s%s/%d-%s.tar.gz" % (METADATA, self.worker, time.time_ns(),
                                     hashlib.sha1(buf.getvalue()).hexdigest()[:8])
        s3.put_object(Bucket=bucket, Key=key, Body=buf.getvalue())
        self.shipped.update({rel: sig for rel, (_, sig) in new.items()})
        write_atomic(str(self.state), json.dumps(self.shipped))
        return len(new)


def receive_metadata(s3, bucket, root: Path) -> int:
    """Main side: unpack what the workers shipped (oldest first) into the local
    metadata folder, keeping files already there; then delete the objects."""
    received = 0
    for key in sorted(objectstore.listing(s3, bucket, METADATA)):
        body = s3.get_object(Bucket=bucket, Key=METADATA + key)["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
            for member in tar.getmembers():
                dest = (root / member.name).resolve()
                if (not member.isfile() or root.resolve() not in dest.parents
                        or dest.exists()):
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                data = tar.extractfile(member).read()
                tmp = dest.with_name(dest.name + ".mfs-tmp")
                tmp.write_bytes(data)
                os.replace(tmp, dest)
                received += 1
        s3.delete_object(Bucket=bucket, Key=METADATA + key)
    return received


def add_parser(sub):
    p = sub.add_parser("sync", help="Exchange DAG files and Metaflow metadata between the main "
                                    "VM and worker VMs through the object store.",
                       description="The loop of the `worker-sync` (main VM) and `sync` (worker "
                                   "VM) services. Uses the object store of "
                                   "METAFLOW_DATASTORE_SYSROOT_S3 / METAFLOW_S3_ENDPOINT_URL.")
    p.add_argument("--role", choices=("main", "worker"), required=True)
    p.add_argument("--dags", required=True, help="Airflow's dags folder")
    local = os.environ.get("METAFLOW_DEFAULT_METADATA", "local") == "local"
    p.add_argument("--metadata",
                   default=os.environ.get("METAFLOW_DATASTORE_SYSROOT_LOCAL") if local else None,
                   help="Metaflow's local metadata folder (default: METAFLOW_DATASTORE_SYSROOT_"
                        "LOCAL when METAFLOW_DEFAULT_METADATA is local; none with the service)")
    p.add_argument("--worker", default=os.environ.get("MFS_WORKER_NAME"),
                   help="this worker's name (worker role)")
    p.add_argument("--interval", type=float, default=3.0)
    p.add_argument("--once", action="store_true", help="one round, then exit")
    p.add_argument("--heartbeat", help="file touched after every round (for a healthcheck)")
    p.set_defaults(func=run)


def run(args):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    s3, bucket = objectstore.s3_client(), objectstore.bucket_name()
    dags = Path(args.dags)
    dags.mkdir(parents=True, exist_ok=True)
    metadata = Path(args.metadata) if args.metadata else None
    shipper = None
    if args.role == "worker" and metadata:
        shipper = MetadataShipper(metadata, args.worker or os.uname().nodename,
                                  metadata / SHIPPED)
    log.info("Syncing as %s: DAG files %s s3://%s/%s%s.", args.role,
             "up from" if args.role == "main" else "down to", bucket, DAGS,
             "" if not metadata else "; metadata %s %s" % (
                 "from workers into" if args.role == "main" else "shipped from", metadata))
    while True:
        try:
            if args.role == "main":
                n = push_dags(s3, bucket, dags)
                m = receive_metadata(s3, bucket, metadata) if metadata else 0
            else:
                n = pull_dags(s3, bucket, dags)
                m = shipper.ship(s3, bucket) if shipper else 0
            if n or m:
                log.info("%d DAG file(s) synced, %d metadata file(s) %s.", n, m,
                         "received" if args.role == "main" else "shipped")
            if args.heartbeat:
                Path(args.heartbeat).touch()
        except Exception as e:  # noqa: BLE001 - keep syncing; the next round retries
            if args.once:
                raise
            log.warning("sync round failed (retrying in %.0f s): %s", args.interval, e)
        if args.once:
            return 0
        time.sleep(args.interval)
