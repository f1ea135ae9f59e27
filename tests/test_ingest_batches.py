"""POST /api/v1/agent/batches: several intervals of one node in one request, each judged on its own."""

import gzip
import json
import time

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portal.fleet.models import Gpu, Node
from portal.fleet.services import credential_authenticate, credential_revoke
from portal.telemetry.models import GpuSample, IngestedBatch, UsageSample
from portal.telemetry.schemas import MAX_INTERVALS_PER_POST
from portal.telemetry.store import batches_store
from tests.factories import batch_payload, engine_payload, gpu_payload, gpu_uuid, node_with_credential

pytestmark = pytest.mark.django_db

BATCHES = "/api/v1/agent/batches"


def post_batches(client, credential, batches, *, raw=None, store=True):
    body = raw if raw is not None else json.dumps({"schema_version": 1, "batches": batches}).encode()
    response = client.post(BATCHES, data=gzip.compress(body), content_type="application/json",
                           HTTP_CONTENT_ENCODING="gzip", HTTP_AUTHORIZATION=f"Bearer {credential}")
    if store and response.status_code == 200:
        batches_store()
    return response


def statuses(response) -> list[tuple]:
    return [(r["seq"], r["status"]) for r in response.json()["results"]]


class TestBatches:
    def setup_method(self):
        self.uuids = [gpu_uuid() for _ in range(2)]

    def _batch(self, seq, *, end=None, prompt=1000):
        gpus = [gpu_payload(uuid=u, index=i) for i, u in enumerate(self.uuids)]
        return batch_payload(seq=seq, end=end if end is not None else time.time() - 10 * (10 - seq),
                             gpus=gpus, engines=[engine_payload(prompt=prompt)])

    def test_it_stores_every_interval_of_a_post_and_answers_each_in_order(self, client):
        node, cred = node_with_credential()
        r = post_batches(client, cred, [self._batch(s) for s in (1, 2, 3)])
        assert r.status_code == 200, r.content
        assert statuses(r) == [(1, "stored"), (2, "stored"), (3, "stored")]
        assert r.json()["config"]["interval_s"] == 10
        assert sorted(IngestedBatch.objects.filter(node=node).values_list("seq", flat=True)) == [1, 2, 3]
        assert GpuSample.objects.count() == 6
        assert sum(UsageSample.objects.values_list("prompt_tokens", flat=True)) == 3000

    def test_a_duplicate_beside_a_new_interval_is_acknowledged_and_the_new_one_stored(self, client):
        _node, cred = node_with_credential()
        first = self._batch(1)
        assert statuses(post_batches(client, cred, [first])) == [(1, "stored")]
        r = post_batches(client, cred, [first, self._batch(2)])
        assert statuses(r) == [(1, "duplicate"), (2, "stored")]
        assert UsageSample.objects.count() == 2  # the resent interval is not counted twice

    def test_a_conflict_and_an_invalid_interval_refuse_only_themselves(self, client):
        _node, cred = node_with_credential()
        post_batches(client, cred, [self._batch(4)])
        invalid = self._batch(5)
        invalid["gpus"][0]["util_mean"] = 101
        stale = self._batch(6, end=time.time() - 40 * 86400)
        r = post_batches(client, cred, [self._batch(4, prompt=7), invalid, stale, self._batch(7), "nonsense"])
        assert r.status_code == 200
        results = r.json()["results"]
        assert statuses(r) == [(4, "conflict"), (5, "rejected"), (6, "rejected"), (7, "stored"),
                               (None, "rejected")]
        # the highest seq the portal holds, this post's included
        assert results[0]["last_seq"] == 7 and "seq 4" in results[0]["detail"]
        assert results[1]["detail"][0]["loc"] == ["body", "batches", 1, "gpus", 0, "util_mean"]
        assert results[2]["detail"][0]["loc"] == ["body", "batches", 2, "interval_start"]
        assert results[4]["detail"][0]["loc"] == ["body", "batches", 4]
        assert sorted(IngestedBatch.objects.values_list("seq", flat=True)) == [4, 7]
        assert sum(UsageSample.objects.values_list("prompt_tokens", flat=True)) == 2000

    def test_the_same_seq_twice_in_one_post_is_stored_once(self, client):
        _node, cred = node_with_credential()
        one = self._batch(3)
        other = self._batch(3, prompt=5)
        assert statuses(post_batches(client, cred, [one, one, other])) == [
            (3, "stored"), (3, "duplicate"), (3, "conflict")]
        assert UsageSample.objects.get().prompt_tokens == 1000

    def test_a_post_claims_new_gpus_and_refuses_only_the_interval_naming_another_nodes(self, client):
        node, cred = node_with_credential()
        _other, other_cred = node_with_credential(hostname="other")
        foreign = gpu_uuid()
        post_batches(client, other_cred, [batch_payload(seq=1, gpus=[gpu_payload(uuid=foreign)])])
        bad = self._batch(2)
        bad["gpus"].append(gpu_payload(uuid=foreign, index=5))
        r = post_batches(client, cred, [self._batch(1), bad, self._batch(3)])
        assert statuses(r) == [(1, "stored"), (2, "rejected"), (3, "stored")]
        assert r.json()["results"][1]["detail"][0]["loc"] == ["body", "batches", 1, "gpus", 2, "uuid"]
        assert set(Gpu.objects.filter(node=node).values_list("uuid", flat=True)) == set(self.uuids)

    @pytest.mark.parametrize(("body", "loc"), [
        (b"[1, 2]", ["body"]),
        (b'{"schema_version": 1, "batches": []}', ["body", "batches"]),
        (b'{"schema_version": true, "batches": [{}]}', ["body", "schema_version"]),
        (b'{"schema_version": 1, "batches": [{}], "extra": 1}', ["body", "extra"]),
        (b'{"schema_version": 1, "batches": [', ["body"]),
    ])
    def test_a_bad_envelope_is_refused_whole_naming_the_field(self, client, body, loc):
        _node, cred = node_with_credential()
        r = post_batches(client, cred, None, raw=body)
        assert r.status_code == 422, r.content
        assert r.json()["detail"][0]["loc"] == loc
        assert not IngestedBatch.objects.exists()

    def test_a_post_over_the_interval_bound_is_refused(self, client):
        _node, cred = node_with_credential()
        r = post_batches(client, cred, [{}] * (MAX_INTERVALS_PER_POST + 1))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "batches"]

    def test_a_bad_credential_stores_nothing(self, client):
        node_with_credential()
        assert post_batches(client, "tmn_000000000000_nope", [self._batch(1)]).status_code == 401
        assert not IngestedBatch.objects.exists()

    @pytest.mark.parametrize("intervals", [1, 3, 60])
    def test_it_accepts_a_post_in_a_fixed_number_of_queries(self, client, intervals):
        node, cred = node_with_credential()
        post_batches(client, cred, [self._batch(1)])
        Node.objects.filter(pk=node.pk).update(last_seen=timezone.now())
        now = time.time()
        batches = [self._batch(s, end=now - 10 * (intervals - i)) for i, s in enumerate(range(2, 2 + intervals))]
        with CaptureQueriesContext(connection) as ctx:
            r = post_batches(client, cred, batches, store=False)
        assert {s for _, s in statuses(r)} == {"stored"}
        # The credential, and one INSERT of every interval that also checks GPU ownership and the seqs.
        assert len(ctx.captured_queries) == 2, [q["sql"][:80] for q in ctx.captured_queries]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(st.tuples(st.integers(1, 6), st.booleans()), min_size=1, max_size=12))
def test_every_interval_is_stored_once_whatever_the_resends(client, plan):
    """Posts of seqs in any grouping and order, resent any number of times: the portal holds each seq once,
    with the tokens of the first content it took, and answers a resend of that content as a duplicate."""
    IngestedBatch.objects.all().delete()
    UsageSample.objects.all().delete()
    _node, cred = node_with_credential()
    uuid = gpu_uuid()
    now = time.time()
    first_tokens: dict[int, int] = {}
    for seq, split in plan:
        def make(s, prompt):
            return batch_payload(seq=s, end=now - 10 * (10 - s), gpus=[gpu_payload(uuid=uuid)],
                                 engines=[engine_payload(prompt=prompt)])
        group = [make(seq, 100 * seq)] + ([make(seq + 1, 100 * (seq + 1))] if split else [])
        for result, batch in zip(post_batches(client, cred, group).json()["results"], group, strict=True):
            expected = "duplicate" if batch["seq"] in first_tokens else "stored"
            assert result["status"] == expected
            first_tokens.setdefault(batch["seq"], batch["engines"][0]["prompt_tokens"])
    assert sorted(IngestedBatch.objects.values_list("seq", flat=True)) == sorted(first_tokens)
    assert sum(UsageSample.objects.values_list("prompt_tokens", flat=True)) == sum(first_tokens.values())


def test_the_store_worker_takes_the_newest_intervals_first(client):
    """After an outage the backlog arrives beside fresh intervals: the fresh ones reach the tiers first."""
    _node, cred = node_with_credential()
    uuid = gpu_uuid()
    now = time.time()
    backlog = [batch_payload(seq=s, end=now - 3600 + 10 * s, gpus=[gpu_payload(uuid=uuid)]) for s in range(1, 6)]
    post_batches(client, cred, backlog, store=False)
    post_batches(client, cred, [batch_payload(seq=6, end=now, gpus=[gpu_payload(uuid=uuid)])], store=False)
    assert batches_store(limit=1) == 1
    assert list(IngestedBatch.objects.filter(stored_at__isnull=False).values_list("seq", flat=True)) == [6]
    assert batches_store() == 5 and not IngestedBatch.objects.filter(stored_at__isnull=True).exists()


def test_the_credential_lookup_gives_the_node_as_the_orm_would_and_refuses_a_revoked_one():
    node, cred = node_with_credential(hostname="gpu-lookup")
    Node.objects.filter(pk=node.pk).update(last_seen=timezone.now(), interval_s=15)
    found = credential_authenticate(value=cred)
    assert found.node_id == node.pk and found.node.interval_s == 15
    assert found.node.last_seen.tzinfo is not None and found.node.last_seen <= timezone.now()
    assert found.node.hostname == "gpu-lookup"  # a field the lookup did not read loads when read
    credential_revoke(node=node)
    assert credential_authenticate(value=cred) is None
    assert credential_authenticate(value=cred[:-1] + ("x" if cred[-1] != "x" else "y")) is None
