"""Inputs no agent of ours sends, that the pipeline must still survive: numbers beyond a column, loose types, a
body cut short, a batch the database refuses, two nodes claiming one new GPU at once."""

import gzip
import json
import threading
import time

import pytest
from django.db import connection
from django.test import Client
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from portal.alerts.models import Alert
from portal.fleet.models import Gpu
from portal.fleet.services import credential_authenticate
from portal.telemetry.models import GpuSample, IngestedBatch, UsageSample
from portal.telemetry.schemas import BatchIn
from portal.telemetry.services import batch_accept
from portal.telemetry.store import batches_store
from tests.batches import batches, extreme_batch
from tests.conftest import is_postgres
from tests.factories import (
    PASSWORD,
    OperatorFactory,
    batch_payload,
    engine_payload,
    gpu_payload,
    gpu_uuid,
    node_with_credential,
)
from tests.test_ingest import INGEST, post, table_counts

pytestmark = pytest.mark.django_db


def detail_locs(response) -> list[list]:
    return [e["loc"] for e in response.json()["detail"]]


class TestContract:
    @pytest.mark.parametrize(("mutate", "loc"), [
        # Each value once passed validation and failed later, in the request (500) or in the store worker.
        (lambda b: b["gpus"][0].update(ecc_uncorrected_total=2**63), ["body", "gpus", 0, "ecc_uncorrected_total"]),
        (lambda b: b["gpus"][0].update(ecc_corrected_total=2**64), ["body", "gpus", 0, "ecc_corrected_total"]),
        (lambda b: b.update(dropped_batches=2**31), ["body", "dropped_batches"]),
        (lambda b: b["engines"][0]["ttft"].update(sum=1e300), ["body", "engines", 0, "ttft", "sum"]),
        (lambda b: b["engines"][0]["ttft"].update(le=[0.1, 0.25, 0.5, 1e300]), ["body", "engines", 0, "ttft", "le", 3]),
        (lambda b: b["gpus"][0].update(mig_mode=True, mig_instances=[{"gi_id": 1, "profile": "99g.10gb"}]),
         ["body", "gpus", 0, "mig_instances", 0, "profile"]),
        (lambda b: b.update(interval_start=-1e18), ["body", "interval_start"]),
        (lambda b: b["events"].append({"ts": 1e300, "kind": "xid", "code": 79}), ["body", "events", 0, "ts"]),
        # Strict types: a bool is not an integer, a numeric string is not a number.
        (lambda b: b.update(seq=True), ["body", "seq"]),
        (lambda b: b.update(seq="1028"), ["body", "seq"]),
        (lambda b: b.update(seq=1028.0), ["body", "seq"]),
        (lambda b: b.update(schema_version=True), ["body", "schema_version"]),
        (lambda b: b["engines"][0].update(prompt_tokens="1000"), ["body", "engines", 0, "prompt_tokens"]),
        (lambda b: b["engines"][0].update(up=1), ["body", "engines", 0, "up"]),
        # PostgreSQL text cannot hold NUL.
        (lambda b: b["host"].update(os="Ubuntu\u0000"), ["body", "host", "os"]),
        (lambda b: b["engines"][0].update(settings={"kv\u0000": "fp8"}), ["body", "engines", 0, "settings", "kv\u0000",
                                                                          "[key]"]),
    ])
    def test_it_refuses_what_a_column_cannot_hold_and_loose_types_naming_the_field(self, client, mutate, loc):
        _node, cred = node_with_credential()
        body = batch_payload(seq=1, gpus=[gpu_payload(uuid=gpu_uuid())], engines=[engine_payload()])
        mutate(body)
        response = post(client, body, cred)
        assert response.status_code == 422, response.content
        assert loc in detail_locs(response)
        assert table_counts() == (0, 0, 0, 0, 0)

    def test_a_uuid_in_another_case_is_the_same_gpu(self, client):
        node, cred = node_with_credential()
        lower = "GPU-6a5d4f0e-1234-5678-9abc-def012345678"
        assert post(client, batch_payload(seq=1, gpus=[gpu_payload(uuid=lower.upper().replace("GPU-", "gpu-"))]),
                    cred).status_code == 200
        assert post(client, batch_payload(seq=2, gpus=[gpu_payload(uuid=lower)]), cred).status_code == 200
        assert list(Gpu.objects.values_list("node", "uuid")) == [(node.pk, lower)]
        assert GpuSample.objects.filter(gpu__uuid=lower).count() == 2
        _other, other_cred = node_with_credential()
        response = post(client, batch_payload(seq=1, gpus=[gpu_payload(uuid=lower.upper())]), other_cred)
        assert response.status_code == 422 and detail_locs(response) == [["body", "gpus", 0, "uuid"]]

    @pytest.mark.parametrize(("body", "message"), [
        (gzip.compress(json.dumps(batch_payload(seq=1)).encode())[:-8], "truncated"),
        (gzip.compress(json.dumps(batch_payload(seq=1)).encode())[:-3], "truncated"),
        (gzip.compress(json.dumps(batch_payload(seq=1)).encode()) + b"extra", "after its end"),
    ])
    def test_it_checks_a_gzip_body_to_its_end(self, client, body, message):
        _node, cred = node_with_credential()
        response = client.post(INGEST, data=body, content_type="application/json", HTTP_CONTENT_ENCODING="gzip",
                               HTTP_AUTHORIZATION=f"Bearer {cred}")
        assert response.status_code == 400 and message in response.json()["detail"]
        assert table_counts() == (0, 0, 0, 0, 0)


# A real refusal by the database, not a mock: a trigger that fails the insert of one GPU's samples.
POISON_UTIL = 13.125


def _poison(on: bool) -> None:
    with connection.cursor() as cursor:
        if is_postgres():
            if on:
                cursor.execute("CREATE FUNCTION poison() RETURNS trigger AS $$ BEGIN "
                               "RAISE EXCEPTION 'poisoned sample'; END; $$ LANGUAGE plpgsql")
                cursor.execute(f"CREATE TRIGGER poison BEFORE INSERT ON telemetry_gpusample FOR EACH ROW "
                               f"WHEN (NEW.util_mean = {POISON_UTIL}) EXECUTE FUNCTION poison()")
            else:
                cursor.execute("DROP TRIGGER poison ON telemetry_gpusample")
                cursor.execute("DROP FUNCTION poison()")
        elif on:
            cursor.execute(f"CREATE TRIGGER poison BEFORE INSERT ON telemetry_gpusample "
                           f"WHEN NEW.util_mean = {POISON_UTIL} BEGIN SELECT RAISE(ABORT, 'poisoned sample'); END")
        else:
            cursor.execute("DROP TRIGGER poison")


class TestStoreIsolation:
    def test_a_batch_the_database_refuses_is_set_aside_and_the_others_are_stored(self, client, settings):
        settings.METRICS_BEARER_TOKEN = "scrape"
        fleet = []
        for n in range(12):
            node, cred = node_with_credential(hostname=f"gpu-{n:02d}")
            uuid = gpu_uuid()
            util = POISON_UTIL if n == 7 else 40.0
            body = batch_payload(seq=1, gpus=[gpu_payload(uuid=uuid, util=util)], engines=[engine_payload()])
            assert post(client, body, cred, store=False).status_code == 200
            fleet.append((node, uuid))
        _poison(True)
        assert batches_store() == 12  # one flush: halved until the refused batch is alone
        poisoned = IngestedBatch.objects.get(node=fleet[7][0])
        assert poisoned.stored_at is None and "poisoned sample" in poisoned.store_error
        assert poisoned.payload is not None
        assert IngestedBatch.objects.filter(stored_at__isnull=False).count() == 11
        assert GpuSample.objects.count() == 11 and UsageSample.objects.count() == 11
        assert batches_store() == 0  # set aside: never taken again, so it cannot stop the queue

        alert = Alert.objects.get(kind="batches_set_aside")
        assert alert.node == fleet[7][0] and alert.severity == "critical" and alert.resolved_at is None
        assert "poisoned sample" in alert.detail
        metrics = client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape").content.decode()
        assert 'tokenmill_store_queue_batches{state="failed"} 1.0' in metrics
        admin = OperatorFactory()
        client.login(username=admin.username, password=PASSWORD)
        page = client.get("/fleet/").content.decode()
        assert 'data-testid="set-aside"' in page and "1 batch set aside" in page

        _poison(False)  # the cause fixed, an operator queues it again from the fleet page
        assert client.post("/fleet/batches/retry/").status_code == 302
        assert batches_store() == 1
        poisoned.refresh_from_db()
        assert poisoned.stored_at is not None and poisoned.store_error == ""
        assert GpuSample.objects.count() == 12
        alert.refresh_from_db()
        assert alert.resolved_at is not None
        assert 'data-testid="set-aside"' not in client.get("/fleet/").content.decode()


def _accept_and_store(credential, raw: dict) -> None:
    batch = BatchIn.model_validate_json(json.dumps(raw))
    assert batch_accept(credential=credential, batch=batch).status == "stored"
    assert batches_store() == 1
    assert list(IngestedBatch.objects.filter(node=credential.node, seq=raw["seq"]).values_list(
        "store_error", "payload")) == [("", None)]


@hsettings(max_examples=80, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_every_batch_the_contract_accepts_is_stored(node_cred, data):
    # Drawn from the published schema itself, its bounds often taken.
    node, cred = node_cred
    seq = IngestedBatch.objects.filter(node=node).count() + 1
    _accept_and_store(credential_authenticate(value=cred), data.draw(batches(seq=seq)))


@pytest.mark.parametrize("which", ["max", "min"])
def test_a_batch_with_every_bound_at_its_extreme_is_stored(which):
    _node, cred = node_with_credential()
    raw = extreme_batch(seq=1, which=which)
    if which == "max":
        assert len(raw["gpus"]) == 64 and len(raw["engines"]) == 64 and len(raw["events"]) == 1000
    _accept_and_store(credential_authenticate(value=cred), raw)
    if which == "max":
        assert GpuSample.objects.count() == 64 and UsageSample.objects.count() == 64


@pytest.fixture
def node_cred():
    return node_with_credential()


@pytest.mark.django_db(transaction=True)
def test_only_one_of_two_nodes_reporting_a_new_gpu_at_once_gets_it():
    # Two nodes report a GPU neither has reported before, at the same moment, many times over: each time exactly
    # one is told 200 and owns the GPU; the other gets 422 naming the GPU and has nothing accepted.
    nodes = [node_with_credential(hostname=f"race-{i}") for i in range(2)]
    for round_ in range(15):
        uuid = gpu_uuid()
        barrier = threading.Barrier(2)
        answers = {}

        def send(i, uuid=uuid, barrier=barrier, answers=answers, seq=round_ + 1):
            try:
                body = batch_payload(seq=seq, end=time.time(), gpus=[gpu_payload(uuid=uuid)])
                barrier.wait(5)
                answers[i] = Client().post(INGEST, data=json.dumps(body), content_type="application/json",
                                           HTTP_AUTHORIZATION=f"Bearer {nodes[i][1]}")
            finally:
                connection.close()

        threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        codes = sorted(answers[i].status_code for i in range(2))
        assert codes == [200, 422], [answers[i].content for i in range(2)]
        winner = next(i for i in range(2) if answers[i].status_code == 200)
        loser = 1 - winner
        assert answers[loser].json()["detail"][0] == {
            "loc": ["body", "gpus", 0, "uuid"], "msg": f"GPU {uuid} belongs to another node", "type": "value_error"}
        assert Gpu.objects.get(uuid=uuid).node_id == nodes[winner][0].pk
        assert not IngestedBatch.objects.filter(node=nodes[loser][0], seq=round_ + 1).exists()
    batches_store()
    assert IngestedBatch.objects.filter(stored_at__isnull=True).count() == 0
    assert GpuSample.objects.count() == 15
