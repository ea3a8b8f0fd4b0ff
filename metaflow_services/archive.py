"""The backup archive: a tar file whose every regular file's sha256 is in a
manifest written last (``manifest.json``), so a restore can check the whole
archive before it changes anything. What goes into it, and restoring it into
a stack, is ``backup``; `fab restore` checks an archive with ``verify``.

S3 objects keep their metadata (Metaflow's cas_raw, ...) and content type in
PAX headers of their members, named as extended attributes
(``SCHILY.xattr.user.mfs.s3.*``): GNU tar and bsdtar know that namespace, so
``tar -tf`` lists an archive without a warning per object (an unknown keyword
costs one). Archives written before use ``MFS.s3.*``; both are read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from .errors import ServicesError

FORMAT = 1
PREFIX = "metaflow-services-backup-"
SUFFIX = ".tar"
MANIFEST = "manifest.json"
PAX_META = "SCHILY.xattr.user.mfs.s3.meta."   # S3 user metadata (Metaflow's cas_raw, ...)
PAX_TYPE = "SCHILY.xattr.user.mfs.s3.content-type"
# The keywords of archives written before (read, never written).
OLD_PAX_META, OLD_PAX_TYPE = "MFS.s3.meta.", "MFS.s3.content-type"
CHUNK = 1 << 20


class BackupError(ServicesError):
    """What went wrong and what to do; nothing was changed (unless it says so)."""


def name_for(t=None) -> str:
    return "%s%s%s" % (PREFIX, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t)), SUFFIX)


def human(n) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1000.0


class _Hashing(io.RawIOBase):
    """Reads from a file object, hashing what passes through."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def readable(self):
        return True

    def readinto(self, b):
        data = self.f.read(len(b))
        self.sha.update(data)
        self.n += len(data)
        b[:len(data)] = data
        return len(data)


class Writer:
    """The archive being written: every regular file's sha256 goes into the
    manifest."""

    def __init__(self, path: Path):
        self.path = path
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.tar = tarfile.open(fileobj=os.fdopen(fd, "wb"), mode="w", format=tarfile.PAX_FORMAT)
        self.members = {}
        self.bytes = 0

    def add_stream(self, name, f, size, mtime=None, mode=0o644, uid=0, gid=0, pax=None):
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid = size, mtime or time.time(), mode, uid, gid
        ti.pax_headers = dict(pax or {})
        h = _Hashing(f)
        self.tar.addfile(ti, io.BufferedReader(h, CHUNK))
        self.members[name] = h.sha.hexdigest()
        self.bytes += size

    def add_file(self, name, path: Path):
        """A file that may grow while we read it (a live log): copied to a
        spool first, so the size in the header is the size written."""
        st = path.stat()
        with open(path, "rb") as src, tempfile.SpooledTemporaryFile(16 * CHUNK) as spool:
            shutil.copyfileobj(src, spool, CHUNK)
            size = spool.tell()
            spool.seek(0)
            self.add_stream(name, spool, size, st.st_mtime, st.st_mode & 0o7777, st.st_uid,
                            st.st_gid)
        return size

    def add_tree(self, prefix, root: Path):
        """Every file and folder below root (not root itself); symlinks as
        links. Returns (files, bytes)."""
        files, total = 0, 0
        if not root.is_dir():
            return 0, 0
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for d in list(dirnames):
                p = Path(dirpath) / d
                self.tar.add(str(p), arcname=_arc(prefix, root, p), recursive=False)
            for fname in sorted(filenames):
                p = Path(dirpath) / fname
                arc = _arc(prefix, root, p)
                try:
                    if p.is_symlink() or not p.is_file():
                        self.tar.add(str(p), arcname=arc, recursive=False)
                        continue
                    total += self.add_file(arc, p)
                except FileNotFoundError:
                    continue  # removed while we walked (log retention, a step's temp file)
                files += 1
        return files, total

    def close(self, manifest: dict):
        manifest["members"] = self.members
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        ti = tarfile.TarInfo(MANIFEST)
        ti.size, ti.mtime, ti.mode = len(data), time.time(), 0o600
        self.tar.addfile(ti, io.BytesIO(data))
        f = self.tar.fileobj
        self.tar.close()
        f.flush()
        os.fsync(f.fileno())
        f.close()


def _arc(prefix, root: Path, p: Path) -> str:
    return "%s/%s" % (prefix, p.relative_to(root).as_posix())


def verify(path) -> dict:
    """Reads the whole archive and checks every file against the manifest.
    Returns the manifest; raises BackupError naming the first problem."""
    path = Path(path)
    if not path.is_file():
        raise BackupError("%s: no such file" % path)
    seen, manifest = {}, None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                _check_name(m.name, path)
                if m.name == MANIFEST:
                    manifest = json.loads(tar.extractfile(m).read())
                    continue
                if not m.isfile():
                    continue
                sha = hashlib.sha256()
                f = tar.extractfile(m)
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    sha.update(chunk)
                seen[m.name] = sha.hexdigest()
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise BackupError("%s is not a readable backup archive (%s): truncated or corrupted"
                          % (path, e))
    if manifest is None:
        raise BackupError("%s has no manifest.json: not a metaflow-services backup, or "
                          "truncated" % path)
    if manifest.get("format") != FORMAT:
        raise BackupError("%s: backup format %s, this version reads format %d"
                          % (path, manifest.get("format"), FORMAT))
    want = manifest.get("members", {})
    bad = sorted(n for n in want if seen.get(n) != want[n])
    extra = sorted(set(seen) - set(want))
    if bad or extra:
        what = ("checksum mismatch or missing: %s" % ", ".join(bad[:5]) if bad
                else "files not in the manifest: %s" % ", ".join(extra[:5]))
        raise BackupError("%s is corrupted (%s%s)" % (path, what,
                                                       " and more" if len(bad + extra) > 5 else ""))
    return manifest


def _check_name(name, path):
    if name.startswith("/") or ".." in name.split("/"):
        raise BackupError("%s: unsafe path in the archive: %s" % (path, name))
