"""Multi-interval posts: many spooled intervals a request on one kept connection, each answered on its own."""

from __future__ import annotations

import time

from test_agent_sender import drain, make_batch, sender_for

from agents.spool import Spool, decode


def spooled(tmp_path, n: int) -> Spool:
    spool = Spool(tmp_path / "spool.sqlite3")
    for i in range(n):
        spool.append(make_batch(i))
    return spool


def test_the_queue_goes_out_in_one_request_each_interval_under_its_own_seq(tmp_path, portal):
    spool = spooled(tmp_path, 3)
    drain(sender_for(tmp_path, portal), spool)
    assert portal.requests == [[1, 2, 3]]
    assert portal.stored_order == [1, 2, 3]
    assert [portal.batches[s]["interval_start"] for s in (1, 2, 3)] == [1000.0, 1010.0, 1020.0]
    st = spool.stats()
    assert st["spool_depth"] == 0 and st["quarantined"] == 0


def test_a_duplicate_beside_a_new_interval_is_deleted_and_the_new_one_stored_once(tmp_path, portal):
    spool = spooled(tmp_path, 3)
    portal.batches[2] = decode(spool.to_send(limit=3, max_bytes=10**6)[1][1])  # acknowledged, reply lost
    portal.stored_order.append(2)
    drain(sender_for(tmp_path, portal), spool)
    assert [(seq, status) for _t, seq, status in portal.posts] == [(1, 200), (2, 200), (3, 200)]
    assert portal.duplicates == 1 and portal.stored_order == [2, 1, 3]
    assert spool.stats()["spool_depth"] == 0 and spool.stats()["quarantined"] == 0


def test_one_rejected_interval_is_quarantined_and_the_others_of_its_request_stored(tmp_path, portal):
    spool = spooled(tmp_path, 4)
    portal.reject[3] = 422
    drain(sender_for(tmp_path, portal), spool)
    assert portal.requests == [[1, 2, 3, 4]] and portal.stored_order == [1, 2, 4]
    assert spool.db.execute("SELECT seq, status FROM quarantine").fetchall() == [(3, 422)]
    assert spool.stats()["spool_depth"] == 0


def test_it_posts_every_send_period_and_at_once_when_a_full_request_waits(tmp_path, portal):
    spool = spooled(tmp_path, 1)
    sender = sender_for(tmp_path, portal, send_period_s=30.0, post_max_intervals=4)
    assert sender.step(spool) == 0.0 and portal.requests == [[1]]
    spool.append(make_batch(1))
    wait = sender.step(spool)
    assert 29.0 < wait <= 30.0 and portal.requests == [[1]]  # the next interval waits for the period
    for i in range(2, 5):
        spool.append(make_batch(i))
    assert sender.step(spool) == 0.0 and portal.requests == [[1], [2, 3, 4, 5]]  # four waiting: a full request
    assert sender.step(spool) is None


def test_posts_share_one_kept_connection(tmp_path, portal):
    spool = Spool(tmp_path / "spool.sqlite3")
    sender = sender_for(tmp_path, portal)
    for i in range(3):
        spool.append(make_batch(i))
        assert sender.step(spool) == 0.0
    assert portal.requests == [[1], [2], [3]] and portal.server.connections == 1


def test_a_connection_closed_while_idle_is_replaced_without_a_backoff(tmp_path, portal):
    portal.drop_idle = True
    spool = Spool(tmp_path / "spool.sqlite3")
    sender = sender_for(tmp_path, portal)
    for i in range(3):
        spool.append(make_batch(i))
        assert sender.step(spool) == 0.0  # the stale connection fails, a fresh one carries the post
    assert portal.stored_order == [1, 2, 3] and portal.server.connections == 3
    assert spool.stats()["last_error"] is None


def test_a_request_over_the_portals_limit_is_sent_again_in_halves(tmp_path, portal):
    portal.max_intervals = 2
    spool = spooled(tmp_path, 5)
    drain(sender_for(tmp_path, portal), spool)
    assert portal.requests == [[1, 2, 3, 4, 5], [4, 5], [2, 3], [1]]
    assert portal.stored_order == [4, 5, 2, 3, 1] and spool.stats()["quarantined"] == 0


def test_an_interval_too_large_alone_is_quarantined(tmp_path, portal):
    spool = spooled(tmp_path, 2)
    portal.reject[1] = 413
    drain(sender_for(tmp_path, portal, post_max_intervals=1), spool)
    assert spool.db.execute("SELECT seq, status FROM quarantine").fetchall() == [(1, 413)]
    assert portal.stored_order == [2]


def test_a_portal_without_multi_interval_posts_gets_one_interval_a_request(tmp_path, portal):
    portal.batches_endpoint = False
    spool = spooled(tmp_path, 3)
    portal.reject[2] = 422
    drain(sender_for(tmp_path, portal), spool)
    assert portal.requests == [[3], [2], [1]] and portal.stored_order == [3, 1]
    assert spool.db.execute("SELECT seq, status FROM quarantine").fetchall() == [(2, 422)]


def test_a_404_from_a_proxy_in_front_of_the_one_interval_endpoint_is_retried(tmp_path, portal):
    portal.fail_status, portal.fail_times = 404, 3  # the first answers the batches endpoint: an older portal
    spool = spooled(tmp_path, 1)
    sender = sender_for(tmp_path, portal)
    waits = [sender.step(spool) for _ in range(3)]
    assert waits[0] == 0.0 and all(0 < w <= 0.2 for w in waits[1:])
    drain(sender, spool)
    assert portal.stored_order == [1] and spool.stats()["quarantined"] == 0


def test_a_six_hour_outage_drains_in_a_few_requests_with_every_interval_once(tmp_path, portal):
    """6 h of 10 s intervals (2,160) spooled while the portal was down; it comes back: an hour of intervals a
    request, back to back, newest first, nothing lost or repeated; an interval closed during the drain goes out
    in the next request, not after the backlog."""
    spool = Spool(tmp_path / "spool.sqlite3")
    for i in range(2160):
        spool.append(make_batch(i))
    portal.stop()
    sender = sender_for(tmp_path, portal, send_period_s=1.0, post_max_intervals=360)
    assert sender.step(spool) > 0  # down: backoff, everything kept
    portal.server.start()
    for _ in range(3):
        assert sender.step(spool) == 0.0
    assert portal.requests[0] == list(range(1801, 2161))  # each request in seq order
    spool.append(make_batch(2160))  # closed meanwhile
    while (wait := sender.step(spool)) == 0.0:
        pass
    assert [len(r) for r in portal.requests] == [360] * 6 and 2161 in portal.requests[3]
    assert 0 < wait <= 1.0  # what is left (the oldest interval) is no full request: it waits for the period
    time.sleep(wait)
    assert sender.step(spool) == 0.0 and portal.requests[-1] == [1]
    assert sorted(portal.stored_order) == list(range(1, 2162)) and portal.duplicates == 0
    assert [portal.batches[s]["interval_start"] for s in (1, 2161)] == [1000.0, 1000.0 + 10 * 2160]
    assert spool.stats()["spool_depth"] == 0
