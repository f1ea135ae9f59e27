"""Shared helpers for the agent tests: fixture paths, contract validation, loopback portal and engine servers."""

from __future__ import annotations

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
            self.httpd = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


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
        self.config = {"config_version": 0, "interval_s": 10, "sample_s": 1.0, "targets": []}
        self.enroll_tokens = {"enroll-token-abc"}
        portal = self

        class Handler(_Quiet):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if self.path == "/api/v1/agent/enroll":
                    return portal.enroll(self, raw)
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

    def ingest(self, h, raw: bytes):
        from pydantic import ValidationError

        from portal.telemetry.schemas import BatchIn

        status: int
        seq = None
        with self.lock:
            if h.headers.get("Authorization") != f"Bearer {self.CREDENTIAL}":
                self.posts.append((time.time(), None, 401))
                return h.reply(401, b'{"detail": "bad credential"}')
            body = gzip.decompress(raw) if h.headers.get("Content-Encoding") == "gzip" else raw
            doc = json.loads(body)
            seq = doc.get("seq")
            if self.fail_status is not None:
                self.posts.append((time.time(), seq, self.fail_status))
                if self.fail_times:
                    self.fail_times -= 1
                    if self.fail_times == 0:
                        self.fail_status = None
                headers = {"Retry-After": self.retry_after} if self.retry_after else {}
                return h.reply(self.posts[-1][2], b'{"detail": "try later"}', headers=headers)
            if seq in self.reject:
                status = self.reject[seq]
                self.posts.append((time.time(), seq, status))
                return h.reply(status, b'{"detail": "rejected"}')
            try:
                BatchIn.model_validate(doc)
            except ValidationError as exc:
                self.posts.append((time.time(), seq, 422))
                return h.reply(422, json.dumps({"detail": str(exc)[:2000]}).encode())
            if seq in self.batches:
                if self.batches[seq] != doc:
                    self.conflicts += 1
                    self.posts.append((time.time(), seq, 409))
                    # as the portal answers (telemetry.api): the node's last seq, so the agent can continue after it
                    return h.reply(409, json.dumps({"detail": "seq conflict", "last_seq": max(self.batches)}).encode())
                self.duplicates += 1
                result = "duplicate"
            else:
                self.batches[seq] = doc
                self.stored_order.append(seq)
                result = "stored"
            self.posts.append((time.time(), seq, 200))
            reply = {"seq": seq, "status": result, "config": self.config}
        h.reply(200, json.dumps(reply).encode())


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
