"""The object store: the bucket a deployment keeps everything in, and the S3
clients that talk to it (the health checks, backups, the worker sync).

Every client addresses buckets by path: an S3-compatible server on the stack's
network (SeaweedFS) has no per-bucket host names. The step containers build
their own client (bootstrap.py may use the standard library and boto3 only).
"""

from __future__ import annotations

import hashlib
import os


def bucket_name(root=None) -> str:
    """The bucket of a datastore root (default: the environment's
    METAFLOW_DATASTORE_SYSROOT_S3); empty when the root is not an s3:// URL."""
    if root is None:
        root = os.environ.get("METAFLOW_DATASTORE_SYSROOT_S3", "")
    return root[len("s3://"):].split("/", 1)[0] if root.startswith("s3://") else ""


def s3_client():
    """The stack's S3 client: endpoint and keys from the environment
    (METAFLOW_S3_ENDPOINT_URL, the AWS_* variables; AWS S3 without an endpoint)."""
    return connect(os.environ.get("METAFLOW_S3_ENDPOINT_URL"))


def connect(endpoint_url, verify=None, attempts=3, read_timeout=30, **params):
    """An S3 client of any endpoint (None: AWS S3). `params` go to boto3 as
    they are (a Metaflow profile's METAFLOW_DATATOOLS_CLIENT_PARAMS: keys,
    region); `read_timeout` None keeps botocore's."""
    import boto3
    from botocore.config import Config

    timeouts = {"connect_timeout": 10}
    if read_timeout is not None:
        timeouts["read_timeout"] = read_timeout
    if verify is not None:
        params["verify"] = verify
    return boto3.client("s3", endpoint_url=endpoint_url,
                        config=Config(retries={"max_attempts": attempts},
                                      s3={"addressing_style": "path"}, **timeouts),
                        **params)


def error_code(e) -> str:
    """The S3 error code of a botocore ClientError ("404", "AccessDenied", ...);
    empty for any other exception."""
    response = getattr(e, "response", None)
    return str((response or {}).get("Error", {}).get("Code", "")) if isinstance(
        response, dict) else ""


def listing(s3, bucket, prefix) -> dict:
    """{key relative to prefix: ETag without quotes} of every object under prefix."""
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", ()):
            out[obj["Key"][len(prefix):]] = obj["ETag"].strip('"')
    return out


def md5_file(path) -> str:
    """A file's MD5, as S3 gives a single-part object's ETag."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
