"""The parallel S3 multipart writer (ckpt_callbacks._storage._s3) against the real local S3 server.

The conformance suite covers what users see; these pin the writer's own promises: parts really go
up concurrently within the process-wide bound, a failed stream is aborted (nothing visible, nothing
pending), small objects are one PUT, and the error classification and ETag rule it relies on.
"""

from __future__ import annotations

import base64
import io
import threading
import zlib
from typing import Any

import pytest
from cloud_helpers import S3_BUCKET, object_keys, pending_uploads

import ckpt_callbacks._storage._s3 as cloud
from ckpt_callbacks import CheckpointWriteError
from ckpt_callbacks._storage import Storage, is_transient

MiB = 1 << 20


def _payload(n: int) -> bytes:
    return bytes((i * 7 + i // 251) % 256 for i in range(256)) * (n // 256)


def test_writer_dispatch_is_the_parallel_writer(s3_dir: tuple[str, dict, str]) -> None:
    url, so, _ = s3_dir
    w = Storage(url, so).writer("x")
    assert isinstance(w, cloud.S3MultipartWriter)
    w.abort()


def test_parts_upload_concurrently_within_the_bound(
    s3_dir: tuple[str, dict, str], s3_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, so, prefix = s3_dir
    active, peak, lock = 0, 0, threading.Lock()
    real = cloud.S3MultipartWriter._upload_part

    async def counting(self: cloud.S3MultipartWriter, *args: Any) -> dict:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            return await real(self, *args)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(cloud.S3MultipartWriter, "_upload_part", counting)
    data = _payload(6 * cloud.PART_BYTES + 3 * MiB)
    storage = Storage(url, so)
    w = storage.writer("big.bin")
    view = memoryview(data)
    for i in range(0, len(data), 3 * MiB + 1):  # odd chunk sizes cross part boundaries
        w.write(view[i : i + 3 * MiB + 1])
    w.commit()
    assert 1 < peak <= cloud.MAX_INFLIGHT_PARTS
    key = f"{prefix}/big.bin"
    assert s3_client.get_object(Bucket=S3_BUCKET, Key=key)["Body"].read() == data
    assert s3_client.head_object(Bucket=S3_BUCKET, Key=key)["ETag"].endswith('-7"')


def test_multipart_object_carries_a_composite_crc32(s3_dir: tuple[str, dict, str], s3_client: Any) -> None:
    """Every part is sent with a CRC32 the server checks, and Complete lists them all (as boto3 does).

    Without an algorithm at CreateMultipartUpload a server falls back to a full-object CRC64NVME,
    a second pass over the whole object at Complete; with one, Complete must name each part's CRC32.
    """
    url, so, prefix = s3_dir
    data = _payload(2 * cloud.PART_BYTES + MiB)
    w = Storage(url, so).writer("crc.bin")
    w.write(data)
    w.commit()
    key = f"{prefix}/crc.bin"
    attrs = s3_client.get_object_attributes(Bucket=S3_BUCKET, Key=key, ObjectAttributes=["Checksum"])
    assert attrs["Checksum"]["ChecksumType"] == "COMPOSITE", attrs
    # S3's composite rule: the CRC32 of the parts' big-endian CRC32s (8 MiB, 8 MiB, 1 MiB).
    bounds = [0, cloud.PART_BYTES, 2 * cloud.PART_BYTES, len(data)]
    part_crcs = b"".join(zlib.crc32(data[a:b]).to_bytes(4, "big") for a, b in zip(bounds, bounds[1:]))
    expected = base64.b64encode(zlib.crc32(part_crcs).to_bytes(4, "big")).decode()
    assert attrs["Checksum"]["ChecksumCRC32"].split("-")[0] == expected


def test_small_object_is_one_put(s3_dir: tuple[str, dict, str], s3_client: Any) -> None:
    url, so, prefix = s3_dir
    Storage(url, so).write_bytes("small", b"abc")
    head = s3_client.head_object(Bucket=S3_BUCKET, Key=f"{prefix}/small")
    assert "-" not in head["ETag"] and head["ContentLength"] == 3


def test_abort_leaves_nothing(s3_dir: tuple[str, dict, str], s3_client: Any) -> None:
    url, so, prefix = s3_dir
    w = Storage(url, so).writer("aborted.bin")
    w.write(_payload(2 * cloud.PART_BYTES + MiB))
    assert pending_uploads(s3_client, prefix + "/")  # the upload exists while streaming
    w.abort()
    assert pending_uploads(s3_client, prefix + "/") == []
    assert object_keys(s3_client, prefix + "/") == set()


def test_failing_part_raises_write_error_and_aborts(
    s3_dir: tuple[str, dict, str], s3_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, so, prefix = s3_dir

    async def broken(self: cloud.S3MultipartWriter, *args: Any) -> dict:
        raise PermissionError("injected: access denied")  # not transient: no retry

    monkeypatch.setattr(cloud.S3MultipartWriter, "_upload_part", broken)
    w = Storage(url, so).writer("broken.bin")
    with pytest.raises(CheckpointWriteError) as info:
        w.write(_payload(3 * cloud.PART_BYTES))
        w.commit()
    w.abort()
    assert "broken.bin" in str(info.value)
    assert pending_uploads(s3_client, prefix + "/") == []
    assert object_keys(s3_client, prefix + "/") == set()


def test_orphaned_upload_of_same_key_is_aborted(s3_dir: tuple[str, dict, str], s3_client: Any) -> None:
    """An upload left by a killed save of the same file is aborted by the next multipart save of it."""
    url, so, prefix = s3_dir
    key = f"{prefix}/ckpt-1.data-00000-of-00001"
    s3_client.create_multipart_upload(Bucket=S3_BUCKET, Key=key)
    w = Storage(url, so).writer("ckpt-1.data-00000-of-00001")
    w.write(_payload(cloud.PART_BYTES + MiB))
    w.commit()
    assert pending_uploads(s3_client, prefix + "/") == []


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (FileNotFoundError("x"), False),
        (PermissionError("x"), False),
        (ValueError("x"), False),
    ],
)
def test_is_transient_builtin(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


@pytest.mark.parametrize(
    ("code", "status", "transient"),
    [
        ("ServiceUnavailable", 503, True),
        ("SlowDown", 503, True),
        ("InternalError", 500, True),
        ("RequestTimeout", 400, True),
        ("AccessDenied", 403, False),
        ("NoSuchKey", 404, False),
        ("NoSuchUpload", 404, False),
    ],
)
def test_is_transient_botocore(code: str, status: int, transient: bool) -> None:
    from botocore.exceptions import ClientError

    err = ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
    )
    wrapped = OSError(5, "translated by s3fs")
    wrapped.__cause__ = err
    assert is_transient(err) is transient
    assert is_transient(wrapped) is transient


def test_part_size_grows_to_fit_the_part_limit() -> None:
    assert cloud.part_size_for(1) == cloud.PART_BYTES
    assert cloud.part_size_for(cloud.PART_GROWTH_EVERY + 1) == 2 * cloud.PART_BYTES
    total = sum(cloud.part_size_for(n) for n in range(1, cloud.MAX_PARTS + 1))
    assert total > 5 * 2**40  # S3's 5 TiB object limit is reached before the part limit
    assert cloud.part_size_for(cloud.MAX_PARTS) <= 5 * 2**30  # and no part exceeds 5 GiB


def test_part_body_is_a_rewindable_file() -> None:
    data = bytearray(b"0123456789")
    body = cloud.PartBody(memoryview(data)[:8])
    assert len(body) == 8 and body.read(3) == b"012" and body.tell() == 3
    buf = bytearray(10)
    assert body.readinto(buf) == 5 and bytes(buf[:5]) == b"34567"
    assert body.read() == b""
    assert body.seek(0, io.SEEK_END) == 8 and body.seek(0) == 0 and body.read() == b"01234567"
    body.close()
    assert body.seek(2) == 2 and body.read(2) == b"23"  # stays readable for a retry


def test_buffer_pool_is_empty_between_saves(s3_dir: tuple[str, dict, str]) -> None:
    """Recycled part buffers live only while a writer is open: nothing is held between saves."""
    url, so, _ = s3_dir
    storage = Storage(url, so)
    w = storage.writer("pooled.bin")
    w.write(_payload(3 * cloud.PART_BYTES))
    w.commit()
    w2 = storage.writer("aborted.bin")
    w2.write(_payload(2 * cloud.PART_BYTES))
    w2.abort()
    assert cloud._pool._users == 0 and cloud._pool._free == []
