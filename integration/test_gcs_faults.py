"""Fault injection between gcsfs and a real GCS emulator (SPEC §3.3, §6 CheckpointWriteError).

A loopback proxy (faultproxy.py, GCS JSON error bodies) answers 503 or drops the connection for
chosen requests; gcsfs reaches it through the ``endpoint_url`` storage option. A save must either
succeed after retries, or fail with CheckpointWriteError and leave storage as it was: the previous
checkpoint still the latest and loadable, and no new visible object (listed with plain HTTP straight
from the emulator's JSON API, not through the code under test).

Every object of a save is a resumable upload session: one initiation ``POST``, then the chunks
(``PUT`` to the session URI, 256 KiB multiples; the last one finishes the object). With
``block_size=1 MiB`` the 8 MiB data file goes up in three chunks (two 4 MiB tensors, then the rest).

gcsfs retries every request itself (``retry_request``: 6 attempts, sleeping 1, 2, 4, ... up to 32 s);
those retries are switched off here (one attempt) so that what is tested is the library's own retry
layer (ckpt_callbacks._cloud / _storage), and its backoff is shortened.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import parse_qs, quote, unquote, urlsplit

import numpy as np
import pytest
from cloud_helpers import GCS_BUCKET, gcs_options
from faultproxy import DROP, DROP_AFTER, ERROR_502, ERROR_503, FaultProxy

import ckpt_callbacks._cloud as cloud
import ckpt_callbacks._manager as manager
from ckpt_callbacks import CheckpointManager, CheckpointWriteError, latest_checkpoint

MIB = 1 << 20
LOCK = ".ckpt_callbacks.lock"
DATA = ".data-00000-of-00001"
Match = Callable[[str, str], bool]


def state(step: int) -> dict:
    """8 MiB: two 4 MiB tensors (each written to storage as one piece), a small one and a scalar."""
    rng = np.random.default_rng(step)
    return {
        "w": rng.integers(0, 255, 4 * MIB, dtype=np.uint8),
        "v": rng.integers(0, 255, 4 * MIB, dtype=np.uint8),
        "b": np.full(3, step, np.float32),
        "step": step,
    }


# ------------------------------------------------------------------ which request is which


def _object(path: str) -> str:
    """The object a request is about: ``name=`` of an upload, or the key after ``/o/``."""
    parts = urlsplit(path)
    names = parse_qs(parts.query).get("name")
    if names:
        return names[0]
    return unquote(parts.path.split("/o/", 1)[1]) if "/o/" in parts.path else ""


def _is_upload(m: str, p: str) -> bool:
    return "/upload/storage/v1/" in p


def is_initiate(suffix: str) -> Match:
    """The POST that opens a resumable upload session for an object whose name ends with ``suffix``."""

    def match(m: str, p: str) -> bool:
        q = parse_qs(urlsplit(p).query)
        return (
            m == "POST"
            and q.get("uploadType") == ["resumable"]
            and "upload_id" not in q
            and _object(p).endswith(suffix)
        )

    return match


def is_chunk(suffix: str) -> Match:
    """A request to the session URI (a chunk, or a status query) of an object ending with ``suffix``."""

    def match(m: str, p: str) -> bool:
        q = parse_qs(urlsplit(p).query)
        return _is_upload(m, p) and "upload_id" in q and _object(p).endswith(suffix)

    return match


def nth(match: Match, k: int) -> Match:
    """Requests that ``match``, from the k-th one on (with ``times=1``: exactly the k-th)."""
    seen = [0]

    def counted(m: str, p: str) -> bool:
        if not match(m, p):
            return False
        seen[0] += 1
        return seen[0] >= k

    return counted


def is_delete(m: str, p: str) -> bool:
    return m == "DELETE" and "/upload/" not in p and not _object(p).endswith(LOCK)


def _is_get_of(suffix: str, download: bool) -> Match:
    def match(m: str, p: str) -> bool:
        parts = urlsplit(p)
        return (
            m == "GET"
            and parts.path.startswith("/download/storage/v1/" if download else "/storage/v1/")
            and "/o/" in parts.path
            and _object(p).endswith(suffix)
        )

    return match


def is_listing(m: str, p: str) -> bool:
    """The directory listing itself (not the one-key probes gcsfs makes to tell files from folders)."""
    parts = urlsplit(p)
    q = parse_qs(parts.query)
    return m == "GET" and parts.path.endswith("/o") and q.get("maxResults") != ["1"]


# A fresh matcher per test: ``nth`` counts.
WRITE_KINDS: dict[str, Callable[[], Match]] = {
    "initiate(data)": lambda: is_initiate(DATA),
    "chunk 1 (data)": lambda: nth(is_chunk(DATA), 1),
    "chunk 2 (data)": lambda: nth(is_chunk(DATA), 2),
    "last chunk (data)": lambda: nth(is_chunk(DATA), 3),
    "initiate(.meta)": lambda: is_initiate(".meta"),
    "upload(.meta)": lambda: is_chunk(".meta"),
    "initiate(.index)": lambda: is_initiate(".index"),
    "upload(.index)": lambda: is_chunk(".index"),
    "initiate(checkpoint)": lambda: is_initiate("/checkpoint"),
    "upload(checkpoint)": lambda: is_chunk("/checkpoint"),
    "delete(rotation)": lambda: is_delete,
}
READ_KINDS: dict[str, Callable[[], Match]] = {
    "list": lambda: is_listing,
    "read(checkpoint)": lambda: _is_get_of("/checkpoint", download=True),
    "read(.index)": lambda: _is_get_of(".index", download=True),
    "stat(data)": lambda: _is_get_of(DATA, download=False),
    "read(data)": lambda: _is_get_of(DATA, download=True),
}


# ------------------------------------------------------------------ fixtures and helpers


def emulator_names(endpoint: str, prefix: str) -> set[str]:
    """Object names under ``prefix/``, listed with plain HTTP straight from the emulator's JSON API."""
    url = f"{endpoint}/storage/v1/b/{GCS_BUCKET}/o?prefix={quote(prefix + '/', safe='')}"
    with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 - loopback emulator
        listing = json.loads(r.read())
    return {item["name"] for item in listing.get("items") or []} - {f"{prefix}/{LOCK}"}


@pytest.fixture
def proxy(gcs_endpoint: str) -> Iterator[FaultProxy]:
    p = FaultProxy(gcs_endpoint, error_style="gcs").start()
    yield p
    p.stop()


@pytest.fixture
def run(proxy: FaultProxy) -> tuple[str, dict, str]:
    """(URL, storage_options through the proxy, object prefix) of a fresh directory."""
    prefix = f"faults-{uuid.uuid4().hex[:12]}"
    so = {**gcs_options(), "endpoint_url": proxy.url, "block_size": MIB}
    return f"gs://{GCS_BUCKET}/{prefix}", so, prefix


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    import gcsfs.retry
    from gcsfs.core import GCSFileSystem

    # The library's backoff (0.1 s doubling) is what production needs; here it would only slow the
    # persistent-failure tests down. gcsfs's own retries (6 attempts, 1 s to 32 s apart) are off.
    monkeypatch.setattr(cloud, "BACKOFF_BASE_S", 0.01)
    once = gcsfs.retry.retry_request(retries=1)(GCSFileSystem._request.__wrapped__)
    monkeypatch.setattr(GCSFileSystem, "_request", once)


def _assert_clean_failure(url: str, so: dict, prefix: str, endpoint: str, before: set[str]) -> None:
    """The failed save left everything as it was: ckpt-1 latest and loadable, no new object."""
    assert latest_checkpoint(url, storage_options=so).endswith("/ckpt-1")
    assert emulator_names(endpoint, prefix) == before
    with CheckpointManager(url, storage_options=so) as mgr:
        assert mgr.restore()["step"] == 1


# ------------------------------------------------------------------ tests


def test_a_save_is_chunked_resumable_uploads(
    proxy: FaultProxy, run: tuple[str, dict, str], gcs_endpoint: str
) -> None:
    """The request pattern the kinds above rely on: one session per object, the data file in 3 chunks."""
    url, so, prefix = run
    with CheckpointManager(url, storage_options=so, max_to_keep=1) as mgr:
        mgr.save(state(1), step=1)
        proxy.reset()
        mgr.save(state(2), step=2)
        log = [(r.method, r.path) for r in proxy.log]
    for suffix in (DATA, ".meta", ".index", "/checkpoint"):
        assert sum(is_initiate(suffix)(m, p) for m, p in log) == 1, suffix
    assert sum(is_chunk(DATA)(m, p) for m, p in log) == 3
    for suffix in (".meta", ".index", "/checkpoint"):
        assert sum(is_chunk(suffix)(m, p) for m, p in log) == 1, suffix
    assert sum(is_delete(m, p) for m, p in log) == 3  # ckpt-1's data, .meta and .index
    assert emulator_names(gcs_endpoint, prefix) == {
        f"{prefix}/{n}" for n in ("checkpoint", f"ckpt-2{DATA}", "ckpt-2.meta", "ckpt-2.index")
    }


@pytest.mark.parametrize("action", [ERROR_503, DROP, DROP_AFTER])
@pytest.mark.parametrize("kind", list(WRITE_KINDS))
def test_one_transient_fault_is_retried(
    kind: str, action: str, proxy: FaultProxy, run: tuple[str, dict, str], gcs_endpoint: str
) -> None:
    url, so, prefix = run
    with CheckpointManager(url, storage_options=so, max_to_keep=1) as mgr:
        mgr.save(state(1), step=1)
        proxy.add(WRITE_KINDS[kind](), action, times=1)
        mgr.save(state(2), step=2)
        assert proxy.count(action) == 1, f"the {kind} fault was never injected"
        assert mgr.restore()["step"] == 2
    assert latest_checkpoint(url, storage_options=so).endswith("/ckpt-2")
    # Rotation removed ckpt-1; nothing else is left (a lost reply never leaves a second copy).
    assert emulator_names(gcs_endpoint, prefix) == {
        f"{prefix}/{n}" for n in ("checkpoint", f"ckpt-2{DATA}", "ckpt-2.meta", "ckpt-2.index")
    }
    with CheckpointManager(url, storage_options=so) as mgr:
        assert mgr.restore()["step"] == 2


@pytest.mark.parametrize("action", [ERROR_503, DROP, DROP_AFTER])
@pytest.mark.parametrize("kind", list(READ_KINDS))
def test_one_transient_fault_on_read_is_retried(
    kind: str, action: str, proxy: FaultProxy, run: tuple[str, dict, str]
) -> None:
    url, so, _prefix = run
    with CheckpointManager(url, storage_options=so) as mgr:
        mgr.save(state(1), step=1)
    proxy.add(READ_KINDS[kind](), action, times=1)
    # A new manager lists the directory and reads the state file; restore reads index and data.
    with CheckpointManager(url, storage_options=so) as mgr:
        restored = mgr.restore()
    assert proxy.count(action) == 1, f"the {kind} fault was never injected"
    assert restored["step"] == 1
    np.testing.assert_array_equal(restored["w"], state(1)["w"])


@pytest.mark.parametrize(
    "kind",
    ["initiate(data)", "chunk 1 (data)", "upload(checkpoint)", "delete(rotation)", "list", "read(data)"],
)
def test_bad_gateway_is_transient(
    kind: str, proxy: FaultProxy, run: tuple[str, dict, str], gcs_endpoint: str
) -> None:
    """gcsfs turns a 502 into ``requests.exceptions.ProxyError``: retried like a 503."""
    url, so, prefix = run
    match = {**WRITE_KINDS, **READ_KINDS}[kind]()
    with CheckpointManager(url, storage_options=so, max_to_keep=1) as mgr:
        mgr.save(state(1), step=1)
        proxy.add(match, ERROR_502, times=1)
        mgr.save(state(2), step=2)
        assert len(emulator_names(gcs_endpoint, prefix)) == 4  # rotation removed ckpt-1's 3 files
    with CheckpointManager(url, storage_options=so) as mgr:
        assert mgr.restore()["step"] == 2
    assert proxy.count(ERROR_502) == 1, f"the {kind} fault was never injected"
    assert latest_checkpoint(url, storage_options=so).endswith("/ckpt-2")


@pytest.mark.parametrize(
    "kind",
    [
        "initiate(data)",
        "chunk 1 (data)",
        "chunk 2 (data)",
        "last chunk (data)",
        "upload(.meta)",
        "initiate(.index)",
        "upload(.index)",
        "initiate(checkpoint)",
        "upload(checkpoint)",
    ],
)
@pytest.mark.parametrize("action", [ERROR_503, DROP])
def test_persistent_fault_fails_cleanly(
    kind: str, action: str, proxy: FaultProxy, run: tuple[str, dict, str], gcs_endpoint: str
) -> None:
    url, so, prefix = run
    with CheckpointManager(url, storage_options=so, max_to_keep=1) as mgr:
        mgr.save(state(1), step=1)
        before = emulator_names(gcs_endpoint, prefix)
        proxy.add(WRITE_KINDS[kind](), action, times=None)
        with pytest.raises(CheckpointWriteError) as info:
            mgr.save(state(2), step=2)
        assert isinstance(info.value, OSError)
        assert proxy.count(action) >= cloud.RETRY_ATTEMPTS  # retried before giving up
        if not kind.startswith("initiate"):
            # The session of the failed object was cancelled (DELETE of the session URI).
            assert any(r.method == "DELETE" and "upload_id=" in r.path for r in proxy.log)
        proxy.reset()
        assert mgr.latest_checkpoint.endswith("/ckpt-1")
    _assert_clean_failure(url, so, prefix, gcs_endpoint, before)


@pytest.mark.parametrize(
    "kind", ["last chunk (data)", "upload(.meta)", "upload(.index)", "upload(checkpoint)"]
)
def test_lost_replies_to_a_last_chunk_are_resolved(
    kind: str, proxy: FaultProxy, run: tuple[str, dict, str], gcs_endpoint: str
) -> None:
    """The server finished the object but no reply ever arrives: the object is recognised as this
    upload's own (not an older object of the same name) and the save succeeds."""
    url, so, prefix = run
    with CheckpointManager(url, storage_options=so, max_to_keep=1) as mgr:
        mgr.save(state(1), step=1)
        proxy.add(WRITE_KINDS[kind](), DROP_AFTER, times=None)
        mgr.save(state(2), step=2)
        assert proxy.count(DROP_AFTER) >= cloud.RETRY_ATTEMPTS  # every repeat was lost too
        proxy.reset()
    assert latest_checkpoint(url, storage_options=so).endswith("/ckpt-2")
    assert emulator_names(gcs_endpoint, prefix) == {
        f"{prefix}/{n}" for n in ("checkpoint", f"ckpt-2{DATA}", "ckpt-2.meta", "ckpt-2.index")
    }
    with CheckpointManager(url, storage_options=so) as mgr:
        assert mgr.restore()["step"] == 2


@pytest.mark.parametrize("persistent", [False, True])
def test_sharded_save(
    persistent: bool,
    proxy: FaultProxy,
    run: tuple[str, dict, str],
    gcs_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two data shards uploaded concurrently: a fault in one is retried; a persistent one fails the
    save, and the other shard's finished object is removed again."""
    monkeypatch.setattr(manager, "_SHARD_BYTES", 5 * MIB)  # 8 MiB: two shards, one big tensor each
    url, so, prefix = run
    shard1 = ".data-00001-of-00002"
    with CheckpointManager(url, storage_options=so, max_to_keep=1) as mgr:
        mgr.save(state(1), step=1)
        before = emulator_names(gcs_endpoint, prefix)
        assert f"{prefix}/ckpt-1{shard1}" in before
        proxy.add(nth(is_chunk(shard1), 1), ERROR_503, times=None if persistent else 1)
        if persistent:
            with pytest.raises(CheckpointWriteError):
                mgr.save(state(2), step=2)
            proxy.reset()
        else:
            mgr.save(state(2), step=2)
            assert mgr.restore()["step"] == 2
    if persistent:
        _assert_clean_failure(url, so, prefix, gcs_endpoint, before)
    else:
        assert emulator_names(gcs_endpoint, prefix) == {
            f"{prefix}/{n}"
            for n in (
                "checkpoint",
                "ckpt-2.data-00000-of-00002",
                f"ckpt-2{shard1}",
                "ckpt-2.meta",
                "ckpt-2.index",
            )
        }


@pytest.mark.parametrize("action", [ERROR_503, DROP, DROP_AFTER])
def test_kth_request_fault_sweep(action: str, proxy: FaultProxy, run: tuple[str, dict, str]) -> None:
    """Fail the k-th request of a save, for every k: each save succeeds (after a retry)."""
    url, so, _prefix = run
    with CheckpointManager(url, storage_options=so, max_to_keep=1) as mgr:
        mgr.save(state(0), step=0)
        proxy.reset()
        mgr.save(state(1), step=1)
        n_requests = len(proxy.log)
        assert n_requests >= 13  # 4 sessions, 6 chunks, 3 deletes
        for k in range(1, n_requests + 1):
            step = k + 1
            proxy.reset()
            proxy.fail_nth(k, action)
            mgr.save(state(step), step=step)
            assert proxy.count(action) == 1, f"request {k} was never made"
            assert mgr.latest_checkpoint.endswith(f"/ckpt-{step}")
        assert mgr.restore()["step"] == n_requests + 1
    with CheckpointManager(url, storage_options=so) as mgr:
        assert mgr.restore()["step"] == n_requests + 1
