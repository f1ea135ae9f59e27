"""On-disk spool (SQLite, WAL): batches waiting to be sent, quarantined batches, counters and delta state.

Every batch gets the node's next ``seq`` in the same transaction that stores it and the last-seen counter values
its deltas were computed from, so after a crash the spool and the delta state always agree.
"""

from __future__ import annotations

import gzip
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY, created REAL NOT NULL, size INTEGER NOT NULL, dropped INTEGER NOT NULL, body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    seq INTEGER PRIMARY KEY, created REAL NOT NULL, quarantined REAL NOT NULL, status INTEGER, reason TEXT,
    body BLOB NOT NULL, tokens INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS state (k TEXT PRIMARY KEY, v TEXT NOT NULL);
"""


SEQ_CONFLICT = 409  # the portal's answer when it holds other content under a batch's seq


def encode(batch: dict[str, Any]) -> bytes:
    raw = json.dumps(batch, separators=(",", ":"), allow_nan=False).encode()
    return gzip.compress(raw, compresslevel=6, mtime=0)


def decode(body: bytes) -> dict[str, Any]:
    return json.loads(gzip.decompress(body))


def batch_tokens(batch: dict[str, Any]) -> int:
    """Input + output tokens a batch carries: what a quarantined batch keeps from the invoice."""
    return sum(int(e.get("prompt_tokens", 0)) + int(e.get("generation_tokens", 0)) for e in batch.get("engines", []))


class Spool:
    def __init__(self, path: Path, max_bytes: int = 256 * 1024 * 1024, *, readonly: bool = False,
                 synchronous: str = "FULL"):
        """``synchronous``: FULL for the collector (a spooled batch survives power loss); the sender uses NORMAL,
        since losing a deletion only means a resend that the portal deduplicates by seq."""
        self.path = Path(path)
        self.max_bytes = max_bytes
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10, isolation_level=None)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={'NORMAL' if synchronous == 'NORMAL' else 'FULL'}")
            self.db.executescript(SCHEMA)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(quarantine)")}
            if "tokens" not in columns:  # a spool written by an agent before 0.2
                self.db.execute("ALTER TABLE quarantine ADD COLUMN tokens INTEGER NOT NULL DEFAULT 0")
        self.db.execute("PRAGMA busy_timeout=30000")

    def close(self) -> None:
        self.db.close()

    # ---------------------------------------------------------------- meta
    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, **values: Any) -> None:
        with self._tx():
            self._set_meta(**values)

    def _set_meta(self, **values: Any) -> None:
        rows = [(k, str(v)) for k, v in values.items()]
        self.db.executemany("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", rows)

    def _tx(self):
        db = self.db

        class _Tx:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, exc, tb):
                db.execute("ROLLBACK" if exc_type else "COMMIT")
                return False

        return _Tx()

    # ---------------------------------------------------------------- state
    def load_state(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT k, v FROM state")}

    def next_seq(self) -> int:
        return int(self.meta("next_seq", "1") or 1)

    # ---------------------------------------------------------------- batches
    def append(self, batch: dict[str, Any], state_updates: dict[str, Any] | None = None,
               meta: dict[str, Any] | None = None) -> int:
        """Assign seq, store the batch and the state its deltas came from, enforce the size bound: one transaction.
        The batch reports the drops not yet reported and what the quarantine holds."""
        with self._tx():
            seq = int(self.meta("next_seq", "1") or 1)
            unreported = int(self.meta("dropped_unreported", "0") or 0)
            held, tokens = self.db.execute("SELECT COUNT(*), COALESCE(SUM(tokens), 0) FROM quarantine").fetchone()
            batch = dict(batch, seq=seq, dropped_batches=unreported, quarantined_batches=int(held),
                         quarantined_tokens=int(tokens))
            body = encode(batch)
            self.db.execute("INSERT INTO batches (seq, created, size, dropped, body) VALUES (?, ?, ?, ?, ?)",
                            (seq, time.time(), len(body), unreported, body))
            self._set_meta(next_seq=seq + 1, dropped_unreported=0, **(meta or {}))
            if state_updates:
                self.db.executemany("INSERT OR REPLACE INTO state (k, v) VALUES (?, ?)",
                                    [(k, json.dumps(v, separators=(",", ":"))) for k, v in state_updates.items()])
            self._enforce_bound(seq)
        return seq

    def _enforce_bound(self, newest: int) -> None:
        total = self.db.execute("SELECT COALESCE(SUM(size), 0) FROM batches").fetchone()[0]
        if total <= self.max_bytes:
            return
        dropped = 0
        carried = 0
        for seq, size, was_reporting in self.db.execute(
            "SELECT seq, size, dropped FROM batches WHERE seq < ? ORDER BY seq", (newest,)
        ).fetchall():
            if total <= self.max_bytes:
                break
            self.db.execute("DELETE FROM batches WHERE seq=?", (seq,))
            total -= size
            dropped += 1
            carried += was_reporting  # drops that batch was going to report are reported by the next one instead
        if dropped:
            unreported = int(self.meta("dropped_unreported", "0") or 0) + dropped + carried
            self._set_meta(dropped_unreported=unreported,
                           dropped_total=int(self.meta("dropped_total", "0") or 0) + dropped,
                           last_drop=time.time())

    def to_send(self, *, limit: int, max_bytes: int) -> list[tuple[int, bytes]]:
        """The next batches to post, in seq order: the newest queued, at most `limit` and no more than `max_bytes`
        of bodies together (the newest always, even alone over the bound). Newest first, so that after an outage
        every request carries the intervals closed since the last one and the backlog drains behind them."""
        items: list[tuple[int, bytes]] = []
        total = 0
        rows = self.db.execute("SELECT seq, size, body FROM batches ORDER BY seq DESC LIMIT ?", (limit,))
        for seq, size, body in rows:
            if items and total + size > max_bytes:
                break
            items.append((int(seq), bytes(body)))
            total += size
        return items[::-1]

    def delete(self, seqs: list[int], **meta: Any) -> None:
        with self._tx():
            self.db.executemany("DELETE FROM batches WHERE seq=?", [(seq,) for seq in seqs])
            if meta:
                self._set_meta(**meta)

    def quarantine(self, seq: int, status: int | None, reason: str) -> None:
        with self._tx():
            row = self.db.execute("SELECT created, body FROM batches WHERE seq=?", (seq,)).fetchone()
            if row is None:
                return
            self.db.execute(
                "INSERT OR REPLACE INTO quarantine (seq, created, quarantined, status, reason, body, tokens) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (seq, row[0], time.time(), status, reason[:2000], row[1], batch_tokens(decode(bytes(row[1])))))
            self.db.execute("DELETE FROM batches WHERE seq=?", (seq,))

    def renumber_queue(self, *, after: int) -> int:
        """Give every queued batch a new seq after `after` (the portal's last), oldest first, and number new
        batches from there: the answer to a 409, where the portal already holds other content under this node's
        seqs (its spool was lost or restored). Returns the batches renumbered."""
        with self._tx():
            rows = self.db.execute("SELECT seq, created, dropped, body FROM batches ORDER BY seq").fetchall()
            self.db.execute("DELETE FROM batches")
            seq = after
            for _old, created, dropped, body in rows:
                seq += 1
                body = encode(dict(decode(bytes(body)), seq=seq))
                self.db.execute("INSERT INTO batches (seq, created, size, dropped, body) VALUES (?, ?, ?, ?, ?)",
                                (seq, created, len(body), dropped, body))
            self._set_meta(next_seq=max(seq + 1, self.next_seq()))
        return len(rows)

    def requeue(self, seqs: list[int] | None = None) -> list[int]:
        """Move quarantined batches (all, or these seqs) back to the queue under their own seq, so the portal
        stores each once whenever it takes them; one refused with 409 (the portal holds other content under its
        seq) under the node's next seq instead. Returns the seqs moved (as they were)."""
        with self._tx():
            if seqs is None:
                rows = self.db.execute("SELECT seq, created, body, status FROM quarantine ORDER BY seq").fetchall()
            else:
                marks = ", ".join("?" * len(seqs))
                rows = self.db.execute(f"SELECT seq, created, body, status FROM quarantine "  # noqa: S608
                                       f"WHERE seq IN ({marks}) ORDER BY seq", list(seqs)).fetchall()
            for seq, created, body, status in rows:
                new_seq = seq
                if status == SEQ_CONFLICT:
                    new_seq = self.next_seq()
                    body = encode(dict(decode(bytes(body)), seq=new_seq))
                    self._set_meta(next_seq=new_seq + 1)
                self.db.execute("INSERT OR REPLACE INTO batches (seq, created, size, dropped, body) "
                                "VALUES (?, ?, ?, 0, ?)", (new_seq, created, len(body), body))
                self.db.execute("DELETE FROM quarantine WHERE seq=?", (seq,))
        return [int(row[0]) for row in rows]

    def stats(self) -> dict[str, Any]:
        depth, size, oldest = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(created) FROM batches").fetchone()
        quarantined, held_tokens = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(tokens), 0) FROM quarantine").fetchone()
        meta = dict(self.db.execute("SELECT k, v FROM meta").fetchall())
        now = time.time()
        last_send = float(meta["last_send"]) if meta.get("last_send") else None
        return {
            "spool_depth": int(depth),
            "spool_bytes": int(size),
            "spool_oldest_age_s": round(now - oldest, 1) if oldest is not None else None,
            "quarantined": int(quarantined),
            "quarantined_tokens": int(held_tokens),
            "credential_rejected_since": float(meta["credential_rejected_since"])
            if meta.get("credential_rejected_since") else None,
            "unbillable_endpoints": json.loads(meta.get("unbillable") or "[]"),
            "dropped_total": int(meta.get("dropped_total", 0)),
            "dropped_unreported": int(meta.get("dropped_unreported", 0)),
            "next_seq": int(meta.get("next_seq", 1)),
            "last_send": last_send,
            "last_send_age_s": round(now - last_send, 1) if last_send else None,
            "last_error": meta.get("last_error") or None,
            "last_error_at": float(meta["last_error_at"]) if meta.get("last_error_at") else None,
        }
