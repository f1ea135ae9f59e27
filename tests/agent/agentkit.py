"""Shared helpers for the agent tests: fixture paths, contract validation, loopback portal and engine servers."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests import FIXTURES

REPO = Path(__file__).resolve().parents[2]


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text()


def validate(batch: dict[str, Any]):
    """Every batch the agent produces must satisfy the single-sourced contract."""
    from portal.telemetry.schemas import BatchIn

    return BatchIn.model_validate(batch)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections: list[socket.socket] = []  # every connection accepted, kept-alive ones included

    def process_request(self, request, client_address):
        self.connections.append(request)
        super().process_request(request, client_address)

    def close_connections(self) -> None:
        """Shut every connection, as a server going down does (a kept-alive client sees it on its next use)."""
        for conn in self.connections:
            with contextlib.suppress(OSError):  # already closed by its client
                conn.shutdown(socket.SHUT_RDWR)


class LoopServer:
    """An http.server in a thread on 127.0.0.1; can be stopped and restarted on the same port."""

    def __init__(self, handler_cls, port: int | None = None):
        self.handler_cls = handler_cls
        self.port = port or free_port()
        self.httpd = None
        self.thread = None

    def start(self) -> LoopServer:
        self.httpd = _Server(("127.0.0.1", self.port), self.handler_cls)
        self.httpd.owner = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd.close_connections()
            self.httpd = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        return len(self.httpd.connections) if self.httpd is not None else 0


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status: int, body: bytes, ctype: str = "application/json", headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class FakePortal:
    """Stores each (seq) once like the real portal; validates bodies against BatchIn; scriptable failures."""

    CREDENTIAL = "node-credential-123"

    def __init__(self, port: int | None = None):
        self.lock = threading.Lock()
        self.batches: dict[int, dict] = {}
        self.stored_order: list[int] = []
        self.posts: list[tuple[float, int | None, int]] = []  # (time, seq, status)
        self.duplicates = 0
        self.conflicts = 0
        self.fail_status: int | None = None
        self.retry_after: str | None = None
        self.fail_times = 0  # fail this many posts with fail_status, then succeed (0: while fail_status is set)
        self.reject: dict[int, int] = {}  # seq -> status
        self.requests: list[list] = []  # the seqs of each request, in order
        self.drop_idle = False  # True: close each connection after its reply, without a Connection: close
        self.batches_endpoint = True  # False: a portal older than multi-interval posts
        self.max_intervals = 720  # a request with more is refused 413, as a body over the portal's limit
        self.config = {"config_version": 0, "interval_s": 10, "sample_s": 1.0, "targets": []}
        self.enroll_tokens = {"enroll-token-abc"}
        portal = self

        class Handler(_Quiet):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if self.path == "/api/v1/agent/enroll":
                    return portal.enroll(self, raw)
                if portal.drop_idle:  # closes without saying so, as a server's idle timeout does
                    self.close_connection = True
                if self.path == "/api/v1/agent/batches" and portal.batches_endpoint:
                    return portal.ingest_batches(self, raw)
                if self.path != "/api/v1/agent/ingest":
                    return self.reply(404, b"{}")
                return portal.ingest(self, raw)

        self.server = LoopServer(Handler, port)

    def start(self) -> FakePortal:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    @property
    def url(self) -> str:
        return self.server.url

    def enroll(self, h, raw: bytes):
        from portal.telemetry.schemas import EnrollIn

        data = EnrollIn.model_validate_json(raw)
        if data.token not in self.enroll_tokens:
            return h.reply(403, b'{"detail": "bad token"}')
        self.enroll_tokens.discard(data.token)
        self.enrolled_host = data.host
        h.reply(200, json.dumps({"node_id": 7, "credential": self.CREDENTIAL, "config": self.config}).encode())

    def _fail(self, h, seqs: list):
        """The scripted failure of a whole request (fail_status), if one is set."""
        if self.fail_status is None:
            return False
        for seq in seqs:
            self.posts.append((time.time(), seq, self.fail_status))
        status = self.fail_status
        if self.fail_times:
            self.fail_times -= 1
            if self.fail_times == 0:
                self.fail_status = None
        headers = {"Retry-After": self.retry_after} if self.retry_after else {}
        h.reply(status, b'{"detail": "try later"}', headers=headers)
        return True

    def _judge(self, doc) -> tuple[int, dict]:
        """One interval, as the portal judges it (telemetry.services.batches_accept): HTTP status and answer."""
        from pydantic import ValidationError

        from portal.telemetry.schemas import BatchIn

        seq = doc.get("seq") if isinstance(doc, dict) else None
        if seq in self.reject:
            status = self.reject[seq]
            self.posts.append((time.time(), seq, status))
            return status, {"seq": seq, "status": "conflict" if status == 409 else "rejected", "detail": "rejected"}
        try:
            BatchIn.model_validate(doc)
        except ValidationError as exc:
            self.posts.append((time.time(), seq, 422))
            return 422, {"seq": seq, "status": "rejected", "detail": str(exc)[:2000]}
        if seq in self.batches:
            if self.batches[seq] != doc:
                self.conflicts += 1
                self.posts.append((time.time(), seq, 409))
                # as the portal answers (telemetry.api): the node's last seq, so the agent can continue after it
                return 409, {"seq": seq, "status": "conflict", "detail": "seq conflict", "last_seq": max(self.batches)}
            self.duplicates += 1
            result = "duplicate"
        else:
            self.batches[seq] = doc
            self.stored_order.append(seq)
            result = "stored"
        self.posts.append((time.time(), seq, 200))
        return 200, {"seq": seq, "status": result}

    def _authorized(self, h) -> bool:
        if h.headers.get("Authorization") == f"Bearer {self.CREDENTIAL}":
            return True
        self.posts.append((time.time(), None, 401))
        h.reply(401, b'{"detail": "bad credential"}')
        return False

    def _document(self, h, raw: bytes):
        return json.loads(gzip.decompress(raw) if h.headers.get("Content-Encoding") == "gzip" else raw)

    def ingest(self, h, raw: bytes):
        """POST /agent/ingest: one interval a request."""
        with self.lock:
            if not self._authorized(h):
                return None
            doc = self._document(h, raw)
            self.requests.append([doc.get("seq")])
            if self._fail(h, [doc.get("seq")]):
                return None
            status, answer = self._judge(doc)
        if status != 200:
            body = {"detail": answer["detail"]} | ({"last_seq": answer["last_seq"]} if "last_seq" in answer else {})
            return h.reply(status, json.dumps(body).encode())
        h.reply(200, json.dumps({**answer, "config": self.config}).encode())

    def ingest_batches(self, h, raw: bytes):
        """POST /agent/batches: many intervals a request, each answered on its own; 413 over `max_intervals`."""
        with self.lock:
            if not self._authorized(h):
                return None
            batches = self._document(h, raw)["batches"]
            seqs = [b.get("seq") for b in batches]
            self.requests.append(seqs)
            if self._fail(h, seqs):
                return None
            if len(batches) > self.max_intervals or any(self.reject.get(s) == 413 for s in seqs):
                for seq in seqs:
                    self.posts.append((time.time(), seq, 413))
                return h.reply(413, b'{"detail": "body exceeds the limit"}')
            answers = [self._judge(doc)[1] for doc in batches]
        h.reply(200, json.dumps({"results": answers, "config": self.config}).encode())


class MetricsServer:
    """Serves Prometheus text produced by ``render()`` (called per scrape) plus an engine info endpoint."""

    def __init__(self, render: Callable[[], str], info: dict | None = None, info_path: str = "/version",
                 delay_s: float = 0.0, status: int = 200, pages: dict[str, dict] | None = None):
        self.render, self.info, self.info_path = render, info, info_path
        self.pages = dict(pages or {})  # more JSON answers by path (e.g. Triton's model configs)
        self.delay_s, self.status = delay_s, status
        self.scrapes = 0
        srv = self

        class Handler(_Quiet):
            def do_GET(self):
                if self.path == "/metrics":
                    srv.scrapes += 1
                    if srv.delay_s:
                        time.sleep(srv.delay_s)
                    if srv.status != 200:
                        return self.reply(srv.status, b"internal error", "text/plain")
                    return self.reply(200, srv.render().encode(), "text/plain; version=0.0.4")
                if self.path == srv.info_path and srv.info is not None:
                    return self.reply(200, json.dumps(srv.info).encode())
                if self.path in srv.pages:
                    return self.reply(200, json.dumps(srv.pages[self.path]).encode())
                return self.reply(404, b"{}")

        self.server = LoopServer(Handler).start()

    @property
    def url(self) -> str:
        return self.server.url + "/metrics"

    def stop(self) -> None:
        self.server.stop()


def agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_AGENT_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


PYTHON = sys.executable


def wait_for(pred: Callable[[], bool], timeout: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()
