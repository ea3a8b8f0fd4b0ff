"""`metaflow-services sync` against a real S3 server: DAG files mirrored from
the main VM to workers (changes and deletions), and the Metaflow metadata a
worker records shipped to the main VM without overwriting anything there."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from metaflow_services import workers as sync


@pytest.fixture
def s3(seaweedfs):
    from metaflow_services import objectstore

    client, bucket = objectstore.s3_client(), objectstore.bucket_name()
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.ClientError:
        pass
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                 Prefix=sync.PREFIX):
        for obj in page.get("Contents", ()):
            client.delete_object(Bucket=bucket, Key=obj["Key"])
    return client, bucket


def test_dag_files_follow_the_main_vm_changes_and_deletions_included(s3, tmp_path):
    """Only the generated DAG files travel (the flows' DAGs, in the dags
    folder's .metaflow-services/): users' flow files and plain DAGs stay on
    the main VM, whose own workers run them."""
    client, bucket = s3
    main, worker = tmp_path / "main", tmp_path / "worker"
    gen = main / ".metaflow-services"
    gen.mkdir(parents=True)
    (gen / "state.json").write_text("{}")
    (gen / "A.py").write_text("SPEC = 1\n")
    (gen / "B.py").write_text("SPEC = 2\n")
    (main / "my_flow.py").write_text("class MyFlow(FlowSpec): ...\n")   # a user's flow file
    (main / "plain_dag.py").write_text("from airflow.sdk import DAG\n")
    (worker / ".metaflow-services").mkdir(parents=True)
    (worker / ".metaflow-services" / "Gone.py").write_text("an old DAG\n")
    (worker / "Old.py").write_text("a DAG file of the layout before flows lived in dags\n")

    assert sync.push_dags(client, bucket, main) == 2
    assert sync.pull_dags(client, bucket, worker) == 4   # A, B in; Gone and Old out
    on_worker = sorted(str(p.relative_to(worker)) for p in worker.rglob("*") if p.is_file())
    assert on_worker == [".metaflow-services/A.py", ".metaflow-services/B.py"]
    assert sync.push_dags(client, bucket, main) == 0      # nothing changed: nothing sent
    assert sync.pull_dags(client, bucket, worker) == 0

    (gen / "A.py").write_text("SPEC = 10\n")
    (gen / "B.py").unlink()
    assert sync.push_dags(client, bucket, main) == 2
    assert sync.pull_dags(client, bucket, worker) == 2
    assert sorted(p.name for p in (worker / ".metaflow-services").iterdir()) == ["A.py"]
    assert (worker / ".metaflow-services" / "A.py").read_text() == "SPEC = 10\n"


def test_worker_metadata_reaches_the_main_vm_once_and_never_overwrites(s3, tmp_path):
    client, bucket = s3
    worker, main = tmp_path / "worker-md", tmp_path / "main-md"
    task = worker / ".metaflow" / "Flow" / "af-1" / "body" / "5" / "_meta"
    task.mkdir(parents=True)
    (task / "0_attempt.json").write_text('{"attempt": 0}')
    (task / "mfs-worker_1.json").write_text('{"value": "vm1"}')
    run_self = worker / ".metaflow" / "Flow" / "af-1" / "_meta" / "_self.json"
    run_self.parent.mkdir(parents=True)
    run_self.write_text('{"from": "worker"}')
    main_run_self = main / ".metaflow" / "Flow" / "af-1" / "_meta" / "_self.json"
    main_run_self.parent.mkdir(parents=True)
    main_run_self.write_text('{"from": "main"}')

    shipper = sync.MetadataShipper(worker, "vm1", worker / sync.SHIPPED)
    assert shipper.ship(client, bucket) == 3
    assert shipper.ship(client, bucket) == 0               # shipped already
    # A restarted sync service remembers what it shipped.
    assert sync.MetadataShipper(worker, "vm1", worker / sync.SHIPPED).ship(client, bucket) == 0

    assert sync.receive_metadata(client, bucket, main) == 2
    got = main / ".metaflow" / "Flow" / "af-1" / "body" / "5" / "_meta"
    assert (got / "mfs-worker_1.json").read_text() == '{"value": "vm1"}'
    assert main_run_self.read_text() == '{"from": "main"}'   # the main VM's own file stays
    assert not list(client.list_objects_v2(Bucket=bucket, Prefix=sync.METADATA)
                    .get("Contents", ()))                     # received objects are deleted

    (task / "1_attempt.json").write_text('{"attempt": 1}')
    assert shipper.ship(client, bucket) == 1
    assert sync.receive_metadata(client, bucket, main) == 1
    assert (got / "1_attempt.json").exists()


def test_a_shipped_archive_cannot_write_outside_the_metadata_folder(s3, tmp_path):
    client, bucket = s3
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("../escaped.json", "/etc/escaped.json", "ok/inside.json"):
            data = b"{}"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    client.put_object(Bucket=bucket, Key=sync.METADATA + "evil/1-x.tar.gz", Body=buf.getvalue())
    main = tmp_path / "md"
    main.mkdir()
    assert sync.receive_metadata(client, bucket, main) == 1
    assert (main / "ok" / "inside.json").exists()
    assert not (tmp_path / "escaped.json").exists() and not os.path.exists("/etc/escaped.json")
