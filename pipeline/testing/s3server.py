"""A real S3-API HTTP server (moto's, on 127.0.0.1), and flaky proxies in front of it.

Tests and benchmarks talk to it only over HTTP, exactly as to S3: nothing inside boto3 is
mocked. Needs moto (the test extra). The tests' session fixture ``s3_endpoint`` (in
``tests/conftest.py``) starts one and points the standard AWS environment variables at it.
"""

from __future__ import annotations

import logging
import random
import socket
import struct
import threading
from contextlib import suppress
from urllib.parse import urlsplit

from moto.server import ThreadedMotoServer

ACCESS_KEY = "testing"
# Distinctive, so a test can assert it never shows up in a repr, a message or a pickle.
SECRET_KEY = "testing-secret-5f0c1e9a"


def start_s3_server() -> tuple[ThreadedMotoServer, str]:
    """Start moto's S3-compatible server on a free local port; return it and its URL."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


_SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>proxy</RequestId></Error>"
)
_SLOWDOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_SLOWDOWN_BODY) + _SLOWDOWN_BODY
)


class FlakyProxy:
    """A tiny HTTP/1.1 proxy to an upstream server that misbehaves on purpose, a bounded number
    of times: the first ``slowdowns`` requests get 503 SlowDown; then the first ``truncations``
    GET responses lose the second half of their body (the connection is closed mid-body).

    One request per connection (it answers ``Connection: close``); request bodies must carry
    a Content-Length (``Expect: 100-continue`` is handled). Bounded: at most
    ``max_connections`` connections, socket timeouts everywhere. Use as a context manager.
    """

    def __init__(
        self,
        upstream: str,
        slowdowns: int = 0,
        truncations: int = 0,
        max_connections: int = 200,
        timeout: float = 10.0,
    ) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.slowdowns, self.truncations = slowdowns, truncations
        self.max_connections, self.timeout = max_connections, timeout
        self.rejected = 0
        self.truncated = 0
        self.requests: list[str] = []  # "METHOD /path Range" of every request seen
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.endpoint_url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FlakyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _serve(self) -> None:
        accepted = 0
        while not self._stop.is_set() and accepted < self.max_connections:
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            accepted += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(self.timeout)
            with suppress(OSError):  # the client went away: nothing to clean up
                self._exchange(conn)

    def _exchange(self, conn: socket.socket) -> None:
        head, body = _read_head(conn)
        if head is None:
            return
        lines = head.decode("latin-1").split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])
        }
        method = lines[0].split(" ")[0]
        with self._lock:
            self.requests.append(f"{lines[0].rsplit(' ', 1)[0]} {headers.get('range', '')}")
            reject = self.rejected < self.slowdowns
            self.rejected += reject
        expects = headers.get("expect", "").lower() == "100-continue"
        length = int(headers.get("content-length", "0"))
        if reject and expects:  # the client waits for us and never sends the body
            conn.sendall(_SLOWDOWN)
            return
        if expects:
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body += _read_exact(conn, length - len(body))  # read it all: closing early sends RST
        if reject:
            conn.sendall(_SLOWDOWN)
            return
        conn.sendall(self._truncate(method, self._forward(lines, body)))

    def _forward(self, lines: list[str], body: bytes) -> bytes:
        keep = [h for h in lines[1:] if h.split(":")[0].strip().lower() not in _HOP_HEADERS]
        head = "\r\n".join([lines[0], *keep, "Connection: close", "", ""]).encode("latin-1")
        with socket.create_connection(self._upstream, timeout=self.timeout) as up:
            up.sendall(head + body)
            chunks = []
            while chunk := up.recv(1 << 16):
                chunks.append(chunk)
        return b"".join(chunks)

    def _truncate(self, method: str, response: bytes) -> bytes:
        head, _, body = response.partition(b"\r\n\r\n")
        with self._lock:
            cut = method == "GET" and len(body) > 1 and self.truncated < self.truncations
            self.truncated += cut
        return head + b"\r\n\r\n" + (body[: len(body) // 2] if cut else body)


_HOP_HEADERS = {"connection", "expect", "keep-alive", "proxy-connection"}


class CountingProxy(FlakyProxy):
    """A well-behaved proxy that counts the response body bytes it relays (what a client
    downloads) and keeps each request's body."""

    def __init__(self, upstream: str, max_connections: int = 100_000) -> None:
        super().__init__(upstream, max_connections=max_connections)
        self.body_bytes = 0
        self.bodies: list[bytes] = []

    def _forward(self, lines: list[str], body: bytes) -> bytes:
        response = super()._forward(lines, body)
        with self._lock:
            self.body_bytes += len(response.partition(b"\r\n\r\n")[2])
            self.bodies.append(body)
        return response


def _read_head(conn: socket.socket) -> tuple[bytes | None, bytes]:
    """Read up to the blank line; return (head, the body bytes already received)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(1 << 16)
        if not chunk:
            return None, b""
        data += chunk
        if len(data) > 1 << 20:
            raise OSError("request head too large")
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _read_exact(conn: socket.socket, n: int) -> bytes:
    chunks = []
    while n > 0:
        chunk = conn.recv(min(n, 1 << 16))
        if not chunk:
            raise OSError("connection closed mid-body")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _error_response(status: str, code: str, message: str) -> bytes:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{message}</Message><RequestId>proxy</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head + body


FAULTS = ("slowdown", "internal", "reset", "stall")
_CANNED = {
    "slowdown": _error_response("503 Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal": _error_response("500 Internal Server Error", "InternalError", "Try again."),
}


class FaultProxy(FlakyProxy):
    """A proxy that injects faults into a seeded random fraction ``rate`` of requests, each
    of a kind drawn from ``faults``:

    - ``slowdown``: 503 SlowDown, nothing forwarded;
    - ``internal``: 500 InternalError, nothing forwarded;
    - ``reset``: the connection is reset (RST) as soon as the request head arrives;
    - ``stall``: the request is forwarded (so the server acts on it) and the answer held for
      ``stall`` seconds, past the client's read timeout, then the connection is dropped: the
      client sees a timeout for a request that did happen (a lost response).

    The first ``len(faults)`` injections take the kinds in turn, so a short run meets every
    kind. ``counts`` holds how many of each were injected, ``forwarded`` the clean requests.
    ``max_connections`` bounds the connections accepted in all.
    """

    def __init__(
        self,
        upstream: str,
        rate: float,
        seed: int = 0,
        faults: tuple[str, ...] = FAULTS,
        stall: float = 3.0,
        max_connections: int = 100_000,
    ) -> None:
        super().__init__(upstream, max_connections=max_connections, timeout=stall + 10.0)
        unknown = set(faults) - set(FAULTS)
        if unknown or not 0.0 <= rate <= 1.0:
            raise ValueError(f"bad fault settings: rate {rate}, unknown kinds {unknown}")
        self.rate, self.faults, self.stall = rate, tuple(faults), stall
        self._random = random.Random(seed)
        self.counts = dict.fromkeys(FAULTS, 0)
        self.forwarded = 0

    def _draw(self) -> str | None:
        with self._lock:
            kind = None
            if self.faults and self._random.random() < self.rate:
                # The first faults go round the kinds, so a short run still meets each one.
                injected = sum(self.counts.values())
                kind = (
                    self.faults[injected]
                    if injected < len(self.faults)
                    else self._random.choice(self.faults)
                )
                self.counts[kind] += 1
            else:
                self.forwarded += 1
            return kind

    def _exchange(self, conn: socket.socket) -> None:
        head, body = _read_head(conn)
        if head is None:
            return
        kind = self._draw()
        if kind == "reset":
            # SO_LINGER 0: close sends RST, the client's socket errors (connection reset).
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        lines = head.decode("latin-1").split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])
        }
        expects = headers.get("expect", "").lower() == "100-continue"
        if kind in _CANNED and expects:  # the client waits for us and never sends the body
            conn.sendall(_CANNED[kind])
            return
        if expects:
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body += _read_exact(conn, int(headers.get("content-length", "0")) - len(body))
        if kind in _CANNED:
            conn.sendall(_CANNED[kind])
            return
        response = self._forward(lines, body)
        if kind == "stall":
            self._stop.wait(self.stall)
            return
        conn.sendall(response)
