"""Backups of the whole platform, and restoring them (`metaflow-services
backup` / `restore`; `fab backup` / `fab restore` run these on the VM).

It runs in the stack's maintenance container: the Airflow image, as root, on
the stack's network, with the Docker socket, the backup folder (/backups, also
mounted into the postgres container), the data folder (/data; its dags/ holds
the flows, plain DAGs and the generated DAG files), the install folder (/install, read only: secrets, certificate, deploy record)
and the volumes with Metaflow's local metadata and Airflow's task logs.

One archive holds everything needed to rebuild the platform on a new VM, each
file under a prefix, and a manifest last:

    postgres/airflow.dump, postgres/metaflow.dump   pg_dump -Fc, from the server's own image
    bucket/<key>                                    every object (S3 metadata in PAX headers)
    volumes/metaflow-local/..., volumes/airflow-logs/...
    data/dags/...       (archives from before flows lived there also have data/flows/:
                         restored as they are, fab deploy then moves them in)
    config/secrets.env, config/tls/*, config/deploy.json
    manifest.json       versions, schema revisions, images, options, sha256 of every file

Consistency without stopping anything: the databases are dumped first, then
the object store and the metadata folder. Metaflow writes a task's artifacts
before it records them, so everything a dumped run refers to is in the bucket
copy (which may hold a few newer objects nobody refers to yet).

Restoring reads the archive twice: once to check every checksum and the
schema (nothing is touched if that fails), then to load it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

from . import encryption, objectstore
# MANIFEST, PREFIX and SUFFIX are not used here: deploy/ reads them from this module.
from .archive import (CHUNK, FORMAT, MANIFEST, OLD_PAX_META, OLD_PAX_TYPE, PAX_META,  # noqa: F401
                      PAX_TYPE, PREFIX, SUFFIX,
                      BackupError, Writer, human, name_for, verify)
from .checks import check_object_store

DATABASES = ("airflow", "metaflow")
# Inside the maintenance container (compose/compose.yaml).
BACKUP_DIR = Path(os.environ.get("MFS_BACKUP_DIR", "/backups"))
INSTALL_DIR = Path("/install")
DATA_DIR = Path("/data")
VOLUMES = {"metaflow-local": Path("/var/lib/metaflow-local"),
           "airflow-logs": Path("/opt/airflow/logs")}
CONFIG_FILES = ("secrets.env", "tls/cert.pem", "tls/key.pem", "state/deploy.json")


# ---------------------------------------------------------------------------
# The stack's parts (inside the maintenance container)
# ---------------------------------------------------------------------------


def _postgres_container():
    import docker

    project = os.environ.get("COMPOSE_PROJECT_NAME") or os.environ.get("MFS_DOCKER_NETWORK",
                                                                       "metaflow-services")
    found = docker.from_env().containers.list(filters={"label": [
        "com.docker.compose.project=%s" % project, "com.docker.compose.service=postgres"]})
    if not found:
        raise BackupError("the postgres service of %s is not running" % project)
    return found[0]


def _pg(container, script, what):
    """A shell script in the postgres container (the server's own client
    tools: pg_dump matches the server's version)."""
    # As root (it writes to /backups, which only root may enter), connecting
    # as the postgres superuser over the local socket (trusted in the image).
    res = container.exec_run(["sh", "-ec", script], user="root", demux=True,
                             environment={"PGUSER": "postgres"})
    out, err = res.output
    if res.exit_code != 0:
        raise BackupError("%s failed: %s" % (what, ((err or b"") + (out or b"")).decode(
            errors="replace").strip()[-800:]))
    return (out or b"").decode(errors="replace")


def _sql(container, db, query):
    return _pg(container, "psql -X -A -t -v ON_ERROR_STOP=1 -d %s -c \"%s\"" % (db, query),
               "a query on %s" % db).strip()


def _database_exists(container, db) -> bool:
    return bool(_sql(container, "postgres", "SELECT 1 FROM pg_database WHERE datname='%s'" % db))


def schema_revisions(container) -> dict:
    revs = {}
    for db in DATABASES:
        if not _database_exists(container, db):
            revs[db] = None
            continue
        if db == "airflow":
            q = ("SELECT version_num FROM alembic_version WHERE "
                 "to_regclass('alembic_version') IS NOT NULL")
        else:  # the metadata service's migrations (goose)
            q = ("SELECT max(version_id) FROM goose_db_version WHERE "
                 "to_regclass('goose_db_version') IS NOT NULL")
        try:
            revs[db] = _sql(container, db, q) or None
        except BackupError:
            revs[db] = None
    return revs


def _bucket_objects(s3, bucket):
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            yield obj


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _deploy_record() -> dict:
    p = INSTALL_DIR / "state" / "deploy.json"
    return json.loads(p.read_text()) if p.exists() else {}


# ---------------------------------------------------------------------------
# Backup
# ---------------------------------------------------------------------------


def create(out_dir: Path = BACKUP_DIR, progress=print, encrypt_to: str = "") -> Path:
    """One archive of everything; returns its path. With *encrypt_to* (age or
    SSH public keys), also an encrypted copy of it, PATH.age. A failure
    removes the partial file and changes nothing else."""
    t0 = time.time()
    out_dir = Path(out_dir)
    if encrypt_to:
        encryption.recipients(encrypt_to)   # a bad key stops here, before any work
    pg = _postgres_container()
    revisions = schema_revisions(pg)
    s3, bucket = objectstore.s3_client(), objectstore.bucket_name()
    objects = list(_bucket_objects(s3, bucket))
    db_sizes = {db: int(_sql(pg, "postgres", "SELECT pg_database_size('%s')" % db) or 0)
                for db in DATABASES if _database_exists(pg, db)}
    estimate = (sum(db_sizes.values()) + sum(o["Size"] for o in objects)
                + sum(_tree_size(p) for p in VOLUMES.values())
                + _tree_size(DATA_DIR / "dags"))
    free = _free_bytes(out_dir)
    # Dumps are smaller than the databases; the rest is copied as is.
    if free < estimate * 1.05 + 100e6:
        raise BackupError("not enough space in the backup folder: it needs about %s, %s is "
                          "free (nothing was written)" % (human(estimate), human(free)))
    progress("backing up about %s (databases %s, %d objects in bucket %s) into %s"
             % (human(estimate), human(sum(db_sizes.values())), len(objects), bucket, out_dir))
    final = out_dir / name_for(t0)
    partial = final.with_name(final.name + ".partial")
    w = Writer(partial)
    try:
        counts = _write_parts(w, pg, db_sizes, s3, bucket, objects, out_dir, progress)
        record = _deploy_record()
        w.close({
            "format": FORMAT, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
            "metaflow_services_version": _version("metaflow-services"),
            "airflow_version": _version("apache-airflow"),
            "metaflow_version": _version("metaflow"),
            "schema": revisions, "images": record.get("images", {}),
            "deploy": record, "counts": counts, "bytes": w.bytes,
        })
        os.replace(partial, final)
    except BaseException:
        try:
            w.tar.fileobj.close()
        except Exception:  # noqa: BLE001
            pass
        partial.unlink(missing_ok=True)
        raise
    progress("backup written: %s (%s, %d files, %s)" % (final.name, human(final.stat().st_size),
                                                       len(w.members), _took(t0)))
    if encrypt_to:
        t1 = time.time()
        enc = encryption.encrypt_copy(final, encrypt_to)
        progress("encrypted copy written: %s (age, to %s; %s)"
                 % (enc.name, encryption.normalize(encrypt_to)[:60], _took(t1)))
    return final


def _write_parts(w: Writer, pg, db_sizes, s3, bucket, objects, out_dir, progress) -> dict:
    counts = {}
    # 1. the databases, first (see the module's docstring).
    stage = out_dir / (".dump-%d" % os.getpid())
    stage.mkdir(mode=0o700, exist_ok=True)
    try:
        for db in db_sizes:
            t = time.time()
            dump = stage / ("%s.dump" % db)
            # /backups is mounted into the postgres container too.
            _pg(pg, "pg_dump -Fc --no-owner --no-acl -d %s -f /backups/%s/%s.dump"
                % (db, stage.name, db), "pg_dump of %s" % db)
            size = w.add_file("postgres/%s.dump" % db, dump)
            dump.unlink()
            progress("  postgres: %s, %s dump (%s)" % (db, human(size), _took(t)))
        counts["dag_runs"] = int(_sql(pg, "airflow", "SELECT count(*) FROM dag_run "
                                      "WHERE to_regclass('dag_run') IS NOT NULL") or 0) \
            if "airflow" in db_sizes else 0
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    # 2. the bucket, object by object, with the metadata Metaflow relies on.
    t, done, last = time.time(), 0, time.time()
    for i, obj in enumerate(objects):
        try:
            got = s3.get_object(Bucket=bucket, Key=obj["Key"])
        except s3.exceptions.NoSuchKey:
            continue
        pax = {PAX_META + k: v for k, v in got.get("Metadata", {}).items()}
        if got.get("ContentType"):
            pax[PAX_TYPE] = got["ContentType"]
        w.add_stream("bucket/" + obj["Key"], got["Body"], got["ContentLength"],
                     obj["LastModified"].timestamp(), 0o600, pax=pax)
        done += got["ContentLength"]
        if time.time() - last > 10:
            last = time.time()
            progress("  bucket: %d/%d objects, %s" % (i + 1, len(objects), human(done)))
    counts["bucket_objects"] = len(objects)
    progress("  bucket %s: %d objects, %s (%s)" % (bucket, len(objects), human(done), _took(t)))
    # 3. folders: Metaflow's local metadata, task logs, the dags folder.
    for name, root in VOLUMES.items():
        t = time.time()
        n, size = w.add_tree("volumes/" + name, root)
        counts[name + "_files"] = n
        progress("  volume %s: %d files, %s (%s)" % (name, n, human(size), _took(t)))
    n, size = w.add_tree("data/dags", DATA_DIR / "dags")
    counts["dags_files"] = n
    progress("  dags folder: %d files, %s" % (n, human(size)))
    # 4. what `fab deploy` generated once and must never generate again.
    for rel in CONFIG_FILES:
        p = INSTALL_DIR / rel
        if p.is_file():
            w.add_file("config/" + rel.replace("state/", ""), p)
    progress("  configuration: secrets, certificate, deploy record")
    return counts


def _version(dist):
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _took(t0):
    s = time.time() - t0
    return "%.1f s" % s if s < 60 else "%dm%02ds" % divmod(int(s), 60)


# ---------------------------------------------------------------------------
# Restore
# ---------------------------------------------------------------------------


def schema_problems(manifest) -> list:
    """Why this Airflow cannot take the backup's database: its schema is newer
    than the migrations this image knows (a backup from a newer version)."""
    rev = (manifest.get("schema") or {}).get("airflow")
    if not rev:
        return []
    from alembic.script import ScriptDirectory
    from airflow.utils.db import _get_alembic_config

    script = ScriptDirectory.from_config(_get_alembic_config())
    try:
        known = script.get_revision(rev) is not None
    except Exception:  # noqa: BLE001 - alembic raises several kinds for unknown ids
        known = False
    if known:
        return []
    return ["the backup's Airflow database is at schema revision %s (Airflow %s), which this "
            "image's Airflow %s does not know: it is newer. Restore with images at least as new "
            "as the backup's (%s)" % (rev, manifest.get("airflow_version"),
                                      _version("apache-airflow"),
                                      ", ".join(sorted((manifest.get("images") or {}).values()))
                                      or "see its manifest")]


def restore(path, only=None, check_only=False, progress=print) -> dict:
    """Loads the archive into the stack: the databases (replaced), the
    bucket's objects, the volumes and folders (replaced). The postgres service
    and the object store must run; Airflow must not. `only` limits it to some
    parts (e.g. {"postgres"} for an upgrade's rollback)."""
    t0 = time.time()
    progress("checking %s (every file's checksum) ..." % path)
    manifest = verify(path)
    problems = schema_problems(manifest)
    if problems:
        raise BackupError("; ".join(problems))
    progress("  ok: %d files, made %s by metaflow-services %s (Airflow %s)"
             % (len(manifest["members"]), manifest["created_at"],
                manifest["metaflow_services_version"], manifest["airflow_version"]))
    if check_only:
        return manifest
    parts = set(only or ("postgres", "bucket", "volumes", "data"))
    pg = _postgres_container() if "postgres" in parts else None
    s3, bucket = None, None
    if "bucket" in parts:
        s3, bucket = objectstore.s3_client(), objectstore.bucket_name()
        check = check_object_store(ensure_bucket=True)
        if not check.ok:
            raise BackupError(check.detail)
    stage = Path(path).parent / (".restore-%d" % os.getpid())
    stage.mkdir(mode=0o700, exist_ok=True)
    cleared = set()
    n_objects = 0
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                top, _, rest = m.name.partition("/")
                if top == "postgres" and pg is not None:
                    _restore_db(tar, m, pg, stage, progress)
                elif top == "bucket" and s3 is not None and m.isfile():
                    _restore_object(tar, m, s3, bucket)
                    n_objects += 1
                    if n_objects % 1000 == 0:
                        progress("  bucket: %d objects ..." % n_objects)
                elif top in ("volumes", "data") and top in parts:
                    name, _, sub = rest.partition("/")
                    root = VOLUMES.get(name) if top == "volumes" else DATA_DIR / name
                    if root is None or not sub:
                        continue
                    if root not in cleared:
                        _clear(root)
                        cleared.add(root)
                        progress("  %s %s: replacing" % (top[:-1] if top == "volumes" else "folder",
                                                         name))
                    m.name = sub
                    _extract(tar, m, root)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if s3 is not None:
        progress("  bucket %s: %d objects" % (bucket, n_objects))
    progress("restored %s in %s" % (", ".join(sorted(parts)), _took(t0)))
    return manifest


def _restore_db(tar, m, pg, stage, progress):
    db = Path(m.name).stem
    t = time.time()
    dump = stage / Path(m.name).name
    with tar.extractfile(m) as src, open(dump, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK)
    # Replaced, not merged: a database an upgrade migrated must go back whole.
    _pg(pg, "psql -X -v ON_ERROR_STOP=1 -d postgres "
            "-c 'DROP DATABASE IF EXISTS %s WITH (FORCE)' -c 'CREATE DATABASE %s OWNER %s'"
        % (db, db, db), "recreating database %s" % db)
    _pg(pg, "pg_restore --exit-on-error --no-owner --no-acl --role=%s -d %s /backups/%s/%s"
        % (db, db, stage.name, dump.name), "pg_restore of %s" % db)
    dump.unlink()
    progress("  postgres: %s restored (%s)" % (db, _took(t)))


def _restore_object(tar, m, s3, bucket):
    meta, content_type = object_metadata(m.pax_headers)
    extra = {"Metadata": meta} if meta else {}
    if content_type:
        extra["ContentType"] = content_type
    with tar.extractfile(m) as f:
        s3.upload_fileobj(f, bucket, m.name[len("bucket/"):], ExtraArgs=extra or None)


def object_metadata(pax: dict):
    """(S3 user metadata, content type) of a bucket member, from its PAX
    headers in either keyword set."""
    meta, content_type = {}, None
    for k, v in pax.items():
        for prefix in (PAX_META, OLD_PAX_META):
            if k.startswith(prefix):
                meta[k[len(prefix):]] = v
        if k in (PAX_TYPE, OLD_PAX_TYPE):
            content_type = v
    return meta, content_type


def _extract(tar, m, root):
    # Names were checked by verify(); owners and modes are the stack's own.
    kw = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
    tar.extract(m, root, numeric_owner=True, **kw)


def _clear(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    for p in root.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def add_parser(sub):
    b = sub.add_parser("backup", help="Back up the whole platform into one archive.",
                       description="Run in the stack's maintenance container (fab backup does).")
    b.add_argument("--out-dir", default=str(BACKUP_DIR))
    b.add_argument("--encrypt-to", default=os.environ.get("MFS_BACKUP_ENCRYPT_TO", ""),
                   help="also write an age-encrypted copy for these recipients (age1... or SSH "
                        "public keys, comma-separated; default: MFS_BACKUP_ENCRYPT_TO)")
    b.set_defaults(func=cmd_backup)
    r = sub.add_parser("restore", help="Load a backup archive into the stack.",
                       description="Run in a one-off maintenance container while postgres and "
                                   "the object store run and Airflow does not (fab restore "
                                   "does).")
    r.add_argument("archive")
    r.add_argument("--only", action="append", choices=("postgres", "bucket", "volumes", "data"))
    r.add_argument("--check", action="store_true",
                   help="only verify checksums and schema; change nothing")
    r.set_defaults(func=cmd_restore)
    v = sub.add_parser("verify-backup", help="Check a backup archive's checksums.")
    v.add_argument("archive")
    v.set_defaults(func=cmd_verify)


def _flush_print(line):
    print(line, flush=True)


def cmd_backup(args):
    return _exit_code("backup failed: ",
                      lambda: create(Path(args.out_dir), progress=_flush_print,
                                     encrypt_to=args.encrypt_to))


def cmd_restore(args):
    return _exit_code("restore refused: ",
                      lambda: restore(args.archive, only=args.only, check_only=args.check,
                                      progress=_flush_print))


def cmd_verify(args):
    return _exit_code("", lambda: _print_summary(verify(args.archive)))


def _exit_code(prefix, action):
    """Runs `action`; a BackupError is one line on stderr, after `prefix`."""
    try:
        action()
    except BackupError as e:
        print("%s%s" % (prefix, e), file=sys.stderr)
        return e.exit_code
    return 0


def _print_summary(manifest):
    print(json.dumps({k: manifest[k] for k in ("created_at", "metaflow_services_version",
                                               "airflow_version", "schema", "counts", "bytes")},
                     indent=1, sort_keys=True))
