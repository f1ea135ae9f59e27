import gzip
import io
import json
import threading
import time
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from portal.alerts.models import Alert
from portal.capacity.services import allocation_create
from portal.fleet.models import EnrollmentToken, Gpu, HealthEvent, MigInstance, Node, NodeCredential, NodeStatus
from portal.fleet.services import enrollment_token_create
from portal.telemetry.models import GpuMinute, GpuSample, IngestedBatch, UsageSample
from portal.telemetry.rollups import rollup_minutes
from portal.telemetry.store import batches_store
from tests.conftest import is_postgres
from tests.factories import (
    GpuFactory,
    SiteFactory,
    TenantFactory,
    batch_payload,
    engine_payload,
    gpu_payload,
    gpu_uuid,
    node_with_credential,
)

pytestmark = pytest.mark.django_db

INGEST = "/api/v1/agent/ingest"
ENROLL = "/api/v1/agent/enroll"


def post(client, body, credential=None, *, gzipped=False, raw=None, store=True):
    """POST to ingest (with a credential) or enroll; an accepted batch is then stored as the store worker would,
    unless store=False."""
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {}
    if gzipped:
        data = gzip.compress(data)
        headers["HTTP_CONTENT_ENCODING"] = "gzip"
    if credential:
        headers["HTTP_AUTHORIZATION"] = f"Bearer {credential}"
    response = client.post(INGEST if credential is not None else ENROLL, data=data, content_type="application/json",
                           **headers)
    if store and credential is not None and response.status_code == 200:
        batches_store()
    return response


def table_counts():
    return (IngestedBatch.objects.count(), GpuSample.objects.count(), UsageSample.objects.count(),
            Gpu.objects.count(), HealthEvent.objects.count())


class TestEnroll:
    def test_it_trades_a_token_for_a_credential_once(self, client):
        site = SiteFactory()
        _token, value = enrollment_token_create(site=site, created_by=None)
        host = {"hostname": "gpu-a1", "driver_version": "550.54.15", "simulated": True}
        r = post(client, {"token": value, "host": host})
        assert r.status_code == 200
        body = r.json()
        node = Node.objects.get(pk=body["node_id"])
        assert node.hostname == "gpu-a1" and node.site == site and node.simulated
        assert body["credential"].startswith("tmn_")
        assert body["config"] == {"config_version": 1, "interval_s": 10, "sample_s": 1.0, "targets": []}
        stored = NodeCredential.objects.get(node=node)
        assert body["credential"] not in stored.digest and len(stored.digest) == 64
        again = post(client, {"token": value, "host": host})
        assert again.status_code == 403
        assert again.json()["detail"] == "enrollment token was already used"

    def test_it_refuses_an_expired_token(self, client):
        site = SiteFactory()
        _token, value = enrollment_token_create(site=site, created_by=None, ttl=timedelta(seconds=-1))
        r = post(client, {"token": value, "host": {"hostname": "x"}})
        assert r.status_code == 403 and "expired" in r.json()["detail"]
        assert not Node.objects.exists()

    def test_it_reenrolls_a_hostname_and_revokes_the_old_credential(self, client):
        site = SiteFactory()
        node, old = node_with_credential(site=site, hostname="gpu-a1")
        _t, value = enrollment_token_create(site=site, created_by=None)
        r = post(client, {"token": value, "host": {"hostname": "gpu-a1"}})
        assert r.json()["node_id"] == node.pk
        assert post(client, batch_payload(seq=1), old).status_code == 401
        assert post(client, batch_payload(seq=1), r.json()["credential"]).status_code == 200

    def test_it_names_the_bad_field(self, client):
        r = post(client, {"token": "short", "host": {}})
        assert r.status_code == 422
        locs = [e["loc"] for e in r.json()["detail"]]
        assert ["body", "token"] in locs and ["body", "host", "hostname"] in locs
        assert not EnrollmentToken.objects.exists()


class TestIngest:
    def setup_method(self):
        self.uuids = [gpu_uuid() for _ in range(2)]

    def _batch(self, seq, **kw):
        gpus = [gpu_payload(uuid=u, index=i, util=30.0 + 60 * i) for i, u in enumerate(self.uuids)]
        return batch_payload(seq=seq, gpus=gpus, engines=[engine_payload()], **kw)

    def test_it_stores_a_batch_and_answers_with_config(self, client):
        node, cred = node_with_credential(status=NodeStatus.PENDING)
        r = post(client, self._batch(1), cred, gzipped=True)
        assert r.status_code == 200, r.content
        assert r.json()["status"] == "stored" and r.json()["seq"] == 1
        assert r.json()["config"]["interval_s"] == 10
        assert sorted(Gpu.objects.filter(node=node).values_list("current_util", flat=True)) == [30.0, 90.0]
        usage = UsageSample.objects.get()
        assert (usage.prompt_tokens, usage.generation_tokens) == (1000, 250)
        assert usage.ttft["counts"] == [1, 3, 4, 5, 5]
        node.refresh_from_db()
        assert node.status == NodeStatus.ONLINE and node.driver_version == "550.54.15"

    def test_it_stores_a_resent_batch_once(self, client):
        _node, cred = node_with_credential()
        body = self._batch(7)
        assert post(client, body, cred).json()["status"] == "stored"
        before = table_counts()
        r = post(client, body, cred, gzipped=True)
        assert r.status_code == 200 and r.json()["status"] == "duplicate"
        assert table_counts() == before

    def test_it_accepts_out_of_order_seq(self, client):
        _node, cred = node_with_credential()
        now = time.time()
        assert post(client, self._batch(5, end=now), cred).status_code == 200
        assert post(client, self._batch(3, end=now - 20), cred).status_code == 200
        assert sorted(IngestedBatch.objects.values_list("seq", flat=True)) == [3, 5]

    def test_it_answers_409_for_same_seq_different_content(self, client):
        _node, cred = node_with_credential()
        assert post(client, self._batch(9), cred).status_code == 200
        assert post(client, self._batch(12), cred).status_code == 200
        before = table_counts()
        other = self._batch(9)
        other["engines"][0]["prompt_tokens"] = 999
        r = post(client, other, cred)
        assert r.status_code == 409
        # the node's last seq, so an agent whose numbering fell behind (a lost spool) continues after it
        assert "seq 9" in r.json()["detail"] and r.json()["last_seq"] == 12
        assert table_counts() == before

    def test_it_refuses_a_bad_credential(self, client):
        node_with_credential()
        assert post(client, self._batch(1), "tmn_000000000000_nope").status_code == 401
        assert post(client, self._batch(1), "garbage").status_code == 401
        assert table_counts() == (0, 0, 0, 0, 0)

    @pytest.mark.parametrize(
        ("mutate", "loc"),
        [
            (lambda b: b["gpus"][0].update(util_mean="high"), ["body", "gpus", 0, "util_mean"]),
            (lambda b: b["gpus"][0].update(util_mean=140), ["body", "gpus", 0, "util_mean"]),
            (lambda b: b["gpus"][1].update(power_mean_w=-5), ["body", "gpus", 1, "power_mean_w"]),
            (lambda b: b["engines"][0].update(prompt_tokens=-1), ["body", "engines", 0, "prompt_tokens"]),
            (lambda b: b["engines"][0].update(prompt_tokens=10**15), ["body", "engines", 0, "prompt_tokens"]),
            (lambda b: b["gpus"][0].update(uuid="not-a-uuid"), ["body", "gpus", 0, "uuid"]),
            (lambda b: b.update(schema_version=2), ["body", "schema_version"]),
            (lambda b: b.update(seq=0), ["body", "seq"]),
            (lambda b: b.update(surprise=1), ["body", "surprise"]),
            (lambda b: b["gpus"].append(dict(b["gpus"][0])), ["body"]),
            (lambda b: b.update(interval_end=b["interval_start"] + 86400 * 400,
                                interval_start=b["interval_start"] + 86400 * 400 - 10), ["body", "interval_start"]),
            (lambda b: b.update(interval_end=b["interval_end"] - 86400 * 60,
                                interval_start=b["interval_start"] - 86400 * 60), ["body", "interval_start"]),
        ],
    )
    def test_it_rejects_bad_input_naming_the_field(self, client, mutate, loc):
        _node, cred = node_with_credential()
        body = self._batch(1)
        mutate(body)
        r = post(client, body, cred)
        assert r.status_code == 422, r.content
        assert loc in [e["loc"] for e in r.json()["detail"]]
        assert table_counts() == (0, 0, 0, 0, 0)

    def test_it_rejects_nan_and_infinity(self, client):
        _node, cred = node_with_credential()
        raw = json.dumps(self._batch(1)).replace('"util_mean": 30.0', '"util_mean": NaN').encode()
        r = post(client, None, cred, raw=raw)
        assert r.status_code == 422
        assert ["body", "gpus", 0, "util_mean"] in [e["loc"] for e in r.json()["detail"]]
        raw = json.dumps(self._batch(1)).replace('"power_mean_w": 400.0', '"power_mean_w": Infinity', 1).encode()
        assert post(client, None, cred, raw=raw).status_code == 422
        assert table_counts() == (0, 0, 0, 0, 0)

    def test_it_rejects_a_gpu_of_another_node(self, client):
        _other, other_cred = node_with_credential()
        assert post(client, self._batch(1), other_cred).status_code == 200
        before = table_counts()
        _node, cred = node_with_credential()
        r = post(client, self._batch(1), cred)
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"] == ["body", "gpus", 0, "uuid"]
        assert r.json()["detail"][0]["msg"] == f"GPU {self.uuids[0]} belongs to another node"
        assert table_counts() == before

    def test_it_rejects_malformed_json_and_bad_gzip(self, client):
        _node, cred = node_with_credential()
        assert post(client, None, cred, raw=b"{not json").status_code == 422
        r = client.post(INGEST, data=b"not gzip", content_type="application/json", HTTP_CONTENT_ENCODING="gzip",
                        HTTP_AUTHORIZATION=f"Bearer {cred}")
        assert r.status_code == 400

    def test_it_refuses_a_body_over_the_limit(self, client, settings):
        settings.INGEST_MAX_BODY_BYTES = 2048
        _node, cred = node_with_credential()
        body = self._batch(1)
        body["events"] = [{"ts": time.time(), "kind": "xid", "code": 13, "detail": "x" * 400} for _ in range(10)]
        assert post(client, body, cred).status_code == 413
        bomb = gzip.compress(b" " * (64 * 2048))
        r = client.post(INGEST, data=bomb, content_type="application/json", HTTP_CONTENT_ENCODING="gzip",
                        HTTP_AUTHORIZATION=f"Bearer {cred}")
        assert r.status_code == 413
        assert table_counts() == (0, 0, 0, 0, 0)

    def test_it_rate_limits_a_node(self, client, settings):
        settings.INGEST_MAX_BATCHES_PER_MINUTE = 3
        _node, cred = node_with_credential()
        now = time.time()
        codes = [post(client, self._batch(s, end=now - s), cred).status_code for s in range(1, 6)]
        assert codes.count(429) >= 1 and codes[0] == 200
        r = post(client, self._batch(99, end=now), cred)
        assert r.status_code == 429 and 0 < int(r.headers["Retry-After"]) <= 60

    def test_it_stores_health_events_and_opens_alerts(self, client):
        node, cred = node_with_credential()
        body = self._batch(1)
        now = time.time()
        body["events"] = [
            {"ts": now - 2, "gpu_uuid": self.uuids[1], "kind": "xid", "code": 79, "detail": "fell off the bus"},
            {"ts": now - 1, "gpu_uuid": self.uuids[0], "kind": "xid", "code": 13, "detail": "app fault"},
            {"ts": now - 1, "gpu_uuid": self.uuids[0], "kind": "ecc_uncorrected", "detail": "1 new"},
        ]
        assert post(client, body, cred).status_code == 200
        events = HealthEvent.objects.filter(node=node).order_by("at", "kind")
        assert [(e.kind, e.code, e.gpu.uuid) for e in events] == [
            ("xid", 79, self.uuids[1]), ("ecc_uncorrected", None, self.uuids[0]), ("xid", 13, self.uuids[0])]
        titles = sorted(Alert.objects.values_list("title", flat=True))
        assert titles == [f"Uncorrected ECC error on {node.hostname}",
                          f"XID 79: GPU has fallen off the bus on {node.hostname}"]

    def test_it_tracks_mig_layout_changes(self, client):
        _node, cred = node_with_credential()
        body = self._batch(1)
        body["gpus"][0].update(mig_mode=True, mig_instances=[
            {"gi_id": 1, "profile": "3g.40gb", "memory_total_mib": 40192},
            {"gi_id": 2, "profile": "4g.40gb", "memory_total_mib": 40192}])
        assert post(client, body, cred).status_code == 200
        assert sorted(MigInstance.objects.values_list("profile", flat=True)) == ["3g.40gb", "4g.40gb"]
        body = self._batch(2)
        body["gpus"][0].update(mig_mode=True, mig_instances=[
            {"gi_id": 1, "profile": "7g.80gb", "memory_total_mib": 81559}])
        assert post(client, body, cred).status_code == 200
        assert list(MigInstance.objects.values_list("gi_id", "profile")) == [(1, "7g.80gb")]

    def test_a_held_mig_instance_keeps_its_row_when_the_agent_reports_it(self, client):
        # The allocation holds the row (PROTECT): a UUID learnt later updates it in place, and a reconfiguration
        # under an allocation keeps it rather than failing the batch.
        node, cred = node_with_credential()
        gpu = GpuFactory(node=node, uuid=self.uuids[0], index=0, name="H100", mig_mode=True)
        held = MigInstance.objects.create(gpu=gpu, gi_id=1, profile="3g.40gb")
        free = MigInstance.objects.create(gpu=gpu, gi_id=2, profile="4g.40gb")
        allocation_create(tenant=TenantFactory(), gpu=gpu, mig_instance=held,
                          starts_at=timezone.now() - timedelta(days=1))
        body = self._batch(1)
        body["gpus"][0].update(mig_mode=True, mig_instances=[
            {"gi_id": 1, "profile": "3g.40gb", "uuid": "MIG-aaaa", "memory_total_mib": 40192},
            {"gi_id": 2, "profile": "4g.40gb", "uuid": "MIG-bbbb", "memory_total_mib": 40192}])
        assert post(client, body, cred).status_code == 200
        assert list(MigInstance.objects.values_list("pk", "uuid")) == [(held.pk, "MIG-aaaa"), (free.pk, "MIG-bbbb")]
        body = self._batch(2)
        body["gpus"][0].update(mig_mode=True, mig_instances=[
            {"gi_id": 1, "profile": "7g.80gb", "uuid": "MIG-cccc", "memory_total_mib": 81559}])
        assert post(client, body, cred).status_code == 200
        assert IngestedBatch.objects.filter(stored_at__isnull=True).count() == 0
        assert list(MigInstance.objects.values_list("pk", "profile")) == [(held.pk, "3g.40gb")]
        assert GpuSample.objects.count() == 4

    def test_it_keeps_current_state_when_replaying_old_batches(self, client):
        _node, cred = node_with_credential()
        now = time.time()
        assert post(client, self._batch(10, end=now), cred).status_code == 200
        old = self._batch(2, end=now - 3600)
        old["gpus"][0]["util_mean"] = 1.0
        old["gpus"][0]["util_max"] = 1.0
        assert post(client, old, cred).status_code == 200
        assert Gpu.objects.get(uuid=self.uuids[0]).current_util == 30.0
        assert GpuSample.objects.filter(gpu__uuid=self.uuids[0]).count() == 2

    @pytest.mark.parametrize("gpus", [1, 8, 32])
    def test_it_accepts_a_batch_in_a_fixed_number_of_queries(self, client, gpus):
        node, cred = node_with_credential()
        uuids = [gpu_uuid() for _ in range(gpus)]

        def body(seq):
            return batch_payload(
                seq=seq, end=time.time(),
                gpus=[gpu_payload(uuid=u, index=i) for i, u in enumerate(uuids)],
                engines=[engine_payload(endpoint=f"http://127.0.0.1:{8000 + i}/metrics") for i in range(2)])

        assert post(client, body(1), cred).status_code == 200
        Node.objects.filter(pk=node.pk).update(last_seen=timezone.now())
        with CaptureQueriesContext(connection) as ctx:
            assert post(client, body(2), cred, store=False).status_code == 200
        # The credential, and one INSERT that also checks GPU ownership and the seq: the same for 1 or 32 GPUs.
        # The agent config comes from the cache.
        assert len(ctx.captured_queries) == 2, [q["sql"][:80] for q in ctx.captured_queries]


def accept(client, cred: str, uuids: list[str], *, seq: int = 1, end: float | None = None) -> None:
    """One batch of these GPUs and two endpoints, accepted but not stored."""
    engines = [engine_payload(endpoint=f"http://127.0.0.1:{8000 + i}/metrics") for i in range(2)]
    body = batch_payload(seq=seq, end=end, gpus=[gpu_payload(uuid=u, index=i) for i, u in enumerate(uuids)],
                         engines=engines)
    assert post(client, body, cred, store=False).status_code == 200


def accepted_fleet(client, nodes: int, *, gpus: int = 8, end: float | None = None) -> list[tuple[str, list[str]]]:
    """`nodes` nodes that each had a batch accepted (not stored); their credentials and GPU uuids."""
    fleet = []
    for n in range(nodes):
        _node, cred = node_with_credential(hostname=f"gpu-{n:03d}")
        uuids = [gpu_uuid() for _ in range(gpus)]
        accept(client, cred, uuids, end=end)
        fleet.append((cred, uuids))
    return fleet


class TestStore:
    def test_an_accepted_batch_reaches_the_tiers_when_stored(self, client):
        node, cred = node_with_credential(status=NodeStatus.PENDING)
        uuid = gpu_uuid()
        body = batch_payload(seq=1, gpus=[gpu_payload(uuid=uuid, util=42.0)], engines=[engine_payload()])
        r = post(client, body, cred, store=False)
        assert r.status_code == 200 and r.json()["status"] == "stored"
        batch = IngestedBatch.objects.get()
        assert batch.stored_at is None and json.loads(bytes(batch.payload))["seq"] == 1
        assert (GpuSample.objects.count(), UsageSample.objects.count()) == (0, 0)
        # The GPU is the node's from the accept on (ownership is decided there), its readings not yet stored.
        assert list(Gpu.objects.values_list("node", "uuid", "current_util")) == [(node.pk, uuid, None)]
        # A resend while it waits is a duplicate, a different body under its seq a conflict.
        assert post(client, body, cred, store=False).json()["status"] == "duplicate"
        assert post(client, {**body, "dropped_batches": 3}, cred, store=False).status_code == 409

        assert batches_store() == 1
        batch.refresh_from_db()
        assert batch.stored_at is not None and batch.payload is None
        assert GpuSample.objects.get().util_mean == 42.0 and Gpu.objects.get().current_util == 42.0
        assert UsageSample.objects.get().prompt_tokens == 1000
        node.refresh_from_db()
        assert node.status == NodeStatus.ONLINE
        assert batches_store() == 0

    @pytest.mark.parametrize("nodes", [1, 12])
    def test_it_stores_a_flush_in_a_fixed_number_of_queries(self, client, nodes):
        fleet = accepted_fleet(client, nodes)
        batches_store()  # the first batches record the nodes' host facts
        for cred, uuids in fleet:
            accept(client, cred, uuids, seq=2)
        with CaptureQueriesContext(connection) as ctx:
            assert batches_store() == nodes
        # take (locked), nodes, known GPUs, GPU current values, samples, endpoints, endpoint current values, usage,
        # mark stored, and the flush's savepoints: the same for 1 or 12 batches of 8 GPUs. On PostgreSQL each
        # "current values" is a temporary table, its COPY (not logged) and one UPDATE; the appends are COPYs.
        assert len(ctx.captured_queries) == (15 if is_postgres() else 13), [
            q["sql"][:80] for q in ctx.captured_queries]
        assert GpuSample.objects.count() == 16 * nodes and UsageSample.objects.count() == 4 * nodes
        assert IngestedBatch.objects.filter(stored_at__isnull=True).count() == 0

    def test_the_newest_reading_is_current_whatever_the_order_in_a_flush(self, client):
        _node, cred = node_with_credential()
        uuid = gpu_uuid()
        now = time.time()
        newer = batch_payload(seq=2, end=now, gpus=[gpu_payload(uuid=uuid, util=70.0)])
        older = batch_payload(seq=1, end=now - 10, gpus=[gpu_payload(uuid=uuid, util=20.0)])
        assert post(client, newer, cred, store=False).status_code == 200
        assert post(client, older, cred, store=False).status_code == 200
        assert batches_store() == 2
        assert Gpu.objects.get().current_util == 70.0
        assert sorted(GpuSample.objects.values_list("util_mean", flat=True)) == [20.0, 70.0]

    def test_a_batch_that_cannot_be_stored_is_set_aside_and_can_be_retried(self, client):
        fleet = accepted_fleet(client, 2)
        bad = IngestedBatch.objects.order_by("pk").first()
        original = bytes(bad.payload)
        # As if the schema had been tightened between accept and store.
        tightened = original.replace(b'"schema_version":1', b'"schema_version":9')
        IngestedBatch.objects.filter(pk=bad.pk).update(payload=tightened)
        assert batches_store() == 2
        bad.refresh_from_db()
        assert bad.stored_at is None and bad.store_error.startswith("ValidationError") and bad.payload is not None
        assert GpuSample.objects.filter(gpu__uuid__in=fleet[1][1]).count() == 8
        assert GpuSample.objects.filter(gpu__uuid__in=fleet[0][1]).count() == 0
        assert batches_store() == 0  # set aside: not taken again

        IngestedBatch.objects.filter(pk=bad.pk).update(payload=original)
        out = io.StringIO()
        call_command("store_batches", "--once", "--retry-failed", stdout=out)
        assert out.getvalue().splitlines() == ["1 batches queued again", "1 batches stored"]
        assert GpuSample.objects.filter(gpu__uuid__in=fleet[0][1]).count() == 8

    def test_a_rollup_folds_in_a_batch_stored_after_it_ran(self, client):
        # The watermark follows the store worker's clock, not the batches' arrival: a batch accepted before a rollup
        # and stored after it is rolled up by the next one.
        accepted_fleet(client, 1, gpus=1, end=time.time() - 120)
        rollup_minutes()
        assert not GpuMinute.objects.exists()
        batches_store()
        rollup_minutes(now=timezone.now() + timedelta(seconds=6))  # once the flush has settled
        assert GpuMinute.objects.get().util_mean == 50.0


@pytest.mark.django_db(transaction=True)
def test_concurrent_store_workers_store_each_batch_once(client):
    # PostgreSQL: each worker skips the rows another has locked (FOR UPDATE SKIP LOCKED); SQLite: the write
    # transactions queue (BEGIN IMMEDIATE) and each sees what the one before it stored.
    accepted_fleet(client, 30, gpus=2)
    errors = []

    def worker():
        try:
            while batches_store(limit=4):
                pass
        except Exception as exc:  # reported to the test thread below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert GpuSample.objects.count() == 60 and UsageSample.objects.count() == 60
    assert IngestedBatch.objects.filter(stored_at__isnull=True).count() == 0
