"""Fault injection between the object-store client and a real local server, on S3 and GCS alike
(the commit protocol of README "On storage"; CheckpointWriteError).

A loopback proxy (faultproxy.py, speaking each store's error format) answers 503 / 502, drops the
connection before forwarding (a reset the server never saw), or forwards and then drops it (the
server acted, the client never hears). A save must either succeed after retries, or fail with
CheckpointWriteError and leave storage as it was: the previous checkpoint still the latest and
loadable, no new visible object (listed straight from the server, not through the code under test),
and on S3 no multipart upload left pending.

The tests are written once; what differs between the stores is a :class:`Store` (which request is
which, the state that exercises a multipart upload / several chunks, how to list the server).

- S3 (moto): the 12 MiB data file is a two-part multipart upload (8 MiB parts); the other files
  are one PUT each. botocore's retries are off (``total_max_attempts=1``) and s3fs's lowered, so
  what is tested is the library's own retry layer (``ckpt_callbacks._storage._retry``).
- GCS (gcp-storage-emulator, reached through the ``endpoint_url`` storage option): every object is
  a resumable upload session, one initiation ``POST`` then the chunks (``PUT`` to the session URI,
  256 KiB multiples; the last one finishes the object). With ``block_size=1 MiB`` the 8 MiB data file
  goes up in three chunks (two 4 MiB tensors, then the rest). gcsfs's own retries (``retry_request``:
  6 attempts, sleeping 1 s to 32 s) are switched off (one attempt).

Both: the library's backoff is shortened to keep the persistent-failure tests quick.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import parse_qs, quote, unquote, urlsplit

import numpy as np
import pytest
from cloud_helpers import GCS_BUCKET, S3_BUCKET, gcs_options, object_keys, pending_uploads, s3_options
from faultproxy import DROP, DROP_AFTER, ERROR_502, ERROR_503, FaultProxy

import ckpt_callbacks._checkpoint._checkpoint_io as checkpoint_io
from ckpt_callbacks import CheckpointManager, CheckpointWriteError, latest_checkpoint
from ckpt_callbacks._storage import _retry, _s3

MIB = 1 << 20
LOCK = ".ckpt_callbacks.lock"
DATA = ".data-00000-of-00001"
Match = Callable[[str, str], bool]


def _always(match: Match) -> Callable[[], Match]:
    return lambda: match


def nth(match: Match, k: int) -> Match:
    """Requests that ``match``, from the k-th one on (with ``times=1``: exactly the k-th)."""
    seen = [0]

    def counted(m: str, p: str) -> bool:
        if not match(m, p):
            return False
        seen[0] += 1
        return seen[0] >= k

    return counted


# ------------------------------------------------------------------ S3: which request is which


def s3_is_create(m: str, p: str) -> bool:
    return m == "POST" and p.endswith("?uploads")


def s3_is_part(m: str, p: str) -> bool:
    return m == "PUT" and "partNumber=" in p


def s3_is_complete(m: str, p: str) -> bool:
    return m == "POST" and "uploadId=" in p


def s3_is_put(suffix: str) -> Match:
    return lambda m, p: m == "PUT" and "?" not in p and p.endswith(suffix)


def s3_is_delete(m: str, p: str) -> bool:
    return m == "DELETE" and LOCK not in p


def s3_is_listing(m: str, p: str) -> bool:
    """The directory listing itself (not the one-key probes s3fs makes to tell files from folders)."""
    return m == "GET" and "list-type=2" in p and "max-keys=1" not in p


# ------------------------------------------------------------------ GCS: which request is which


def _gcs_object(path: str) -> str:
    """The object a request is about: ``name=`` of an upload, or the key after ``/o/``."""
    parts = urlsplit(path)
    names = parse_qs(parts.query).get("name")
    if names:
        return names[0]
    return unquote(parts.path.split("/o/", 1)[1]) if "/o/" in parts.path else ""


def gcs_is_initiate(suffix: str) -> Match:
    """The POST that opens a resumable upload session for an object whose name ends with ``suffix``."""

    def match(m: str, p: str) -> bool:
        q = parse_qs(urlsplit(p).query)
        return (
            m == "POST"
            and q.get("uploadType") == ["resumable"]
            and "upload_id" not in q
            and _gcs_object(p).endswith(suffix)
        )

    return match


def gcs_is_chunk(suffix: str) -> Match:
    """A request to the session URI (a chunk, or a status query) of an object ending with ``suffix``."""

    def match(m: str, p: str) -> bool:
        q = parse_qs(urlsplit(p).query)
        return "/upload/storage/v1/" in p and "upload_id" in q and _gcs_object(p).endswith(suffix)

    return match


def gcs_is_delete(m: str, p: str) -> bool:
    return m == "DELETE" and "/upload/" not in p and not _gcs_object(p).endswith(LOCK)


def gcs_is_get_of(suffix: str, download: bool) -> Match:
    def match(m: str, p: str) -> bool:
        parts = urlsplit(p)
        return (
            m == "GET"
            and parts.path.startswith("/download/storage/v1/" if download else "/storage/v1/")
            and "/o/" in parts.path
            and _gcs_object(p).endswith(suffix)
        )

    return match


def gcs_is_listing(m: str, p: str) -> bool:
    """The directory listing itself (not the one-key probes gcsfs makes to tell files from folders)."""
    parts = urlsplit(p)
    q = parse_qs(parts.query)
    return m == "GET" and parts.path.endswith("/o") and q.get("maxResults") != ["1"]


# ------------------------------------------------------------------ the stores' quirks


class Store:
    """What differs between the stores; the tests below use nothing else."""

    name: ClassVar[str]
    error_style: ClassVar[str]
    # Kinds of request a save / a restore makes; a fresh matcher per test (``nth`` counts).
    write_kinds: ClassVar[dict[str, Callable[[], Match]]]
    read_kinds: ClassVar[dict[str, Callable[[], Match]]]
    persistent_kinds: ClassVar[list[str]]  # kinds whose persistent failure fails the save
    lost_reply_kinds: ClassVar[list[str]]  # kinds whose every reply may be lost and the save succeed
    lost_reply_min_count: ClassVar[int]
    bad_gateway_kinds: ClassVar[list[str]]
    sweep_actions: ClassVar[list[str]]
    sweep_min_requests: ClassVar[int]

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self.request = request
        self.endpoint: str = request.getfixturevalue(f"{self.name}_endpoint")

    def state(self, step: int) -> dict:
        raise NotImplementedError

    def url_and_options(self, proxy_url: str, prefix: str) -> tuple[str, dict]:
        raise NotImplementedError

    def visible(self, prefix: str) -> set[str]:
        """Object names under ``prefix/`` (the writer lock left out), straight from the server."""
        raise NotImplementedError

    def pending(self, prefix: str) -> list:
        """Uploads started under ``prefix/`` and neither completed nor aborted (S3 only)."""
        return []

    def quiet_library_retries(self, monkeypatch: pytest.MonkeyPatch) -> None:
        raise NotImplementedError

    def assert_upload_cancelled(self, kind: str, proxy: FaultProxy) -> None:
        """After a persistent fault: the failed object's upload was cancelled, not left open."""
        raise NotImplementedError


class S3(Store):
    name = "s3"
    error_style = "s3"
    write_kinds = {
        "CreateMultipartUpload": _always(s3_is_create),
        "UploadPart": _always(s3_is_part),
        "CompleteMultipartUpload": _always(s3_is_complete),
        "PutObject(.meta)": _always(s3_is_put(".meta")),
        "PutObject(.index)": _always(s3_is_put(".index")),
        "PutObject(checkpoint)": _always(s3_is_put("/checkpoint")),
        "DeleteObject(rotation)": _always(s3_is_delete),
    }
    read_kinds = {
        "ListObjectsV2": _always(s3_is_listing),
        "HeadObject": _always(lambda m, p: m == "HEAD" and LOCK not in p),
        "GetObject(.index)": _always(lambda m, p: m == "GET" and p.endswith(".index")),
        "GetObject(data)": _always(lambda m, p: m == "GET" and ".data-" in p),
    }
    persistent_kinds = [
        "UploadPart",
        "CompleteMultipartUpload",
        "PutObject(.meta)",
        "PutObject(.index)",
        "PutObject(checkpoint)",
    ]
    # A PUT is repeated whole; only the state file's commit is resolved by re-reading it.
    lost_reply_kinds = ["PutObject(checkpoint)"]
    lost_reply_min_count = 2
    bad_gateway_kinds = ["CreateMultipartUpload", "UploadPart", "PutObject(checkpoint)", "ListObjectsV2"]
    sweep_actions = [ERROR_503, DROP]
    sweep_min_requests = 8

    def state(self, step: int) -> dict:
        """12 MiB of tensors: the data file is a two-part multipart upload (8 MiB parts)."""
        rng = np.random.default_rng(step)
        w = rng.integers(0, 255, 12 * MIB, dtype=np.uint8)
        return {"w": w, "b": np.full(3, step, np.float32), "step": step}

    def url_and_options(self, proxy_url: str, prefix: str) -> tuple[str, dict]:
        so = s3_options(proxy_url, retries={"total_max_attempts": 1, "mode": "standard"}, read_timeout=20)
        return f"s3://{S3_BUCKET}/{prefix}", so

    def visible(self, prefix: str) -> set[str]:
        client = self.request.getfixturevalue("s3_client")
        return object_keys(client, prefix + "/") - {f"{prefix}/{LOCK}"}

    def pending(self, prefix: str) -> list:
        return pending_uploads(self.request.getfixturevalue("s3_client"), prefix + "/")

    def quiet_library_retries(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import s3fs

        # s3fs's 5 inner attempts (on its own reads, lists and deletes) would only make the
        # persistent-failure tests wait.
        monkeypatch.setattr(s3fs.S3FileSystem, "retries", 2)

    def assert_upload_cancelled(self, kind: str, proxy: FaultProxy) -> None:
        pass  # no pending multipart upload: checked by every S3 test's teardown (``run``)


class GCS(Store):
    name = "gcs"
    error_style = "gcs"
    write_kinds = {
        "initiate(data)": lambda: gcs_is_initiate(DATA),
        "chunk 1 (data)": lambda: nth(gcs_is_chunk(DATA), 1),
        "chunk 2 (data)": lambda: nth(gcs_is_chunk(DATA), 2),
        "last chunk (data)": lambda: nth(gcs_is_chunk(DATA), 3),
        "initiate(.meta)": lambda: gcs_is_initiate(".meta"),
        "upload(.meta)": lambda: gcs_is_chunk(".meta"),
        "initiate(.index)": lambda: gcs_is_initiate(".index"),
        "upload(.index)": lambda: gcs_is_chunk(".index"),
        "initiate(checkpoint)": lambda: gcs_is_initiate("/checkpoint"),
        "upload(checkpoint)": lambda: gcs_is_chunk("/checkpoint"),
        "delete(rotation)": _always(gcs_is_delete),
    }
    read_kinds = {
        "list": _always(gcs_is_listing),
        "read(checkpoint)": lambda: gcs_is_get_of("/checkpoint", download=True),
        "read(.index)": lambda: gcs_is_get_of(".index", download=True),
        "stat(data)": lambda: gcs_is_get_of(DATA, download=False),
        "read(data)": lambda: gcs_is_get_of(DATA, download=True),
    }
    persistent_kinds = [
        "initiate(data)",
        "chunk 1 (data)",
        "chunk 2 (data)",
        "last chunk (data)",
        "upload(.meta)",
        "initiate(.index)",
        "upload(.index)",
        "initiate(checkpoint)",
        "upload(checkpoint)",
    ]
    # A finished session whose replies are all lost is recognised by its token: any last chunk.
    lost_reply_kinds = ["last chunk (data)", "upload(.meta)", "upload(.index)", "upload(checkpoint)"]
    lost_reply_min_count = _retry.RETRY_ATTEMPTS
    # gcsfs turns a 502 into ``requests.exceptions.ProxyError``: retried like a 503.
    bad_gateway_kinds = [
        "initiate(data)",
        "chunk 1 (data)",
        "upload(checkpoint)",
        "delete(rotation)",
        "list",
        "read(data)",
    ]
    sweep_actions = [ERROR_503, DROP, DROP_AFTER]
    sweep_min_requests = 13  # 4 sessions, 6 chunks, 3 deletes

    def state(self, step: int) -> dict:
        """8 MiB: two 4 MiB tensors (each written to storage as one piece), a small one and a scalar."""
        rng = np.random.default_rng(step)
        return {
            "w": rng.integers(0, 255, 4 * MIB, dtype=np.uint8),
            "v": rng.integers(0, 255, 4 * MIB, dtype=np.uint8),
            "b": np.full(3, step, np.float32),
            "step": step,
        }

    def url_and_options(self, proxy_url: str, prefix: str) -> tuple[str, dict]:
        return f"gs://{GCS_BUCKET}/{prefix}", {**gcs_options(), "endpoint_url": proxy_url, "block_size": MIB}

    def visible(self, prefix: str) -> set[str]:
        url = f"{self.endpoint}/storage/v1/b/{GCS_BUCKET}/o?prefix={quote(prefix + '/', safe='')}"
        with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 - loopback emulator
            listing = json.loads(r.read())
        return {item["name"] for item in listing.get("items") or []} - {f"{prefix}/{LOCK}"}

    def quiet_library_retries(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import gcsfs.retry
        from gcsfs.core import GCSFileSystem

        once = gcsfs.retry.retry_request(retries=1)(GCSFileSystem._request.__wrapped__)
        monkeypatch.setattr(GCSFileSystem, "_request", once)

    def assert_upload_cancelled(self, kind: str, proxy: FaultProxy) -> None:
        if not kind.startswith("initiate"):  # a session was opened: DELETE of the session URI
            assert any(r.method == "DELETE" and "upload_id=" in r.path for r in proxy.log)


STORES: dict[str, type[Store]] = {"s3": S3, "gcs": GCS}


def cases(kinds: Callable[[type[Store]], list[str]], *actions: str) -> list[Any]:
    """(store, kind[, action]) for every store and each of its kinds ``kinds(store)`` picks."""
    out = []
    for name, cls in STORES.items():
        for kind in kinds(cls):
            for action in actions or (None,):
                values = (name, kind) if action is None else (name, kind, action)
                out.append(pytest.param(*values, id="-".join(v for v in values)))
    return out


# ------------------------------------------------------------------ fixtures and helpers


@dataclass
class Run:
    store: Store
    proxy: FaultProxy
    url: str
    so: dict
    prefix: str

    def expected(self, step: int, data: tuple[str, ...] = (DATA,)) -> set[str]:
        """The names a directory holds with only ckpt-``step`` (retention: max_to_keep=1)."""
        names = ("checkpoint", *(f"ckpt-{step}{d}" for d in data), f"ckpt-{step}.meta", f"ckpt-{step}.index")
        return {f"{self.prefix}/{n}" for n in names}

    def visible(self) -> set[str]:
        return self.store.visible(self.prefix)

    def manager(self, **kw: Any) -> CheckpointManager:
        return CheckpointManager(self.url, storage_options=self.so, **kw)

    def assert_clean_failure(self, before: set[str]) -> None:
        """The failed save left everything as it was: ckpt-1 latest and loadable, no new object."""
        assert latest_checkpoint(self.url, storage_options=self.so).endswith("/ckpt-1")
        assert self.visible() == before
        assert self.store.pending(self.prefix) == []
        with self.manager() as mgr:
            assert mgr.restore()["step"] == 1


@pytest.fixture
def run(store: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Run]:
    """A fresh directory on ``store`` behind a fault proxy; fails the test if an upload is left pending."""
    backend = STORES[store](request)
    backend.quiet_library_retries(monkeypatch)
    monkeypatch.setattr(_retry, "BACKOFF_BASE_S", 0.01)
    proxy = FaultProxy(backend.endpoint, error_style=backend.error_style).start()
    prefix = f"faults-{uuid.uuid4().hex[:12]}"
    url, so = backend.url_and_options(proxy.url, prefix)
    try:
        yield Run(backend, proxy, url, so, prefix)
    finally:
        proxy.stop()
    assert backend.pending(prefix) == [], "a multipart upload was left pending"


# ------------------------------------------------------------------ every store


@pytest.mark.parametrize(
    "store,kind,action", cases(lambda s: list(s.write_kinds), ERROR_503, DROP, DROP_AFTER)
)
def test_one_transient_fault_is_retried(store: str, kind: str, action: str, run: Run) -> None:
    s = run.store
    with run.manager(max_to_keep=1) as mgr:
        mgr.save(s.state(1), step=1)
        run.proxy.add(s.write_kinds[kind](), action, times=1)
        mgr.save(s.state(2), step=2)
        assert run.proxy.count(action) == 1, f"the {kind} fault was never injected"
        assert mgr.restore()["step"] == 2
    assert latest_checkpoint(run.url, storage_options=run.so).endswith("/ckpt-2")
    # Rotation removed ckpt-1; nothing else is left (a lost reply never leaves a second copy).
    assert run.visible() == run.expected(2)
    with run.manager() as mgr:
        assert mgr.restore()["step"] == 2


@pytest.mark.parametrize(
    "store,kind,action", cases(lambda s: list(s.read_kinds), ERROR_503, DROP, DROP_AFTER)
)
def test_one_transient_fault_on_read_is_retried(store: str, kind: str, action: str, run: Run) -> None:
    s = run.store
    with run.manager() as mgr:
        mgr.save(s.state(1), step=1)
    run.proxy.add(s.read_kinds[kind](), action, times=1)
    # A new manager lists the directory and reads the state file; restore reads index and data.
    with run.manager() as mgr:
        restored = mgr.restore()
    assert run.proxy.count(action) == 1, f"the {kind} fault was never injected"
    assert restored["step"] == 1
    np.testing.assert_array_equal(restored["w"], s.state(1)["w"])


@pytest.mark.parametrize("store,kind", cases(lambda s: s.bad_gateway_kinds))
def test_bad_gateway_is_transient(store: str, kind: str, run: Run) -> None:
    s = run.store
    match = {**s.write_kinds, **s.read_kinds}[kind]()
    with run.manager(max_to_keep=1) as mgr:
        mgr.save(s.state(1), step=1)
        run.proxy.add(match, ERROR_502, times=1)
        mgr.save(s.state(2), step=2)
        assert run.visible() == run.expected(2)  # rotation removed ckpt-1's files
    with run.manager() as mgr:
        assert mgr.restore()["step"] == 2
    assert run.proxy.count(ERROR_502) == 1, f"the {kind} fault was never injected"
    assert latest_checkpoint(run.url, storage_options=run.so).endswith("/ckpt-2")


@pytest.mark.parametrize("store,kind,action", cases(lambda s: s.persistent_kinds, ERROR_503, DROP))
def test_persistent_fault_fails_cleanly(store: str, kind: str, action: str, run: Run) -> None:
    s = run.store
    with run.manager(max_to_keep=1) as mgr:
        mgr.save(s.state(1), step=1)
        before = run.visible()
        run.proxy.add(s.write_kinds[kind](), action, times=None)
        with pytest.raises(CheckpointWriteError) as info:
            mgr.save(s.state(2), step=2)
        assert isinstance(info.value, OSError)
        assert run.proxy.count(action) >= _retry.RETRY_ATTEMPTS  # retried before giving up
        s.assert_upload_cancelled(kind, run.proxy)
        run.proxy.reset()
        assert mgr.latest_checkpoint.endswith("/ckpt-1")
    run.assert_clean_failure(before)


@pytest.mark.parametrize("store,kind", cases(lambda s: s.lost_reply_kinds))
def test_lost_replies_are_resolved(store: str, kind: str, run: Run) -> None:
    """Every request of one object reaches the server and every reply is lost. S3: the state file's
    PUT reports a failure after its retries, but the state file is committed and the checkpoint it
    names stays. GCS: the finished object is recognised as this upload's own (not an older object of
    the same name). Either way the save succeeds."""
    s = run.store
    with run.manager(max_to_keep=1) as mgr:
        mgr.save(s.state(1), step=1)
        run.proxy.add(s.write_kinds[kind](), DROP_AFTER, times=None)
        mgr.save(s.state(2), step=2)
        assert run.proxy.count(DROP_AFTER) >= s.lost_reply_min_count  # every repeat was lost too
        run.proxy.reset()
        assert mgr.latest_checkpoint.endswith("/ckpt-2")
    assert latest_checkpoint(run.url, storage_options=run.so).endswith("/ckpt-2")
    assert run.visible() == run.expected(2)
    with run.manager() as mgr:
        assert mgr.restore()["step"] == 2


@pytest.mark.parametrize(
    "store,action", [pytest.param(n, a, id=f"{n}-{a}") for n, c in STORES.items() for a in c.sweep_actions]
)
def test_kth_request_fault_sweep(store: str, action: str, run: Run) -> None:
    """Fail the k-th request of a save, for every k: each save succeeds (after a retry)."""
    s = run.store
    with run.manager(max_to_keep=1) as mgr:
        mgr.save(s.state(0), step=0)
        run.proxy.reset()
        mgr.save(s.state(1), step=1)
        n_requests = len(run.proxy.log)
        assert n_requests >= s.sweep_min_requests
        for k in range(1, n_requests + 1):
            step = k + 1
            run.proxy.reset()
            run.proxy.fail_nth(k, action)
            mgr.save(s.state(step), step=step)
            assert run.proxy.count(action) == 1, f"request {k} was never made"
            assert mgr.latest_checkpoint.endswith(f"/ckpt-{step}")
        assert mgr.restore()["step"] == n_requests + 1
    with run.manager() as mgr:
        assert mgr.restore()["step"] == n_requests + 1


# ------------------------------------------------------------------ one store's own mechanics


@pytest.mark.parametrize("store", ["gcs"])
def test_a_gcs_save_is_chunked_resumable_uploads(store: str, run: Run) -> None:
    """The request pattern the GCS kinds rely on: one session per object, the data file in 3 chunks."""
    s = run.store
    with run.manager(max_to_keep=1) as mgr:
        mgr.save(s.state(1), step=1)
        run.proxy.reset()
        mgr.save(s.state(2), step=2)
        log = [(r.method, r.path) for r in run.proxy.log]
    for suffix in (DATA, ".meta", ".index", "/checkpoint"):
        assert sum(gcs_is_initiate(suffix)(m, p) for m, p in log) == 1, suffix
    assert sum(gcs_is_chunk(DATA)(m, p) for m, p in log) == 3
    for suffix in (".meta", ".index", "/checkpoint"):
        assert sum(gcs_is_chunk(suffix)(m, p) for m, p in log) == 1, suffix
    assert sum(gcs_is_delete(m, p) for m, p in log) == 3  # ckpt-1's data, .meta and .index
    assert run.visible() == run.expected(2)


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("store", ["gcs"])
def test_sharded_save(store: str, persistent: bool, run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two data shards uploaded concurrently: a fault in one is retried; a persistent one fails the
    save, and the other shard's finished object is removed again."""
    monkeypatch.setattr(checkpoint_io, "_SHARD_BYTES", 5 * MIB)  # 8 MiB: two shards, one big tensor each
    s = run.store
    shards = (".data-00000-of-00002", ".data-00001-of-00002")
    with run.manager(max_to_keep=1) as mgr:
        mgr.save(s.state(1), step=1)
        before = run.visible()
        assert f"{run.prefix}/ckpt-1{shards[1]}" in before
        run.proxy.add(nth(gcs_is_chunk(shards[1]), 1), ERROR_503, times=None if persistent else 1)
        if persistent:
            with pytest.raises(CheckpointWriteError):
                mgr.save(s.state(2), step=2)
            run.proxy.reset()
        else:
            mgr.save(s.state(2), step=2)
            assert mgr.restore()["step"] == 2
    if persistent:
        run.assert_clean_failure(before)
    else:
        assert run.visible() == run.expected(2, shards)


@pytest.mark.parametrize("store", ["s3"])
def test_completed_multipart_etag_matches_s3_rule(store: str, run: Run) -> None:
    """The ambiguous-Complete check relies on S3's multipart ETag rule; the server must follow it."""
    client = run.store.request.getfixturevalue("s3_client")
    with run.manager() as mgr:
        mgr.save(run.store.state(1), step=1)
    key = f"{run.prefix}/ckpt-1{DATA}"
    head = client.head_object(Bucket=S3_BUCKET, Key=key)
    assert head["ETag"].endswith('-2"')  # two parts: uploaded as a multipart upload
    data = client.get_object(Bucket=S3_BUCKET, Key=key)["Body"].read()
    part_etags = [f'"{hashlib.md5(data[i : i + _s3.PART_BYTES]).hexdigest()}"' for i in (0, _s3.PART_BYTES)]
    assert _s3._multipart_etag(part_etags) == head["ETag"]
