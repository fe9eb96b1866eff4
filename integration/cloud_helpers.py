"""Names and small helpers shared by the integration tests and their fixtures (a uniquely named module:
test files import from here rather than from ``conftest``, which pytest re-imports per directory)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

S3_BUCKET = "ckpt-test"
GCS_BUCKET = "ckpt-test-gcs"
DUMMY_KEY, DUMMY_SECRET, REGION = "testing-key", "testing-secret", "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(bucket: str) -> Iterator[str]:
    """A real moto S3 server in this process (``ThreadedMotoServer``) with ``bucket``: its URL."""
    import pytest

    moto_server = pytest.importorskip("moto.server", reason="moto[server] is needed for the S3 tests")
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id=DUMMY_KEY,
            aws_secret_access_key=DUMMY_SECRET,
            region_name=REGION,
        )
        client.create_bucket(Bucket=bucket)
        yield url
    finally:
        server.stop()


def s3_options(endpoint: str, **config: Any) -> dict[str, Any]:
    """storage_options for s3fs against a local endpoint (``config`` goes to botocore's Config)."""
    so: dict[str, Any] = {
        "key": DUMMY_KEY,
        "secret": DUMMY_SECRET,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": REGION},
    }
    if config:
        so["config_kwargs"] = config
    return so


def gcs_options() -> dict[str, Any]:
    return {"token": "anon", "project": "test"}


def pending_uploads(client: Any, prefix: str) -> list[dict]:
    """Multipart uploads started under ``prefix`` and neither completed nor aborted."""
    return client.list_multipart_uploads(Bucket=S3_BUCKET, Prefix=prefix).get("Uploads", [])


def object_keys(client: Any, prefix: str) -> set[str]:
    resp = client.list_objects_v2(Bucket=S3_BUCKET, Prefix=prefix)
    return {o["Key"] for o in resp.get("Contents", [])}
