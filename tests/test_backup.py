"""The backup archive itself (metaflow_services/archive.py): what a restore
trusts. Whole backups and restores of a deployed stack are in
tests/deploy/test_deploy_upkeep.py."""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import pytest

from metaflow_services import archive, backup


def make_archive(tmp_path: Path, files=None) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for rel, data in (files or {"a.txt": b"alpha", "sub/b.bin": os.urandom(300_000)}).items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    path = tmp_path / archive.name_for()
    w = archive.Writer(path)
    w.add_tree("data/flows", src)
    w.add_stream("bucket/metaflow/Flow/1/x", io.BytesIO(b"object"), 6,
                 pax={archive.PAX_META + "cas_raw": "true"})
    w.close({"format": archive.FORMAT, "created_at": "2026-11-28T00:00:00Z",
             "metaflow_services_version": "0.1.0", "airflow_version": "3.3.2",
             "schema": {"airflow": None}, "counts": {}, "bytes": w.bytes, "deploy": {}})
    return path


def test_standard_tar_lists_and_extracts_an_archive_without_warnings(tmp_path):
    """GNU tar warns once per unknown PAX keyword: a small platform's
    backup listed thousands of lines of warnings. The S3 metadata keywords are
    in the extended-attribute namespace tar knows."""
    import subprocess

    path = make_archive(tmp_path)
    listed = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True)
    assert listed.returncode == 0 and listed.stderr == ""
    assert "bucket/metaflow/Flow/1/x" in listed.stdout.split()
    out = tmp_path / "out"
    out.mkdir()
    extracted = subprocess.run(["tar", "-xf", str(path), "-C", str(out)], capture_output=True,
                               text=True)
    assert extracted.returncode == 0 and extracted.stderr == ""
    assert (out / "bucket/metaflow/Flow/1/x").read_bytes() == b"object"


def test_object_metadata_is_read_in_both_keyword_sets():
    """Archives written before the rename keep restoring with their metadata."""
    new = {archive.PAX_META + "cas_raw": "true", archive.PAX_TYPE: "application/json",
           "path": "bucket/x"}
    old = {archive.OLD_PAX_META + "cas_raw": "true", archive.OLD_PAX_TYPE: "application/json"}
    assert backup.object_metadata(new) == backup.object_metadata(old) == (
        {"cas_raw": "true"}, "application/json")
    assert backup.object_metadata({}) == ({}, None)


def test_an_archive_verifies_and_is_private(tmp_path):
    path = make_archive(tmp_path)
    m = archive.verify(path)
    assert set(m["members"]) == {"data/flows/a.txt", "data/flows/sub/b.bin",
                                 "bucket/metaflow/Flow/1/x"}
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with tarfile.open(path) as tar:
        obj = tar.getmember("bucket/metaflow/Flow/1/x")
        # S3 metadata Metaflow needs to read its artifacts back travels along.
        assert obj.pax_headers[archive.PAX_META + "cas_raw"] == "true"
        assert tar.getnames()[-1] == archive.MANIFEST


def _flip_byte_in(path: Path, member: str):
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset_data
    with open(path, "r+b") as f:
        f.seek(offset + 10)
        b = f.read(1)
        f.seek(offset + 10)
        f.write(bytes([b[0] ^ 0xFF]))


def test_one_changed_byte_is_found_and_named(tmp_path):
    path = make_archive(tmp_path)
    _flip_byte_in(path, "data/flows/sub/b.bin")
    with pytest.raises(archive.BackupError, match=r"corrupted .*data/flows/sub/b\.bin"):
        archive.verify(path)


def test_a_truncated_archive_is_refused(tmp_path):
    path = make_archive(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(archive.BackupError, match="truncated"):
        archive.verify(path)


def test_an_added_file_is_refused(tmp_path):
    path = make_archive(tmp_path)
    # Rewrite the archive with one extra file the manifest does not list.
    out = tmp_path / "tampered.tar"
    with tarfile.open(path) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for m in src:
            if m.name == archive.MANIFEST:
                extra = tarfile.TarInfo("data/dags/evil.py")
                extra.size = 4
                dst.addfile(extra, io.BytesIO(b"boom"))
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    with pytest.raises(archive.BackupError, match="not in the manifest: data/dags/evil.py"):
        archive.verify(out)


def test_something_else_is_not_taken_for_a_backup(tmp_path):
    other = tmp_path / "other.tar"
    with tarfile.open(other, "w") as tar:
        ti = tarfile.TarInfo("hello.txt")
        ti.size = 2
        tar.addfile(ti, io.BytesIO(b"hi"))
    with pytest.raises(archive.BackupError, match="no manifest.json"):
        archive.verify(other)
    with pytest.raises(archive.BackupError, match="no such file"):
        archive.verify(tmp_path / "missing.tar")


def test_unsafe_paths_are_refused(tmp_path):
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        ti = tarfile.TarInfo("data/flows/../../etc/passwd")
        ti.size = 1
        tar.addfile(ti, io.BytesIO(b"x"))
    with pytest.raises(archive.BackupError, match="unsafe path"):
        archive.verify(bad)


def test_a_file_that_grows_while_read_is_archived_as_read(tmp_path):
    """Live task logs grow during a backup: the header must match what was
    written, or the archive would be unreadable."""
    log = tmp_path / "live.log"
    log.write_bytes(b"x" * 1000)
    path = tmp_path / archive.name_for(time.time())
    w = archive.Writer(path)
    real_copy = archive.shutil.copyfileobj

    def copy_then_grow(src, dst, length=0):
        real_copy(src, dst, length)
        with open(log, "ab") as f:
            f.write(b"y" * 5000)
    archive.shutil.copyfileobj = copy_then_grow
    try:
        w.add_file("volumes/airflow-logs/live.log", log)
    finally:
        archive.shutil.copyfileobj = real_copy
    w.close({"format": archive.FORMAT})
    assert archive.verify(path)["members"]
    with tarfile.open(path) as tar:
        assert tar.getmember("volumes/airflow-logs/live.log").size == 1000


def test_a_backup_from_a_newer_airflow_schema_is_refused():
    """Checked against the Airflow installed here, as the maintenance
    container does against its image's."""
    from airflow.utils.db import _REVISION_HEADS_MAP

    current = _REVISION_HEADS_MAP[max(_REVISION_HEADS_MAP, key=lambda v: tuple(
        int(x) for x in v.split(".")))]
    assert backup.schema_problems({"schema": {"airflow": current}}) == []
    problems = backup.schema_problems({"schema": {"airflow": "f00dfeedbeef"},
                                       "airflow_version": "9.0.0",
                                       "images": {"airflow": "apache/airflow:9.0.0"}})
    assert len(problems) == 1
    assert "f00dfeedbeef" in problems[0] and "newer" in problems[0]
    assert "apache/airflow:9.0.0" in problems[0]


# -- encrypted copies (backup.encrypt_to, fab restore --identity) ------------


def _keys(tmp_path):
    """An age identity file and an SSH key pair, as a user would have them."""
    import subprocess

    import pyrage

    ident = pyrage.x25519.Identity.generate()
    (tmp_path / "age.key").write_text("# public key: %s\n%s\n" % (ident.to_public(), ident))
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ana@laptop #1",
                    "-f", str(tmp_path / "id_ed25519")], check=True)
    return str(ident.to_public()), (tmp_path / "id_ed25519.pub").read_text().strip()


def test_an_encrypted_copy_opens_with_any_recipients_key_only(tmp_path):
    from metaflow_services import encryption

    age_pub, ssh_pub = _keys(tmp_path)
    path = make_archive(tmp_path)
    sealed = encryption.encrypt_copy(path, "%s, %s" % (age_pub, ssh_pub))
    assert sealed.name == path.name + ".age" and encryption.is_encrypted(sealed)
    assert oct(sealed.stat().st_mode & 0o777) == "0o600"
    assert b"data/flows/a.txt" in path.read_bytes()
    assert b"data/flows/a.txt" not in sealed.read_bytes()    # nothing readable inside
    for key in ("age.key", "id_ed25519"):
        out = encryption.decrypt(sealed, tmp_path / key, tmp_path / ("out-" + key))
        assert out.read_bytes() == path.read_bytes()
        assert archive.verify(out)["counts"] == archive.verify(path)["counts"]
    other = tmp_path / "other"
    other.mkdir()
    _keys(other)
    with pytest.raises(archive.BackupError) as e:
        encryption.decrypt(sealed, other / "age.key", tmp_path / "nope")
    assert str(e.value) == "%s does not open %s: it was encrypted to another key" % (
        other / "age.key", sealed.name)
    assert not (tmp_path / "nope").exists()


def test_recipients_are_checked_and_ssh_comments_dropped(tmp_path):
    from metaflow_services import encryption

    age_pub, ssh_pub = _keys(tmp_path)
    # The comment ("ana@laptop #1") could break the .env line it goes into.
    assert encryption.normalize(ssh_pub) == " ".join(ssh_pub.split()[:2])
    assert len(encryption.recipients("%s\n%s" % (age_pub, ssh_pub))) == 2
    for bad, says in (("age1notakey", "invalid"), ("ssh-dss AAAAB3", "expected an age public key"),
                      ("", "no encryption recipient given"),
                      ("AGE-SECRET-KEY-1QQQ", "expected an age public key")):
        with pytest.raises(archive.BackupError, match=says):
            encryption.recipients(bad)
    # A passphrase-protected SSH key says how to use it.
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "pw", "-f",
                    str(tmp_path / "locked")], check=True)
    with pytest.raises(archive.BackupError, match="ssh-keygen -p"):
        encryption.identities(tmp_path / "locked")
    (tmp_path / "empty.key").write_text("# nothing\n")
    with pytest.raises(archive.BackupError, match="holds no age identity"):
        encryption.identities(tmp_path / "empty.key")
