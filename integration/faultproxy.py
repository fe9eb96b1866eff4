"""A loopback HTTP proxy that injects faults between an S3 client and a real local S3 server.

The client's ``endpoint_url`` points at the proxy; every request is forwarded to the server unless a
rule matches it, in which case the proxy answers ``503 ServiceUnavailable`` (S3's XML error body),
drops the connection before forwarding (a reset the server never saw), or forwards the request and
then drops the connection (the server acted, the client never hears: the ambiguous case).

Used by the fault-injection tests (integration/test_s3_faults.py) to check that a save either
succeeds after retries or fails cleanly: previous checkpoint still latest, nothing new visible, no
pending multipart upload.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

PASS, ERROR_503, DROP, DROP_AFTER = "pass", "503", "drop", "drop_after"
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
}
_S3_503 = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
    b"<Message>Injected by faultproxy</Message><RequestId>faultproxy</RequestId></Error>"
)


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
    """Forwarding proxy on 127.0.0.1 with an editable list of fault rules. Start with ``start()``."""

    upstream: str
    rules: list[Rule] = field(default_factory=list)
    log: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
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
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
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
        if req.action == ERROR_503:
            self.send_response(503, "Service Unavailable")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(_S3_503)))
            self.end_headers()
            self.wfile.write(_S3_503)
            return
        conn = http.client.HTTPConnection(*self.owner._up, timeout=120)
        try:
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

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
