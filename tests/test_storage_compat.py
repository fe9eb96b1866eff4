"""One test per private use of s3fs / gcsfs / aiohttp / fsspec (``ckpt_callbacks/_storage/_compat.py``).

Each checks that what our writers use still exists and behaves as they use it, so that a library
release that renames or changes it fails here, loudly, rather than in a user's save. No network: the
filesystems are built offline, and the requests are recorded by stand-ins at the HTTP-client seam.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from ckpt_callbacks._storage import _compat
from ckpt_callbacks._storage._s3 import SEND_CHUNK, PartBody

ROOT = Path(__file__).resolve().parents[1]

s3fs = pytest.importorskip("s3fs", reason="s3fs (the s3 extra) is needed for the S3 compat checks")
gcsfs = pytest.importorskip("gcsfs", reason="gcsfs (the gcs extra) is needed for the GCS compat checks")


def _in_range(version: str, spec: str) -> bool:
    from packaging.specifiers import SpecifierSet

    return version in SpecifierSet(spec)


@pytest.fixture
def s3() -> Any:
    return s3fs.S3FileSystem(
        key="k", secret="s", skip_instance_cache=True, s3_additional_kwargs={"ACL": "private"}
    )


@pytest.fixture
def gcs() -> Any:
    return gcsfs.GCSFileSystem(token="anon", project="test", skip_instance_cache=True)


# ---------------------------------------------------------------------------------------------- versions


@pytest.mark.parametrize("lib", sorted(_compat.SUPPORTED))
def test_installed_version_is_in_the_supported_range(lib: str) -> None:
    assert _in_range(_compat.version_of(lib), _compat.SUPPORTED[lib]), (lib, _compat.version_of(lib))


@pytest.mark.parametrize("lib,extra", [("s3fs", "s3"), ("gcsfs", "gcs")])
def test_extras_carry_the_supported_range(lib: str, extra: str) -> None:
    text = (ROOT / "pyproject.toml").read_text()
    line = re.search(rf"^{extra} = \[(.*)\]$", text, re.M)
    assert line is not None
    assert f'"{lib}{_compat.SUPPORTED[lib]}"' in line.group(1)
    assert f'"aiohttp{_compat.SUPPORTED["aiohttp"]}"' in line.group(1)


def test_an_s3fs_without_our_internals_fails_loudly(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(s3fs.S3FileSystem, "_get_s3_method_kwargs")  # as a release that renamed it would
    with pytest.raises(_compat.UnsupportedStorageLibraryError) as info:
        _compat.require_s3fs(s3)
    msg = str(info.value)
    assert f"s3fs {_compat.version_of('s3fs')}" in msg and _compat.SUPPORTED["s3fs"] in msg
    assert "_get_s3_method_kwargs" in msg


def test_a_gcsfs_without_our_internals_fails_loudly(gcs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(gcsfs.core.GCSFileSystem, "_set_session")
    with pytest.raises(_compat.UnsupportedStorageLibraryError) as info:
        _compat.require_gcsfs(gcs)
    assert f"gcsfs {_compat.version_of('gcsfs')}" in str(info.value) and "_set_session" in str(info.value)


def test_the_writers_are_chosen_or_refused_never_swapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unsupported s3fs makes the S3 writer raise, not fall back to s3fs's file object."""
    from ckpt_callbacks._storage import S3MultipartWriter, Storage

    storage = Storage("s3://bucket/run", {"key": "k", "secret": "s", "skip_instance_cache": True})
    w = storage.writer("x")
    assert isinstance(w, S3MultipartWriter)
    w.abort()
    monkeypatch.delattr(type(storage.fs), "_get_s3_method_kwargs")
    with pytest.raises(_compat.UnsupportedStorageLibraryError):
        storage.writer("x")
    with pytest.raises(_compat.UnsupportedStorageLibraryError):
        _ = storage.parallel_parts


# ---------------------------------------------------------------------------------------------- fsspec


def test_strip_protocol_is_the_filesystems_own() -> None:
    from fsspec.implementations.memory import MemoryFileSystem

    for url in ("memory://x/run", "memory:///x/run/", "s3://bucket/a/b"):
        cls = MemoryFileSystem if url.startswith("memory") else s3fs.S3FileSystem
        assert _compat.strip_protocol(url) == cls._strip_protocol(url)


# ---------------------------------------------------------------------------------------------- s3fs


def test_s3fs_has_what_the_writer_uses(s3: Any) -> None:
    _compat.require_s3fs(s3)
    assert inspect.iscoroutinefunction(s3.get_s3) and inspect.iscoroutinefunction(s3.set_session)
    assert s3.split_path("bucket/dir/name") == ("bucket", "dir/name", None)


def test_s3fs_method_kwargs_adds_the_filesystems_own_and_filters(s3: Any) -> None:
    """``_get_s3_method_kwargs(method, **kw)``: ``s3_additional_kwargs`` merged in, and what the
    operation does not take (ACL on UploadPart) dropped."""

    async def client() -> Any:
        await s3.set_session()
        return await s3.get_s3("bucket")

    c = _compat.on_loop(s3, client)
    put = _compat.s3_method_kwargs(s3, c.put_object, Bucket="b", Key="k", Body=b"x")
    assert put == {"ACL": "private", "Bucket": "b", "Key": "k", "Body": b"x"}
    part = _compat.s3_method_kwargs(s3, c.upload_part, Bucket="b", Key="k", UploadId="u", PartNumber=1)
    assert "ACL" not in part and part["PartNumber"] == 1


def test_s3fs_translates_client_errors_keeping_the_code(s3: Any) -> None:
    """NoSuchUpload must stay readable in the translated error (the writers match on it)."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    err = ClientError({"Error": {"Code": "NoSuchUpload", "Message": "gone"}}, "AbortMultipartUpload")
    translated = translate_boto_error(err)
    assert isinstance(translated, OSError) and "NoSuchUpload" in str(translated) + str(translated.__cause__)
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "PutObject")
    assert isinstance(translate_boto_error(denied), PermissionError)


# ---------------------------------------------------------------------------------------------- aiohttp


def test_aiohttp_sends_a_part_body_from_its_buffer() -> None:
    """Our Payload subclass is what aiohttp picks for a PartBody, with its size, and it writes the
    bytes from the body's position on in SEND_CHUNK pieces."""
    from aiohttp import payload as aiohttp_payload

    from ckpt_callbacks._storage._s3 import _register_part_payload

    _register_part_payload()
    data = bytes(range(256)) * (3 * SEND_CHUNK // 256 + 7)
    body = PartBody(memoryview(data))
    body.seek(5)
    p = aiohttp_payload.get_payload(body)
    assert type(p).__name__ == "PartPayload" and p.size == len(data) - 5

    class Sink:
        def __init__(self) -> None:
            self.chunks: list[bytes] = []

        async def write(self, chunk: Any) -> None:
            self.chunks.append(bytes(chunk))

    sink = Sink()
    asyncio.run(p.write(sink))
    assert b"".join(sink.chunks) == data[5:] and max(map(len, sink.chunks)) == SEND_CHUNK
    sink2 = Sink()
    asyncio.run(p.write_with_length(sink2, 10))
    assert b"".join(sink2.chunks) == data[5:15]
    assert p.decode("latin-1") == data[5:].decode("latin-1")


# ---------------------------------------------------------------------------------------------- gcsfs


def test_gcsfs_has_what_the_writer_uses(gcs: Any) -> None:
    _compat.require_gcsfs(gcs)
    assert inspect.iscoroutinefunction(gcs._call) and inspect.iscoroutinefunction(gcs._set_session)
    assert gcs.split_path("bucket/dir/name")[:2] == ("bucket", "dir/name")
    assert hasattr(gcs, "requests_timeout")


def test_gcsfs_call_takes_a_path_template_and_json_out(gcs: Any) -> None:
    params = inspect.signature(gcs._call).parameters
    assert list(params)[:2] == ["method", "path"] and "json_out" in params


def test_gcsfs_headers_keep_ours(gcs: Any) -> None:
    headers = gcs._get_headers({"Content-Range": "bytes */*", "Content-Type": "application/octet-stream"})
    assert headers["Content-Range"] == "bytes */*" and "User-Agent" in headers
    assert "User-Agent" in gcs._get_headers(None)


def test_gcsfs_set_session_gives_an_aiohttp_session(gcs: Any) -> None:
    import aiohttp

    session = _compat.on_loop(gcs, gcs._set_session)
    assert isinstance(session, aiohttp.ClientSession)


def test_gcsfs_initiate_upload_sends_our_metadata(gcs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The public ``initiate_upload`` POSTs what our writer needs: uploadType=resumable, the object
    name and our custom metadata, and returns the Location header."""
    from gcsfs.core import initiate_upload

    params = list(inspect.signature(initiate_upload).parameters)
    assert params[:5] == ["fs", "bucket", "key", "content_type", "metadata"]
    seen: dict[str, Any] = {}

    async def call(*args: Any, **kwargs: Any) -> tuple[dict, bytes]:
        seen.update(kwargs, args=args)
        return {"Location": "http://127.0.0.1:1/upload?upload_id=abcdefghijklmnopqrstuvwxyz"}, b""

    monkeypatch.setattr(gcs, "_call", call)
    monkeypatch.setattr(gcs, "_is_zonal_bucket", lambda bucket: _false(), raising=False)
    location = _compat.gcs_initiate_upload(gcs, "bucket", "dir/name", {"ckpt-callbacks-upload": "t"})
    assert location.endswith("upload_id=abcdefghijklmnopqrstuvwxyz")
    assert seen["method"] == "POST" and seen["uploadType"] == "resumable"
    assert "/upload/storage/v1/b/bucket/o?name=dir%2Fname" in seen["path"]
    assert seen["json"] == {"name": "dir/name", "metadata": {"ckpt-callbacks-upload": "t"}}


async def _false() -> bool:
    return False


def test_gcsfs_zonal_probe_is_a_coroutine_when_present(gcs: Any) -> None:
    probe = getattr(gcs, "_is_zonal_bucket", None)
    assert probe is None or inspect.iscoroutinefunction(probe)


def test_gcsfs_validate_response_raises_what_we_classify() -> None:
    from gcsfs.retry import HttpError, validate_response

    from ckpt_callbacks._storage import is_transient

    body = b'{"error": {"code": 503, "message": "slow down"}}'
    with pytest.raises(HttpError) as info:
        validate_response(503, body, "loc")
    assert is_transient(info.value)
    with pytest.raises(FileNotFoundError):
        validate_response(404, b"", "loc")
    validate_response(200, b"", "loc")


def test_gcsfs_consistency_checker_takes_our_bytes_and_the_object() -> None:
    from gcsfs.checkers import get_consistency_checker

    checker = get_consistency_checker("size")
    checker.update(memoryview(b"abcd"))
    checker.validate_json_response({"size": "4"})
    with pytest.raises(Exception):  # noqa: B017 - gcsfs's own error type
        checker.validate_json_response({"size": "5"})
    get_consistency_checker(None).validate_json_response({"size": "1"})


# ---------------------------------------------------------------------------------------------- layout

PACKAGE = ROOT / "ckpt_callbacks" / "_storage"
# Each module may import only those before it (the order of the package docstring): no circles.
ORDER = ["_compat", "_retry", "_base", "_local", "_s3", "_gcs", "_store"]
PRIVATE_USES = re.compile(
    r"\._(call_s3|call|set_session|get_headers|get_s3_method_kwargs|is_zonal_bucket|location|strip_protocol)\b"
    r"|PAYLOAD_REGISTRY|aiohttp_payload\.Payload"
)


def _sibling_imports(path: Path) -> set[str]:
    import ast

    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return  # annotations only: not an import at run time
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.update({node.module} if node.module else {a.name for a in node.names})
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return out


@pytest.mark.parametrize("module", ORDER)
def test_storage_modules_import_only_those_before_them(module: str) -> None:
    allowed = set(ORDER[: ORDER.index(module)])
    assert _sibling_imports(PACKAGE / f"{module}.py") <= allowed


def test_private_library_uses_are_only_in_compat() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in (ROOT / "ckpt_callbacks").rglob("*.py")
        if path != PACKAGE / "_compat.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE_USES.search(line)
    ]
    assert offenders == []
