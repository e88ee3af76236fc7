"""Servers for object-storage tests, on 127.0.0.1 only, started per session and stopped at
teardown: an S3-compatible server (moto in server mode, in a thread) and an HTTP server over a
folder with faults injected per path.

Fixtures (imported by tests/conftest.py):
- ``s3_server``: the moto endpoint URL (session). Skips with the reason when moto cannot start.
- ``s3_bucket``: a fresh empty bucket ``s3://<name>`` with ``AWS_ENDPOINT_URL`` and test
  credentials set in the environment (subprocesses inherit them).
- ``http_faults``: a :class:`FaultServer` over a fresh temporary folder (``.root``); serve a file
  by writing it there, get its URL with ``.url(name)``, inject faults with ``.fail(name, ...)``.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

HOST = "127.0.0.1"
STALL_LIMIT_S = 120  # a stalled handler gives up after this even if the server is never stopped

# fault kinds, each applied to one request:
#   "drop"        headers with the full Content-Length, half the body, then the connection closes
#   "stall"       the request is read, then nothing is ever sent
#   "stall-body"  headers and half the body are sent, then nothing more
#   "404", "500", "503"  that status, no body
FAULTS = ("drop", "stall", "stall-body", "404", "500", "503")


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up early (a reader that stopped mid-shard, a timed-out retry) is
    normal here: no traceback on stderr for it."""

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class FaultServer:
    """ThreadingHTTPServer over ``root`` with GET (and ``Range: bytes=N-``) support. Faults queued
    with :meth:`fail` are used by successive requests for that path, one each; a fault set with
    ``always=True`` (path ``"*"`` = every path) applies to every request. ``hits`` counts requests
    per path, ``ranges`` records the Range starts asked for."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.hits: Counter = Counter()
        self.ranges: list[tuple[str, int]] = []
        self._queued: dict[str, list[str]] = {}
        self._always: dict[str, str] = {}
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self.httpd = _QuietServer((HOST, 0), _handler_for(self))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url(self, name: str) -> str:
        return f"{self.base}/{name.lstrip('/')}"

    def fail(self, name: str, *kinds: str, always: bool = False) -> None:
        for k in kinds:
            assert k in FAULTS, k
        key = "/" + name.lstrip("/") if name != "*" else "*"
        with self._lock:
            if always:
                self._always[key] = kinds[0]
            else:
                self._queued.setdefault(key, []).extend(kinds)

    def clear(self) -> None:
        with self._lock:
            self._queued.clear()
            self._always.clear()

    def next_fault(self, path: str) -> str | None:
        with self._lock:
            self.hits[path] += 1
            queue = self._queued.get(path)
            if queue:
                return queue.pop(0)
            return self._always.get(path) or self._always.get("*")

    def stop(self) -> None:
        self.stopping.set()  # releases stalled handlers
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)


def _handler_for(server: FaultServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _stall(self) -> None:
            server.stopping.wait(STALL_LIMIT_S)
            self.close_connection = True

        def do_HEAD(self) -> None:  # noqa: N802 (http.server's name); S3 clients ask it first
            self.do_GET(head=True)

        def do_GET(self, head: bool = False) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0]
            fault = server.next_fault(path)
            if fault == "stall" or (head and fault == "stall-body"):
                return self._stall()
            if fault in ("404", "500", "503"):
                return self._status(int(fault))
            if head and fault == "drop":
                self.close_connection = True  # no answer at all
                return
            file = (server.root / path.lstrip("/")).resolve()
            if server.root.resolve() not in file.parents or not file.is_file():
                return self._status(404)
            data = file.read_bytes()
            if head:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                return
            start = 0
            m = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
            if m and int(m.group(1)) < len(data):
                start = int(m.group(1))
                server.ranges.append((path, start))
            body = data[start:]
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if fault in ("drop", "stall-body"):
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                if fault == "stall-body":
                    self._stall()
                self.close_connection = True
                return
            self.wfile.write(body)

        def _status(self, code: int) -> None:
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


@pytest.fixture
def http_faults(tmp_path: Path):
    root = tmp_path / "www"
    root.mkdir()
    srv = FaultServer(root)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server on 127.0.0.1 (a free port), stopped at session end."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        pytest.skip(f"moto[server] is not installed ({exc}); pip install -e '.[dev]'")
    try:
        import s3fs  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"s3fs is not installed ({exc}); pip install -e '.[dev,s3]'")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"moto server could not start: {exc}")
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_SESSION_TOKEN": "testing",
}


def use_s3_endpoint(monkeypatch, endpoint: str) -> None:
    """Point every S3 client of this process and its children at ``endpoint`` with test keys,
    and forget filesystems cached with another endpoint."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(k, raising=False)
    forget_filesystems()


def forget_filesystems() -> None:
    import s3fs

    from restorer.data import urlio

    urlio._FS_CACHE.clear()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> Iterator[str]:
    """A fresh bucket on the moto server; returns ``s3://<bucket>``."""
    import boto3

    use_s3_endpoint(monkeypatch, s3_server)
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    yield f"s3://{name}"
    forget_filesystems()
