"""A loopback HTTP proxy that injects faults between an object-store client and a real local server.

The client's ``endpoint_url`` points at the proxy; every request is forwarded to the server unless a
rule matches it, in which case the proxy answers ``503`` or ``502`` (with the error body of the store
it stands in front of: S3's XML ``<Error>``, or the GCS JSON API's ``{"error": {...}}``), drops the
connection before forwarding (a reset the server never saw), or forwards the request and then drops
the connection (the server acted, the client never hears: the ambiguous case).

Used by the fault-injection tests (integration/test_store_faults.py, on S3 and GCS alike) to
check that a save either succeeds after retries or fails cleanly: previous checkpoint still latest,
nothing new visible, no pending multipart upload.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

PASS, ERROR_503, ERROR_502, DROP, DROP_AFTER = "pass", "503", "502", "drop", "drop_after"
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
}
# The status line of each error action.
_STATUS = {
    ERROR_503: (503, "Service Unavailable", "ServiceUnavailable"),
    ERROR_502: (502, "Bad Gateway", "BadGateway"),
}


def error_answer(style: str, action: str) -> tuple[int, str, str, bytes]:
    """(status, reason, Content-Type, body) of an injected error, in the store's own error format:
    S3's XML ``<Error>``, or the GCS JSON API's error resource
    (https://cloud.google.com/storage/docs/json_api/v1/status-codes)."""
    status, reason, code = _STATUS[action]
    if style == "s3":
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            "<Message>Injected by faultproxy</Message><RequestId>faultproxy</RequestId></Error>"
        )
        return status, reason, "application/xml", body.encode()
    error = {"domain": "global", "reason": "backendError", "message": "Injected by faultproxy"}
    body = json.dumps({"error": {"code": status, "message": "Injected by faultproxy", "errors": [error]}})
    return status, reason, "application/json; charset=UTF-8", body.encode()


ERROR_STYLES = ("s3", "gcs")


@dataclass
class Request:
    """What the proxy saw: sequence number (1-based), method, path with query, and what it did."""

    n: int
    method: str
    path: str
    action: str = PASS


@dataclass
class Rule:
    """Apply ``action`` to requests for which ``match(method, path)`` is true, ``times`` times (None: always)."""

    match: Callable[[str, str], bool]
    action: str
    times: int | None = 1
    hits: int = 0


@dataclass
class FaultProxy:
    """Forwarding proxy on 127.0.0.1 with an editable list of fault rules. Start with ``start()``.

    ``error_style`` picks the body of the injected error answers: ``"s3"`` or ``"gcs"`` (error_answer).
    """

    upstream: str
    rules: list[Rule] = field(default_factory=list)
    log: list[Request] = field(default_factory=list)
    error_style: str = "s3"

    def __post_init__(self) -> None:
        if self.error_style not in ERROR_STYLES:
            raise ValueError(f"error_style must be one of {ERROR_STYLES}. Received: {self.error_style!r}.")
        parts = urlsplit(self.upstream)
        self._up = (parts.hostname, parts.port)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- control

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # A short poll interval: stop() waits for the loop to notice, 0.5 s each time by default.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="faultproxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def add(self, match: Callable[[str, str], bool], action: str, times: int | None = 1) -> Rule:
        rule = Rule(match, action, times)
        with self._lock:
            self.rules.append(rule)
        return rule

    def fail_nth(self, k: int, action: str) -> Rule:
        """Apply ``action`` to the k-th request from now (1-based)."""
        with self._lock:
            target = len(self.log) + k
        return self.add(lambda _m, _p, _t=target: self._next_n == _t, action)

    def reset(self) -> None:
        with self._lock:
            self.rules.clear()
            self.log.clear()

    def count(self, action: str) -> int:
        with self._lock:
            return sum(r.action == action for r in self.log)

    # ---------------------------------------------------------------- decisions

    def _decide(self, method: str, path: str) -> Request:
        with self._lock:
            self._next_n = len(self.log) + 1
            req = Request(self._next_n, method, path)
            for rule in self.rules:
                if (rule.times is None or rule.hits < rule.times) and rule.match(method, path):
                    rule.hits += 1
                    req.action = rule.action
                    break
            self.log.append(req)
            return req


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # Connections the client gave up on (after an injected drop) end in resets here: expected.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as separate writes: without this, Nagle's algorithm holds the body
        # until the client's delayed ACK (40 ms) on every response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _handle(self) -> None:
        body = self._body()
        req = self.owner._decide(self.command, self.path)
        if req.action == DROP:
            self._drop()
            return
        if req.action in _STATUS:
            status, reason, content_type, payload = error_answer(self.owner.error_style, req.action)
            self.send_response(status, reason)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection(*self.owner._up, timeout=120)
        try:
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # The proxy already answered "100 Continue" to the client and holds the whole body.
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"expect"}}
            headers["Content-Length"] = str(len(body))
            conn.request(
                self.command,
                self.path,
                body=body if body or self.command in ("PUT", "POST") else None,
                headers=headers,
            )
            resp = conn.getresponse()
            data = resp.read()
            # HEAD answers carry the object's Content-Length without a body: pass it through as is.
            skip = _HOP_BY_HOP if self.command == "HEAD" else _HOP_BY_HOP | {"content-length"}
            resp_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in skip]
        finally:
            conn.close()
        if req.action == DROP_AFTER:
            self._drop()
            return
        self.send_response(resp.status, resp.reason)
        for k, v in resp_headers:
            self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = do_HEAD = _handle
