"""Sender thread: posts spooled batches newest first, many in one request; deletes only what the portal holds.

The collector closes an interval every `interval_s`; the sender posts what the spool holds every `send_period_s`
(up to `post_max_intervals` batches and `post_max_bytes` of bodies a request), at once when a full request is
waiting, so a node back from an outage drains hours of backlog in a few requests, each also carrying what closed
since the last (newest first: Spool.to_send). The connection is kept open between posts. Each interval keeps its
own seq, and the portal answers each: stored or duplicate is deleted.

Only the answers that say *this batch* can never be stored move it to the quarantine table: a conflict (its seq
holds other content; the queue behind it is renumbered after the portal's last seq), 413 for a batch sent alone
(too large) and rejected (invalid). Everything else is about the path or the credential, not the batch, and is
retried with capped exponential backoff and full jitter (Retry-After honoured): network errors, 5xx, 429, 408,
and 401/403/404 (a credential rotated on the portal, a proxy misconfigured: the credential file is read again on
every try). A portal that predates multi-interval posts (404 on its batches endpoint) is sent one interval per
request. `tokenmill-agent requeue` sends quarantined batches again: under their own seq, a 409 one under the next.
"""

from __future__ import annotations

import email.utils
import gzip
import http.client
import json
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agents.spool import SEQ_CONFLICT, Spool

log = logging.getLogger(__name__)

RETRY_AFTER_MAX_S = 600.0
TOO_LARGE, INVALID = 413, 422
QUARANTINE = frozenset({SEQ_CONFLICT, TOO_LARGE, INVALID})
CREDENTIAL_REJECTED = frozenset({401, 403})
BATCHES_PATH, INGEST_PATH = "/api/v1/agent/batches", "/api/v1/agent/ingest"
REPLY_MAX_BYTES = 4 * 1024 * 1024


def _last_seq(reply: Any) -> int | None:
    """The portal's last seq for this node, from a conflict's answer (None when it does not say)."""
    value = reply.get("last_seq") if isinstance(reply, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def read_credential(path: Path) -> str | None:
    try:
        value = path.read_text().strip()
    except OSError:
        return None
    return value or None


def _json(payload: bytes) -> Any:
    try:
        return json.loads(payload) if payload else None
    except ValueError:
        return None


@dataclass(frozen=True)
class _Reply:
    status: int
    payload: bytes
    headers: Any


class _Retry(Exception):
    """The request failed for a reason that is not about its batches; wait `wait` seconds and send them again."""

    def __init__(self, wait: float) -> None:
        super().__init__(wait)
        self.wait = wait


class Sender(threading.Thread):
    def __init__(self, *, spool_path: Path, portal_url: str, credential_path: Path, timeout_s: float = 10.0,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 60.0,
                 on_config: Callable[[dict[str, Any]], None] | None = None, max_bytes: int = 256 * 1024 * 1024,
                 send_period_s: float = 30.0, post_max_intervals: int = 360, post_max_bytes: int = 1024 * 1024):
        super().__init__(name="sender", daemon=True)
        self.spool_path, self.max_bytes = spool_path, max_bytes
        parts = urlsplit(portal_url.rstrip("/"))
        self._scheme, self._host, self._port, self._base = parts.scheme, parts.hostname, parts.port, parts.path
        self.credential_path = credential_path
        self.timeout_s = timeout_s
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.on_config = on_config
        self.send_period_s = send_period_s
        self.post_max_intervals, self.post_max_bytes = post_max_intervals, post_max_bytes
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self._failures = 0
        self._rng = random.Random()
        self._conn: http.client.HTTPConnection | None = None
        self._next_post = 0.0  # monotonic time of the next post unless a full request waits
        self._one_per_request = False  # the portal predates multi-interval posts

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()

    def run(self) -> None:
        spool = Spool(self.spool_path, self.max_bytes, synchronous="NORMAL")
        try:
            while not self.stop_event.is_set():
                delay = self.step(spool)
                if delay is None:
                    self.wake.wait(30.0)
                    self.wake.clear()
                elif delay > 0:
                    self.stop_event.wait(delay)
        except Exception:  # pragma: no cover - logged, the daemon keeps spooling
            log.exception("sender thread crashed")
        finally:
            self._close()
            spool.close()

    # ---------------------------------------------------------------- connection
    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _post(self, path: str, body: bytes, credential: str) -> _Reply:
        """POST on the kept connection. A connection the portal closed while idle fails on its next use; the
        request is then sent once more on a fresh one (safe: every interval is idempotent by seq)."""
        headers = {"Authorization": f"Bearer {credential}", "Content-Type": "application/json",
                   "Content-Encoding": "gzip", "User-Agent": "tokenmill-agent"}
        for attempt in (1, 2):
            reused = self._conn is not None
            if self._conn is None:
                cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
                extra = {"context": ssl.create_default_context()} if self._scheme == "https" else {}
                self._conn = cls(self._host, self._port, timeout=self.timeout_s, **extra)
            try:
                self._conn.request("POST", self._base + path, body=body, headers=headers)
                response = self._conn.getresponse()
                reply = _Reply(response.status, response.read(REPLY_MAX_BYTES), response.headers)
            except (OSError, http.client.HTTPException):
                self._close()
                if reused and attempt == 1:
                    continue
                raise
            if response.will_close:
                self._close()
            return reply
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------- outcomes
    def _backoff(self) -> float:
        self._failures += 1
        cap = min(self.backoff_max_s, self.backoff_base_s * 2 ** min(self._failures - 1, 30))
        return self._rng.uniform(cap / 2.0, cap)

    def _error(self, spool: Spool, message: str) -> None:
        log.warning("send: %s", message)
        spool.set_meta(last_error=message[:500], last_error_at=time.time())

    def _retry(self, spool: Spool, seqs: str, reply: _Reply) -> _Retry:
        wait = self._backoff()
        retry_after = parse_retry_after(reply.headers.get("Retry-After") if reply.headers else None)
        if retry_after is not None:
            wait = min(RETRY_AFTER_MAX_S, retry_after)
        detail = reply.payload[:200].decode("utf-8", "replace")
        if reply.status in CREDENTIAL_REJECTED:
            if not spool.meta("credential_rejected_since"):
                spool.set_meta(credential_rejected_since=time.time())
            log.error("seq %s: the portal rejects this node's credential (HTTP %d: %s); kept, retry in %.1fs "
                      "(re-enroll if it was revoked)", seqs, reply.status, detail, wait)
        self._error(spool, f"seq {seqs}: HTTP {reply.status}, retry in {wait:.1f}s")
        return _Retry(wait)

    def _quarantine(self, spool: Spool, seq: int, status: int, reason: str) -> None:
        log.error("seq %d rejected (%s); quarantined (tokenmill-agent requeue sends it again)", seq, reason)
        spool.quarantine(seq, status, reason)
        spool.set_meta(last_error=f"seq {seq} quarantined: {reason}"[:500], last_error_at=time.time())

    def _renumber(self, spool: Spool, last_seq: int) -> None:
        # The node's numbering fell behind the portal's (its spool was lost, or restored from a backup). The
        # batch that met it stays held: after a restore its deltas may repeat tokens the portal has, which only
        # an operator can judge. Every later batch starts from the state that one left, newer than anything the
        # portal holds: renumbered after the portal's last seq, each is stored once.
        moved = spool.renumber_queue(after=last_seq)
        log.error("the portal holds seqs up to %d: %d queued batches renumbered after it", last_seq, moved)

    def _outcomes(self, spool: Spool, seqs: list[int], answers: list[dict]) -> None:
        """Apply the portal's answer for each interval: delete what it holds, quarantine what it never can."""
        held, conflict = [], None
        for seq, answer in zip(seqs, answers, strict=True):
            status = answer.get("status")
            if status in ("stored", "duplicate"):
                held.append(seq)
            elif status == "conflict" and conflict is None:
                conflict = answer
                self._quarantine(spool, seq, SEQ_CONFLICT, f"HTTP 409: {json.dumps(answer)[:500]}")
            elif status == "rejected":
                self._quarantine(spool, seq, INVALID, f"HTTP 422: {json.dumps(answer)[:500]}")
            # A later conflict stays queued: the renumbering below gives it a seq the portal does not hold.
        if held:
            spool.delete(held, last_send=time.time(), last_send_seq=max(held), credential_rejected_since="")
        if conflict is not None and (last := _last_seq(conflict)) is not None:
            self._renumber(spool, last)

    def _apply_config(self, reply: Any) -> None:
        if isinstance(reply, dict) and isinstance(reply.get("config"), dict) and self.on_config is not None:
            try:
                self.on_config(reply["config"])
            except Exception:  # a bad config must not stop sending
                log.exception("cannot apply config from portal")

    # ---------------------------------------------------------------- one request
    def step(self, spool: Spool) -> float | None:
        """Post the next batches (Spool.to_send) when they are due. Returns seconds to wait before the next try
        (None: queue empty)."""
        limit = 1 if self._one_per_request else self.post_max_intervals
        items = spool.to_send(limit=limit, max_bytes=self.post_max_bytes)
        if not items:
            return None
        full = len(items) >= limit or sum(len(body) for _, body in items) >= self.post_max_bytes
        if not full and (wait := self._next_post - time.monotonic()) > 0:
            return wait
        credential = read_credential(self.credential_path)
        if credential is None:
            self._error(spool, f"not enrolled: no credential at {self.credential_path}")
            return min(30.0, self.backoff_max_s)
        try:
            if self._one_per_request:
                self._send_one(spool, items[0], credential)
            else:
                self._send_many(spool, items, credential)
        except _Retry as retry:
            return retry.wait
        self._failures = 0
        self._next_post = time.monotonic() + self.send_period_s
        return 0.0

    def _request(self, spool: Spool, path: str, body: bytes, credential: str, seqs: str) -> _Reply:
        try:
            return self._post(path, body, credential)
        except (OSError, http.client.HTTPException, ValueError) as exc:  # refused, reset, timeout
            wait = self._backoff()
            self._error(spool, f"seq {seqs}: {type(exc).__name__}: {exc}, retry in {wait:.1f}s")
            raise _Retry(wait) from None

    def _send_many(self, spool: Spool, items: list[tuple[int, bytes]], credential: str) -> None:
        seqs = [seq for seq, _ in items]
        span = f"{seqs[0]}-{seqs[-1]}" if len(seqs) > 1 else str(seqs[0])
        # Each body is one gzipped JSON object; the request is their array, compressed once.
        raw = b'{"schema_version":1,"batches":[' + b",".join(gzip.decompress(b) for _, b in items) + b"]}"
        reply = self._request(spool, BATCHES_PATH, gzip.compress(raw, compresslevel=6, mtime=0), credential, span)
        if reply.status == 404:
            log.warning("the portal has no %s (older than this agent): one interval per request", BATCHES_PATH)
            self._one_per_request = True
            raise _Retry(0.0)
        if reply.status == TOO_LARGE and len(items) > 1:
            self.post_max_intervals = max(1, len(items) // 2)  # the portal's body limit is below ours
            self._error(spool, f"seq {span}: HTTP 413, next requests carry at most {self.post_max_intervals}")
            raise _Retry(0.0)
        if reply.status == TOO_LARGE:
            self._quarantine(spool, seqs[0], TOO_LARGE, f"HTTP 413: {reply.payload[:500].decode('utf-8', 'replace')}")
            return
        document = _json(reply.payload)
        answers = document.get("results") if isinstance(document, dict) else None
        if not 200 <= reply.status < 300:
            raise self._retry(spool, span, reply)
        if not isinstance(answers, list) or len(answers) != len(items) or not all(isinstance(a, dict)
                                                                                  for a in answers):
            wait = self._backoff()
            self._error(spool, f"seq {span}: the portal's answer does not list each interval, retry in {wait:.1f}s")
            raise _Retry(wait)
        self._outcomes(spool, seqs, answers)
        self._apply_config(document)

    def _send_one(self, spool: Spool, item: tuple[int, bytes], credential: str) -> None:
        """The one-interval contract (POST /agent/ingest), for a portal that predates multi-interval posts."""
        seq, body = item
        reply = self._request(spool, INGEST_PATH, body, credential, str(seq))
        document = _json(reply.payload)
        detail = reply.payload[:500].decode("utf-8", "replace")
        if reply.status in QUARANTINE:
            if reply.status == SEQ_CONFLICT:
                self._outcomes(spool, [seq], [{**(document if isinstance(document, dict) else {}),
                                               "status": "conflict"}])
            else:
                self._quarantine(spool, seq, reply.status, f"HTTP {reply.status}: {detail}")
            return
        if not 200 <= reply.status < 300:
            raise self._retry(spool, str(seq), reply)
        self._outcomes(spool, [seq], [{"status": "stored"}])
        self._apply_config(document)
