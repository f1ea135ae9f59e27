"""Sender thread: posts spooled batches oldest first; deletes only after a 2xx.

Only the answers that say *this batch* can never be stored move it to the quarantine table: 409 (its seq holds
other content; the queue behind it is renumbered after the portal's last seq), 413 (too large) and 422 (invalid).
Everything else is about the path or the credential, not the batch, and is retried with capped exponential
backoff and full jitter (Retry-After honoured): network errors, 5xx, 429, 408, and 401/403/404 (a credential
rotated on the portal, a proxy misconfigured: the credential file is read again on every try).
`tokenmill-agent requeue` sends quarantined batches again: under their own seq, a 409 one under the next.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agents.spool import SEQ_CONFLICT, Spool

log = logging.getLogger(__name__)

RETRY_AFTER_MAX_S = 600.0
QUARANTINE = frozenset({SEQ_CONFLICT, 413, 422})
CREDENTIAL_REJECTED = frozenset({401, 403})


def _last_seq(detail: str) -> int | None:
    """The portal's last seq for this node, from a 409's body (None when it does not say)."""
    try:
        value = json.loads(detail).get("last_seq")
    except (ValueError, AttributeError):
        return None
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


class Sender(threading.Thread):
    def __init__(self, *, spool_path: Path, portal_url: str, credential_path: Path, timeout_s: float = 10.0,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 60.0,
                 on_config: Callable[[dict[str, Any]], None] | None = None, max_bytes: int = 256 * 1024 * 1024):
        super().__init__(name="sender", daemon=True)
        self.spool_path, self.max_bytes = spool_path, max_bytes
        self.url = portal_url.rstrip("/") + "/api/v1/agent/ingest"
        self.credential_path = credential_path
        self.timeout_s = timeout_s
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.on_config = on_config
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self._failures = 0
        self._rng = random.Random()

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
            spool.close()

    def _backoff(self) -> float:
        self._failures += 1
        cap = min(self.backoff_max_s, self.backoff_base_s * 2 ** min(self._failures - 1, 30))
        return self._rng.uniform(cap / 2.0, cap)

    def _error(self, spool: Spool, message: str) -> None:
        log.warning("send: %s", message)
        spool.set_meta(last_error=message[:500], last_error_at=time.time())

    def _retry(self, spool: Spool, seq: int, status: int, detail: str, headers) -> float:
        wait = self._backoff()
        retry_after = parse_retry_after(headers.get("Retry-After") if headers else None)
        if retry_after is not None:
            wait = min(RETRY_AFTER_MAX_S, retry_after)
        if status in CREDENTIAL_REJECTED:
            if not spool.meta("credential_rejected_since"):
                spool.set_meta(credential_rejected_since=time.time())
            log.error("seq %d: the portal rejects this node's credential (HTTP %d: %s); kept, retry in %.1fs "
                      "(re-enroll if it was revoked)", seq, status, detail[:200], wait)
        self._error(spool, f"seq {seq}: HTTP {status}, retry in {wait:.1f}s")
        return wait

    def step(self, spool: Spool) -> float | None:
        """Try to send the oldest batch. Returns seconds to wait before the next try (None: queue empty)."""
        item = spool.oldest()
        if item is None:
            return None
        seq, body = item
        credential = read_credential(self.credential_path)
        if credential is None:
            self._error(spool, f"not enrolled: no credential at {self.credential_path}")
            return min(30.0, self.backoff_max_s)
        req = urllib.request.Request(self.url, data=body, method="POST", headers={  # noqa: S310
            "Authorization": f"Bearer {credential}",
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "User-Agent": "tokenmill-agent",
        })
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310
                status, payload = resp.status, resp.read(1024 * 1024)
        except urllib.error.HTTPError as exc:
            status = exc.code
            detail = exc.read(2000).decode("utf-8", "replace") if exc.fp else ""
            if status not in QUARANTINE:
                return self._retry(spool, seq, status, detail, exc.headers)
            reason = f"HTTP {status}: {detail[:500]}"
            log.error("seq %d rejected (%s); quarantined (tokenmill-agent requeue sends it again)", seq, reason)
            spool.quarantine(seq, status, reason)
            last_seq = _last_seq(detail) if status == SEQ_CONFLICT else None
            if last_seq is not None:
                # The node's numbering fell behind the portal's (its spool was lost, or restored from a backup).
                # The batch that met it stays held: after a restore its deltas may repeat tokens the portal has,
                # which only an operator can judge. Every later batch starts from the state that one left, newer
                # than anything the portal holds: renumbered after the portal's last seq, each is stored once.
                moved = spool.renumber_queue(after=last_seq)
                log.error("the portal holds seqs up to %d: %d queued batches renumbered after it", last_seq, moved)
            spool.set_meta(last_error=f"seq {seq} quarantined: {reason}"[:500], last_error_at=time.time())
            self._failures = 0
            return 0.0
        except (OSError, ValueError) as exc:  # URLError, refused, reset, timeout
            wait = self._backoff()
            self._error(spool, f"seq {seq}: {type(exc).__name__}: {getattr(exc, 'reason', exc)}, retry in {wait:.1f}s")
            return wait
        if not 200 <= status < 300:
            wait = self._backoff()
            self._error(spool, f"seq {seq}: unexpected HTTP {status}, retry in {wait:.1f}s")
            return wait
        spool.delete(seq, last_send=time.time(), last_send_seq=seq, credential_rejected_since="")
        self._failures = 0
        try:
            reply = json.loads(payload) if payload else {}
        except ValueError:
            reply = {}
        if isinstance(reply, dict) and isinstance(reply.get("config"), dict) and self.on_config is not None:
            try:
                self.on_config(reply["config"])
            except Exception:  # a bad config must not stop sending
                log.exception("cannot apply config from portal")
        return 0.0
