"""Spool + sender against a loopback fake portal: retries, Retry-After, quarantine, bounded spool."""

from __future__ import annotations

import time

import pytest
from agentkit import FakePortal, validate, wait_for

from agents.sender import Sender, parse_retry_after
from agents.spool import Spool, decode


def make_batch(i=0, pad=0):
    return {"schema_version": 1, "seq": 0, "interval_start": 1000.0 + 10 * i, "interval_end": 1010.0 + 10 * i,
            "host": {"hostname": "n1", "os": "x" * 0}, "gpus": [], "engines": [], "events": [
                {"ts": 1000.0, "kind": "xid", "code": 13, "detail": "p" * pad}] if pad else [],
            "dropped_batches": 0}


def sender_for(tmp_path, portal, **kw):
    """A sender that posts as soon as a batch is queued (send_period_s=0) unless told otherwise."""
    cred = tmp_path / "credential"
    cred.write_text(FakePortal.CREDENTIAL + "\n")
    return Sender(spool_path=tmp_path / "spool.sqlite3", portal_url=portal.url, credential_path=cred,
                  timeout_s=2.0, backoff_base_s=0.05, backoff_max_s=0.2, **{"send_period_s": 0.0, **kw})


def drain(sender, spool, limit=50):
    for _ in range(limit):
        if sender.step(spool) is None:
            return


def test_spool_assigns_monotonic_seq_and_state_in_one_transaction(tmp_path):
    spool = Spool(tmp_path / "spool.sqlite3")
    assert spool.append(make_batch(0), {"c|a": 5.0}) == 1
    assert spool.append(make_batch(1), {"c|a": 7.0, "ep|x": 1}) == 2
    spool.close()
    spool = Spool(tmp_path / "spool.sqlite3")  # reopen: persisted
    assert spool.load_state() == {"c|a": 7.0, "ep|x": 1}
    assert spool.append(make_batch(2)) == 3
    ((seq, body),) = spool.to_send(limit=5, max_bytes=1)  # the newest, even alone over the bound
    assert seq == 3 and decode(body)["seq"] == 3
    assert spool.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_503_then_down_then_back_delivers_everything_once_in_order(tmp_path, portal):
    spool = Spool(tmp_path / "spool.sqlite3")
    s = sender_for(tmp_path, portal)
    for i in range(3):
        spool.append(make_batch(i))
    portal.fail_status = 503
    waits = [s.step(spool) for _ in range(4)]
    assert all(0 < w <= 0.2 for w in waits)  # capped exponential backoff
    assert spool.stats()["spool_depth"] == 3 and "503" in spool.stats()["last_error"]
    portal.stop()  # connection refused
    assert 0 < s.step(spool) <= 0.2
    spool.append(make_batch(3))  # collection continues meanwhile
    portal.fail_status = None
    portal.server.start()
    drain(s, spool)
    assert portal.stored_order == [1, 2, 3, 4]
    assert portal.duplicates == 0
    st = spool.stats()
    assert st["spool_depth"] == 0 and st["last_send"] is not None
    for b in portal.batches.values():
        validate(b)


def test_422_goes_to_quarantine_and_is_not_retried(tmp_path, portal):
    spool = Spool(tmp_path / "spool.sqlite3")
    s = sender_for(tmp_path, portal)
    for i in range(3):
        spool.append(make_batch(i))
    portal.reject[2] = 422
    drain(s, spool)
    assert portal.stored_order == [1, 3]
    assert [p[1] for p in portal.posts].count(2) == 1
    st = spool.stats()
    assert st["quarantined"] == 1 and st["spool_depth"] == 0 and "quarantined" in st["last_error"]
    row = spool.db.execute("SELECT seq, status FROM quarantine").fetchone()
    assert row == (2, 422)


@pytest.mark.parametrize("status", [401, 403, 408, 400, 500, 502])
def test_what_is_not_about_the_batch_is_retried_never_quarantined(tmp_path, portal, status):
    # A credential rotated on the portal or a misconfigured proxy says nothing about the batch: keep it.
    spool = Spool(tmp_path / "spool.sqlite3")
    s = sender_for(tmp_path, portal)
    spool.append(make_batch(0))
    portal.fail_status, portal.fail_times = status, 3
    waits = [s.step(spool) for _ in range(3)]
    assert all(0 < w <= 0.2 for w in waits)
    st = spool.stats()
    assert st["quarantined"] == 0 and st["spool_depth"] == 1
    assert (st["credential_rejected_since"] is not None) == (status in (401, 403))
    drain(s, spool)
    assert portal.stored_order == [1] and spool.stats()["credential_rejected_since"] is None


def test_a_rotated_credential_is_read_again_on_every_try(tmp_path, portal):
    spool = Spool(tmp_path / "spool.sqlite3")
    s = sender_for(tmp_path, portal)
    (tmp_path / "credential").write_text("an-old-credential")
    spool.append(make_batch(0))
    assert 0 < s.step(spool) <= 0.2 and spool.stats()["credential_rejected_since"] is not None
    (tmp_path / "credential").write_text(FakePortal.CREDENTIAL)  # re-enrolled
    drain(s, spool)
    assert portal.stored_order == [1] and spool.stats()["quarantined"] == 0


def test_quarantined_batches_are_reported_and_can_be_sent_again_under_their_seq(tmp_path, portal):
    spool = Spool(tmp_path / "spool.sqlite3")
    s = sender_for(tmp_path, portal)
    batch = make_batch(0)
    batch["engines"] = [{"endpoint": "http://127.0.0.1:8000/metrics", "engine": "vllm", "model": "m", "up": True,
                         "prompt_tokens": 700, "generation_tokens": 300}]
    spool.append(batch)
    portal.reject[1] = 422
    drain(s, spool)
    st = spool.stats()
    assert (st["quarantined"], st["quarantined_tokens"]) == (1, 1000)
    spool.append(make_batch(1))  # every later batch says what the quarantine holds
    drain(s, spool)
    assert (portal.batches[2]["quarantined_batches"], portal.batches[2]["quarantined_tokens"]) == (1, 1000)
    del portal.reject[1]  # the cause fixed on the portal
    assert spool.requeue([1]) == [1]
    drain(s, spool)
    assert portal.stored_order == [2, 1] and portal.batches[1]["engines"][0]["prompt_tokens"] == 700
    assert spool.stats()["quarantined"] == 0 and spool.requeue() == []


def test_a_spool_behind_the_portal_holds_the_batch_that_met_it_and_renumbers_the_rest(tmp_path, portal):
    # The portal holds seqs 1-5 of this node; its spool was lost, so its new batches start at 1 again.
    for seq in range(1, 6):
        portal.batches[seq] = {"seq": seq, "other": "content"}
    spool = Spool(tmp_path / "spool.sqlite3")
    s = sender_for(tmp_path, portal)
    for i in range(3):
        spool.append(make_batch(i))
    drain(s, spool)
    # One request: 1-3 all meet the portal's seqs; 1 is held, 2 and 3 renumbered after the portal's last.
    assert [(seq, status) for _t, seq, status in portal.posts] == [(1, 409), (2, 409), (3, 409), (6, 200), (7, 200)]
    assert [portal.batches[seq]["interval_start"] for seq in (6, 7)] == [1010.0, 1020.0]
    held = spool.db.execute("SELECT seq, status FROM quarantine").fetchall()
    assert held == [(1, 409)] and spool.next_seq() == 8  # new batches follow the portal's numbering
    spool.append(make_batch(3))
    assert spool.requeue() == [1]  # an operator judged it: it goes under the next seq, not its own
    drain(s, spool)
    assert portal.stored_order == [6, 7, 8, 9] and portal.batches[9]["interval_start"] == 1000.0
    assert portal.conflicts == 3 and spool.stats()["quarantined"] == 0


def test_429_with_retry_after_is_retried_after_waiting(tmp_path, portal):
    spool = Spool(tmp_path / "spool.sqlite3")
    spool.append(make_batch(0))
    portal.fail_status, portal.fail_times, portal.retry_after = 429, 1, "0.4"
    s = sender_for(tmp_path, portal)
    assert s.step(spool) == 0.4  # Retry-After honoured over the backoff
    portal.posts.clear()
    portal.fail_status, portal.fail_times = 429, 1
    s.start()
    try:
        assert wait_for(lambda: portal.stored_order == [1], 5)
    finally:
        s.stop()
        s.join(2)
    (t1, _, st1), (t2, _, st2) = portal.posts[:2]
    assert (st1, st2) == (429, 200) and t2 - t1 >= 0.35


def test_retry_after_http_date():
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None


def test_no_credential_keeps_batches(tmp_path, portal):
    spool = Spool(tmp_path / "spool.sqlite3")
    spool.append(make_batch(0))
    s = sender_for(tmp_path, portal)
    (tmp_path / "credential").unlink()
    assert s.step(spool) > 0
    assert spool.stats()["spool_depth"] == 1 and "not enrolled" in spool.stats()["last_error"]


def test_bounded_spool_drops_oldest_and_reports_it(tmp_path, portal):
    import os

    spool = Spool(tmp_path / "spool.sqlite3", max_bytes=64 * 1024)
    big = {"schema_version": 1, "interval_start": 1.0, "interval_end": 2.0, "host": {"hostname": "n"},
           "events": [{"ts": 1.0, "kind": "xid", "code": 13, "detail": os.urandom(150).hex()} for _ in range(60)]}
    seqs = [spool.append(dict(big)) for _ in range(8)]
    st = spool.stats()
    assert st["spool_bytes"] <= 64 * 1024 and st["dropped_total"] > 0
    dropped = st["dropped_total"]
    assert st["spool_depth"] == 8 - dropped
    seq = spool.append(make_batch(0))  # the next batch reports what was dropped
    rows = dict(spool.db.execute("SELECT seq, dropped FROM batches").fetchall())
    assert rows[seq] > 0  # carries the count of batches dropped before it
    assert seqs == list(range(1, 9))
    s = sender_for(tmp_path, portal)
    drain(s, spool)
    reported = sum(b["dropped_batches"] for b in portal.batches.values())
    st = spool.stats()
    assert reported + st["dropped_unreported"] == st["dropped_total"]  # every drop reported exactly once


def test_config_in_reply_is_handed_over(tmp_path, portal):
    got = []
    spool = Spool(tmp_path / "spool.sqlite3")
    spool.append(make_batch(0))
    portal.config = {"config_version": 3, "interval_s": 5, "sample_s": 0.5,
                     "targets": [{"url": "http://127.0.0.1:9/metrics", "engine": "tgi", "model": None}]}
    s = sender_for(tmp_path, portal, on_config=got.append)
    drain(s, spool)
    assert got == [portal.config]
    time.sleep(0)
