"""Fault injection between s3fs and a real local S3 server (SPEC §3.3, §6 CheckpointWriteError).

A loopback proxy (faultproxy.py) answers 503 or drops the connection for chosen requests. A save
must either succeed after retries, or fail with CheckpointWriteError and leave storage as it was:
the previous checkpoint still the latest and loadable, no new visible object, and no multipart upload
left pending (checked with boto3 ``list_multipart_uploads`` straight on the server).

botocore's own retries are switched off (``max_attempts=1``) for these clients so that what is
tested is the library's retry layer (ckpt_callbacks._cloud) and s3fs's, not botocore's.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from cloud_helpers import S3_BUCKET, object_keys, pending_uploads, s3_options
from faultproxy import DROP, DROP_AFTER, ERROR_503, FaultProxy

import ckpt_callbacks._cloud as cloud
from ckpt_callbacks import CheckpointManager, CheckpointWriteError, latest_checkpoint

# 12 MiB of tensors: the data file is a two-part multipart upload (8 MiB parts).
BIG = 12 << 20


def state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"w": rng.integers(0, 255, BIG, dtype=np.uint8), "b": np.full(3, step, np.float32), "step": step}


def is_create(m: str, p: str) -> bool:
    return m == "POST" and p.endswith("?uploads")


def is_part(m: str, p: str) -> bool:
    return m == "PUT" and "partNumber=" in p


def is_complete(m: str, p: str) -> bool:
    return m == "POST" and "uploadId=" in p


def is_put_suffix(suffix: str) -> Callable[[str, str], bool]:
    return lambda m, p: m == "PUT" and "?" not in p and p.endswith(suffix)


def is_list(m: str, p: str) -> bool:
    return m == "GET" and "list-type=2" in p


def is_delete(m: str, p: str) -> bool:
    return m == "DELETE" and ".ckpt_callbacks.lock" not in p


REQUEST_KINDS: dict[str, Callable[[str, str], bool]] = {
    "CreateMultipartUpload": is_create,
    "UploadPart": is_part,
    "CompleteMultipartUpload": is_complete,
    "PutObject(.meta)": is_put_suffix(".meta"),
    "PutObject(.index)": is_put_suffix(".index"),
    "PutObject(checkpoint)": is_put_suffix("/checkpoint"),
    "DeleteObject(rotation)": is_delete,
}
READ_KINDS: dict[str, Callable[[str, str], bool]] = {
    # The directory listing itself (not the one-key probes s3fs makes to tell files from folders).
    "ListObjectsV2": lambda m, p: is_list(m, p) and "max-keys=1" not in p,
    "HeadObject": lambda m, p: m == "HEAD" and ".ckpt_callbacks.lock" not in p,
    "GetObject(.index)": lambda m, p: m == "GET" and p.endswith(".index"),
    "GetObject(data)": lambda m, p: m == "GET" and ".data-" in p,
}


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    p = FaultProxy(s3_endpoint).start()
    yield p
    p.stop()


@pytest.fixture
def run(proxy: FaultProxy, s3_client: Any) -> Iterator[tuple[str, dict, str]]:
    """(URL, storage_options through the proxy, key prefix); checks nothing is left pending."""
    prefix = f"faults-{uuid.uuid4().hex[:12]}"
    so = s3_options(proxy.url, retries={"total_max_attempts": 1, "mode": "standard"}, read_timeout=20)
    yield f"s3://{S3_BUCKET}/{prefix}", so, prefix
    assert pending_uploads(s3_client, prefix + "/") == []


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    # The backoff and s3fs's 5 inner attempts are what production needs against a real store; here
    # they would only make the persistent-failure tests wait.
    import s3fs

    monkeypatch.setattr(cloud, "BACKOFF_BASE_S", 0.01)
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 2)


@pytest.mark.parametrize("action", [ERROR_503, DROP, DROP_AFTER])
@pytest.mark.parametrize("kind", list(REQUEST_KINDS))
def test_one_transient_fault_is_retried(
    kind: str, action: str, proxy: FaultProxy, run: tuple[str, dict, str], s3_client: Any
) -> None:
    url, so, prefix = run
    with CheckpointManager(url, storage_options=so, max_to_keep=1) as mgr:
        mgr.save(state(1), step=1)
        proxy.add(REQUEST_KINDS[kind], action, times=1)
        mgr.save(state(2), step=2)
        assert proxy.count(action) == 1, f"the {kind} fault was never injected"
        assert mgr.restore()["step"] == 2
    assert latest_checkpoint(url, storage_options=so).endswith("/ckpt-2")
    keys = object_keys(s3_client, prefix + "/")
    assert not {k for k in keys if "/ckpt-1." in k}, "rotation left ckpt-1 files behind"


@pytest.mark.parametrize("action", [ERROR_503, DROP, DROP_AFTER])
@pytest.mark.parametrize("kind", list(READ_KINDS))
def test_one_transient_fault_on_read_is_retried(
    kind: str, action: str, proxy: FaultProxy, run: tuple[str, dict, str]
) -> None:
    url, so, _prefix = run
    with CheckpointManager(url, storage_options=so) as mgr:
        mgr.save(state(1), step=1)
    proxy.add(READ_KINDS[kind], action, times=1)
    # A new manager lists the directory and reads the state file; restore reads index and data.
    with CheckpointManager(url, storage_options=so) as mgr:
        assert mgr.restore()["step"] == 1
    assert proxy.count(action) == 1, f"the {kind} fault was never injected"


def _assert_clean_failure(url: str, so: dict, prefix: str, s3_client: Any, before: set[str]) -> None:
    """The failed save left everything as it was: ckpt-1 latest and loadable, no new object, no upload."""
    assert latest_checkpoint(url, storage_options=so).endswith("/ckpt-1")
    assert object_keys(s3_client, prefix + "/") - {f"{prefix}/.ckpt_callbacks.lock"} == before
    assert pending_uploads(s3_client, prefix + "/") == []
    with CheckpointManager(url, storage_options=so) as mgr:
        assert mgr.restore()["step"] == 1


@pytest.mark.parametrize(
    "kind",
    [
        "UploadPart",
        "CompleteMultipartUpload",
        "PutObject(.meta)",
        "PutObject(.index)",
        "PutObject(checkpoint)",
    ],
)
@pytest.mark.parametrize("action", [ERROR_503, DROP])
def test_persistent_fault_fails_cleanly(
    kind: str, action: str, proxy: FaultProxy, run: tuple[str, dict, str], s3_client: Any
) -> None:
    url, so, prefix = run
    with CheckpointManager(url, storage_options=so, max_to_keep=1) as mgr:
        mgr.save(state(1), step=1)
        before = object_keys(s3_client, prefix + "/") - {f"{prefix}/.ckpt_callbacks.lock"}
        proxy.add(REQUEST_KINDS[kind], action, times=None)
        with pytest.raises(CheckpointWriteError) as info:
            mgr.save(state(2), step=2)
        assert isinstance(info.value, OSError)
        proxy.reset()
        assert mgr.latest_checkpoint.endswith("/ckpt-1")
    _assert_clean_failure(url, so, prefix, s3_client, before)


def test_state_file_whose_every_reply_is_lost_is_still_committed(
    proxy: FaultProxy, run: tuple[str, dict, str], s3_client: Any
) -> None:
    """Every PUT of the state file reaches the server and every reply is lost: after its retries the
    write reports a failure, but the state file is committed; the checkpoint it names stays."""
    url, so, prefix = run
    with CheckpointManager(url, storage_options=so, max_to_keep=1) as mgr:
        mgr.save(state(1), step=1)
        proxy.add(REQUEST_KINDS["PutObject(checkpoint)"], DROP_AFTER, times=None)
        mgr.save(state(2), step=2)
        assert proxy.count(DROP_AFTER) >= 2  # retried, every reply lost
        proxy.reset()
        assert mgr.latest_checkpoint.endswith("/ckpt-2")
    assert latest_checkpoint(url, storage_options=so).endswith("/ckpt-2")
    with CheckpointManager(url, storage_options=so) as mgr:
        assert mgr.restore()["step"] == 2
    assert not {k for k in object_keys(s3_client, prefix + "/") if "/ckpt-1." in k}


@pytest.mark.parametrize("action", [ERROR_503, DROP])
def test_kth_request_fault_sweep(
    action: str, proxy: FaultProxy, run: tuple[str, dict, str], s3_client: Any
) -> None:
    """Fail the k-th request of a save, for every k: each save succeeds (after a retry)."""
    url, so, prefix = run
    with CheckpointManager(url, storage_options=so, max_to_keep=1) as mgr:
        mgr.save(state(0), step=0)
        proxy.reset()
        mgr.save(state(1), step=1)
        n_requests = len(proxy.log)
        assert n_requests >= 8
        for k in range(1, n_requests + 1):
            step = k + 1
            proxy.reset()
            proxy.fail_nth(k, action)
            mgr.save(state(step), step=step)
            assert proxy.count(action) == 1
            assert mgr.latest_checkpoint.endswith(f"/ckpt-{step}")
        assert mgr.restore()["step"] == n_requests + 1
    assert pending_uploads(s3_client, prefix + "/") == []


def test_completed_multipart_etag_matches_s3_rule(s3_dir: tuple[str, dict, str], s3_client: Any) -> None:
    """The ambiguous-Complete check relies on S3's multipart ETag rule; the server must follow it."""
    url, so, prefix = s3_dir
    with CheckpointManager(url, storage_options=so) as mgr:
        mgr.save(state(1), step=1)
    key = f"{prefix}/ckpt-1.data-00000-of-00001"
    head = s3_client.head_object(Bucket=S3_BUCKET, Key=key)
    assert head["ETag"].endswith('-2"')  # two parts: uploaded as a multipart upload
    data = s3_client.get_object(Bucket=S3_BUCKET, Key=key)["Body"].read()
    import hashlib

    part_etags = [
        f'"{hashlib.md5(data[i : i + cloud.PART_BYTES]).hexdigest()}"' for i in (0, cloud.PART_BYTES)
    ]
    assert cloud._multipart_etag(part_etags) == head["ETag"]
