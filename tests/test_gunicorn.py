"""The portal as it runs in production, under gunicorn with several worker processes: what only shows there."""

import http.client
import json
import time
from urllib.parse import urlsplit

import pytest

from agents.sender import Sender
from agents.spool import Spool
from portal.telemetry.models import IngestedBatch
from portal.telemetry.store import batches_store
from tests.factories import batch_payload, engine_payload, gpu_payload, gpu_uuid, node_with_credential
from tests.test_ingest import INGEST
from tests.worker import gunicorn_server

pytestmark = pytest.mark.django_db(transaction=True)


def _post(base: str, credential: str, body, headers: dict | None = None) -> tuple[int, dict]:
    """One request on a connection of its own (so successive requests may reach different workers)."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request("POST", INGEST, body=body, encode_chunked=not isinstance(body, bytes),
                     headers={"Authorization": f"Bearer {credential}", "Content-Type": "application/json",
                              **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def test_a_chunked_body_is_read_whole():
    node, credential = node_with_credential()
    body = json.dumps(batch_payload(seq=1, gpus=[gpu_payload(uuid=gpu_uuid())], engines=[engine_payload()])).encode()
    with gunicorn_server(workers=1) as (base, _access):
        # No Content-Length: Transfer-Encoding: chunked, in three chunks, as proxies and HTTP clients send it.
        status, reply = _post(base, credential, iter([body[:100], body[100:2000], body[2000:]]))
        assert (status, reply.get("status")) == (200, "stored"), reply
        too_big = iter([b" " * 1024 * 1024] * 3)  # 3 MiB, over the 2 MiB limit, never declared
        status, reply = _post(base, credential, too_big)
        assert status == 413 and "exceeds" in reply["detail"]
    batches_store()
    assert IngestedBatch.objects.get(node=node, seq=1).stored_at is not None


def test_the_rate_limit_counts_across_worker_processes():
    _node, credential = node_with_credential()
    if 60 - time.time() % 60 < 20:  # the limit is per clock minute: keep the whole test inside one
        time.sleep(60 - time.time() % 60)
    with gunicorn_server(workers=2, env={"INGEST_MAX_BATCHES_PER_MINUTE": "5"}) as (base, access):
        codes = []
        for seq in range(1, 121):
            status, _reply = _post(base, credential, json.dumps(batch_payload(seq=seq)).encode())
            codes.append(status)
            workers = {line.split()[0] for line in access.read_text().splitlines() if INGEST in line}
            if len(codes) >= 12 and len(workers) == 2:
                break
            # Back to back, the worker that just answered often wins the next accept too; a pause lets both
            # wait in accept, so the next request reaches either.
            time.sleep(0.05)
    assert len(workers) == 2, "every request reached the same worker; the test proves nothing"
    # Per-process counters would let each worker take five.
    assert codes.count(200) == 5 and codes[:5] == [200] * 5 and set(codes[5:]) == {429}


def test_an_agent_posts_on_one_kept_connection_to_threaded_workers(tmp_path):
    node, credential = node_with_credential()
    (tmp_path / "credential").write_text(credential)
    spool = Spool(tmp_path / "spool.sqlite3")
    uuid = gpu_uuid()
    with gunicorn_server(workers=1, options=("--threads", "2", "--keep-alive", "75")) as (base, _access):
        sender = Sender(spool_path=tmp_path / "spool.sqlite3", portal_url=base,
                        credential_path=tmp_path / "credential", send_period_s=0.0)
        sockets = []
        for seq in range(1, 4):
            spool.append(batch_payload(seq=seq, end=time.time() - 10 * (4 - seq), gpus=[gpu_payload(uuid=uuid)]))
            assert sender.step(spool) == 0.0, spool.stats()["last_error"]
            sockets.append(sender._conn.sock)
        assert sockets[0] is sockets[1] is sockets[2]  # one TCP connection carried the three posts
    assert sorted(IngestedBatch.objects.filter(node=node).values_list("seq", flat=True)) == [1, 2, 3]
    assert spool.stats()["spool_depth"] == 0
