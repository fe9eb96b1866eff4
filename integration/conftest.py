"""Real local object stores for the integration tests: a moto S3 server and a GCS emulator.

Both run on 127.0.0.1 on a free port for the whole session, with dummy credentials, and are stopped
at the end. s3fs reaches S3 through ``client_kwargs.endpoint_url``; gcsfs reaches the emulator
through ``STORAGE_EMULATOR_HOST``. ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` stops gcsfs from
spending 60 s on a gRPC probe per call against an emulator that does not speak gRPC.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# The conformance suite lives with the unit tests (pyproject's pytest `pythonpath` puts it and this
# directory on the path); the cloud backends run the same classes.
from cloud_helpers import (
    DUMMY_KEY,
    DUMMY_SECRET,
    GCS_BUCKET,
    REGION,
    S3_BUCKET,
    free_port,
    gcs_options,
    moto_s3,
    pending_uploads,
    s3_options,
)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a real moto S3 server in this process (``ThreadedMotoServer``), with one bucket."""
    with moto_s3(S3_BUCKET) as url:
        yield url


@pytest.fixture(scope="session")
def s3_client(s3_endpoint: str) -> Any:
    """A plain boto3 client on the server, to inspect what is really stored (objects, uploads)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=DUMMY_KEY,
        aws_secret_access_key=DUMMY_SECRET,
        region_name=REGION,
    )


@pytest.fixture(scope="session")
def gcs_endpoint() -> Iterator[str]:
    """URL of a real gcp-storage-emulator in this process, with one bucket; sets STORAGE_EMULATOR_HOST."""
    emulator = pytest.importorskip(
        "gcp_storage_emulator.server", reason="gcp-storage-emulator is needed for the GCS integration tests"
    )
    pytest.importorskip("gcsfs")
    port = free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=GCS_BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    try:
        yield url
    finally:
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
        server.stop()


@pytest.fixture
def s3_dir(s3_endpoint: str, s3_client: Any) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(URL, storage_options, key prefix) of a fresh directory; fails the test if it leaves uploads pending."""
    prefix = f"run-{uuid.uuid4().hex[:12]}"
    yield f"s3://{S3_BUCKET}/{prefix}", s3_options(s3_endpoint), prefix
    assert pending_uploads(s3_client, prefix + "/") == [], "a multipart upload was left pending"


@pytest.fixture
def gcs_dir(gcs_endpoint: str) -> tuple[str, dict[str, Any]]:
    return f"gs://{GCS_BUCKET}/run-{uuid.uuid4().hex[:12]}", gcs_options()
