import json
import random
import time
from datetime import UTC, datetime, timedelta

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connection
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from portal.alerts.models import Alert
from portal.fleet.models import HealthEvent, Node, NodeStatus
from portal.fleet.services import nodes_detect_offline
from portal.hours import DAY, day_floor
from portal.telemetry.models import (
    GpuHour,
    GpuMinute,
    GpuSample,
    IngestedBatch,
    UsageHour,
    UsageMinute,
    UsageSample,
)
from portal.telemetry.rollups import apply_retention, rollup_hours, rollup_minutes
from tests.conftest import is_postgres
from tests.factories import (
    PASSWORD,
    OperatorFactory,
    ViewerFactory,
    batch_payload,
    engine_payload,
    gpu_payload,
    gpu_uuid,
    node_with_credential,
)
from tests.test_ingest import post, table_counts

pytestmark = pytest.mark.django_db


def settled() -> datetime:
    """A rollup time by which every batch the test sent has settled (rollups skip the last 5 s)."""
    return datetime.now(tz=UTC) + timedelta(seconds=6)


def ingest_series(client, cred, uuids, *, start: float, count: int, rng):
    """`count` consecutive 10 s batches from `start` with random readings; returns the payloads."""
    bodies = []
    for i in range(count):
        end = start + 10 * (i + 1)
        gpus = [gpu_payload(uuid=u, index=k, util=rng.uniform(0, 95), power=rng.uniform(60, 690))
                for k, u in enumerate(uuids)]
        for g in gpus:
            g["util_max"] = min(100.0, g["util_mean"] + rng.uniform(0, 5))
            g["energy_mj"] = int(g["power_mean_w"] * 10_000)
        engines = [engine_payload(prompt=rng.randrange(10_000), generation=rng.randrange(3_000))]
        body = batch_payload(seq=i + 1, end=end, gpus=gpus, engines=engines)
        assert post(client, body, cred).status_code == 200
        bodies.append(body)
    return bodies


class TestRollups:
    def test_it_matches_a_direct_sql_aggregate_of_the_raw_tier(self, client):
        rng = random.Random(3)
        _node, cred = node_with_credential()
        uuids = [gpu_uuid() for _ in range(3)]
        start = time.time() - 3 * 3600
        ingest_series(client, cred, uuids, start=start, count=40, rng=rng)
        rollup_minutes(now=settled())
        with connection.cursor() as cursor:
            bucket = ("CAST(strftime('%%s', ts) AS INTEGER) / 60" if connection.vendor == "sqlite"
                      else "floor(extract(epoch from ts) / 60)")
            cursor.execute(f"""
                SELECT gpu_id, {bucket} AS m, SUM(seconds), SUM(util_mean * seconds) / SUM(seconds),
                       MAX(util_max), SUM(energy_mj), SUM(power_mean_w * seconds) / SUM(seconds), MAX(temp_max_c)
                FROM telemetry_gpusample GROUP BY gpu_id, m ORDER BY gpu_id, m""", [])  # noqa: S608
            expected = cursor.fetchall()
        got = list(GpuMinute.objects.order_by("gpu_id", "ts").values_list(
            "gpu_id", "ts", "seconds", "util_mean", "util_max", "energy_mj", "power_mean_w", "temp_max_c"))
        assert len(got) == len(expected) > 5
        for g, e in zip(got, expected, strict=True):
            assert g[0] == e[0] and int(g[1].timestamp()) // 60 == int(e[1])
            assert g[2] == pytest.approx(e[2]) and g[3] == pytest.approx(e[3]) and g[4] == e[4]
            assert g[5] == e[5] and g[6] == pytest.approx(e[6]) and g[7] == e[7]
        tokens = UsageSample.objects.values_list("prompt_tokens", "generation_tokens")
        assert sum(p for p, _ in tokens) == sum(UsageMinute.objects.values_list("prompt_tokens", flat=True))
        assert sum(g for _, g in tokens) == sum(UsageMinute.objects.values_list("generation_tokens", flat=True))

    def test_it_rolls_hours_from_minutes_and_is_idempotent(self, client):
        _node, cred = node_with_credential()
        hour_start = (int(time.time()) // 3600 - 2) * 3600  # 30 batches inside one clock hour
        ingest_series(client, cred, [gpu_uuid()], start=hour_start + 60, count=30, rng=random.Random(5))
        now = settled()
        rollup_minutes(now=now)
        rollup_hours(now=now)
        snapshot = (list(GpuMinute.objects.order_by("pk").values()), list(GpuHour.objects.order_by("pk").values()),
                    list(UsageMinute.objects.order_by("pk").values()), list(UsageHour.objects.order_by("pk").values()))
        assert GpuHour.objects.get().energy_mj == sum(GpuMinute.objects.values_list("energy_mj", flat=True))
        assert UsageHour.objects.get().generation_tokens == sum(
            UsageSample.objects.values_list("generation_tokens", flat=True))
        hour_ttft = UsageHour.objects.get().ttft
        assert hour_ttft["counts"][-1] == 5 * 30 and hour_ttft["le"] == [0.1, 0.25, 0.5, 1.0]
        # Re-running changes nothing, even after forgetting the watermark (everything is recomputed).
        from portal.telemetry.models import RollupWatermark

        RollupWatermark.objects.all().delete()
        rollup_minutes(now=now)
        rollup_hours(now=now)
        again = (list(GpuMinute.objects.order_by("pk").values()), list(GpuHour.objects.order_by("pk").values()),
                 list(UsageMinute.objects.order_by("pk").values()), list(UsageHour.objects.order_by("pk").values()))
        assert again == snapshot

    def test_it_folds_in_a_late_batch_from_the_spool(self, client):
        _node, cred = node_with_credential()
        uuid = gpu_uuid()
        minute = (int(time.time()) // 60 - 90) * 60
        first = batch_payload(seq=1, end=minute + 10, gpus=[gpu_payload(uuid=uuid, util=10.0)],
                              engines=[engine_payload(prompt=100, generation=10)])
        assert post(client, first, cred).status_code == 200
        a_minute_ago = datetime.now(tz=UTC) - timedelta(minutes=1)
        for model in (IngestedBatch, GpuSample, UsageSample):
            model.objects.update(stored_at=a_minute_ago)
        rollup_minutes(now=datetime.now(tz=UTC))
        assert GpuMinute.objects.get().util_mean == 10.0
        late = batch_payload(seq=2, end=minute + 20, gpus=[gpu_payload(uuid=uuid, util=30.0)],
                             engines=[engine_payload(prompt=50, generation=5)])
        assert post(client, late, cred).status_code == 200
        rollup_minutes(now=settled())
        assert GpuMinute.objects.get().util_mean == pytest.approx(20.0)
        assert UsageMinute.objects.get().prompt_tokens == 150

    def test_it_deletes_exactly_what_is_past_its_window(self, client):
        _node, cred = node_with_credential()
        uuid = gpu_uuid()
        ingest_series(client, cred, [uuid], start=time.time() - 400, count=12, rng=random.Random(1))
        now = datetime.now(tz=UTC) + timedelta(hours=settings.TELEMETRY_RAW_RETENTION_HOURS) - timedelta(minutes=5)
        # At now+48h-5min: samples that started over 5 minutes ago are past the window; newer ones are not yet.
        raw_before = GpuSample.objects.count()
        cutoff = now - timedelta(hours=settings.TELEMETRY_RAW_RETENTION_HOURS)
        past = GpuSample.objects.filter(ts__lt=cutoff).count()
        assert 0 < past < raw_before
        usage_minutes = UsageMinute.objects.count()
        # On PostgreSQL a day's partition goes whole, once all of its day is past the window.
        whole = day_floor(cutoff) if is_postgres() else cutoff
        past = GpuSample.objects.filter(ts__lt=whole).count()
        deleted = apply_retention(now=now)
        assert deleted["gpu_samples"] == past
        assert GpuSample.objects.count() == raw_before - past
        assert not GpuSample.objects.filter(ts__lt=whole).exists()
        assert UsageMinute.objects.count() >= usage_minutes
        assert sum(UsageMinute.objects.values_list("prompt_tokens", flat=True)) > 0
        # Nothing more to delete on a second run.
        assert apply_retention(now=now)["gpu_samples"] == 0
        # A day later every row is past the window, whole days included.
        if is_postgres():  # in the test's transaction; retention runs in its own (see tests/test_partitions.py)
            with connection.cursor() as cursor:
                cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        assert apply_retention(now=now + DAY)["gpu_samples"] == raw_before - past
        assert not GpuSample.objects.exists()


class TestOffline:
    def test_it_marks_a_silent_node_offline_and_back_online(self, client):
        node, cred = node_with_credential(status=NodeStatus.PENDING)
        assert post(client, batch_payload(seq=1), cred).status_code == 200
        node.refresh_from_db()
        assert node.status == NodeStatus.ONLINE
        now = datetime.now(tz=UTC)
        assert nodes_detect_offline(now=now + timedelta(seconds=20)) == []
        assert nodes_detect_offline(now=now + timedelta(seconds=31)) == [node.pk]
        assert nodes_detect_offline(now=now + timedelta(seconds=40)) == []
        node.refresh_from_db()
        assert node.status == NodeStatus.OFFLINE
        alert = Alert.objects.get(resolved_at__isnull=True)
        assert alert.title == f"{node.hostname} is offline" and alert.severity == "critical"
        assert post(client, batch_payload(seq=2), cred).status_code == 200
        node.refresh_from_db()
        assert node.status == NodeStatus.ONLINE
        assert Alert.objects.get().resolved_at is not None
        assert list(HealthEvent.objects.filter(node=node).order_by("pk").values_list("kind", flat=True)) == [
            "node_offline", "node_online"]


class TestMetricsExport:
    def test_it_requires_the_bearer_token(self, client, settings):
        settings.METRICS_BEARER_TOKEN = "s3cret-scrape-token"
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
        assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-scrape-token").status_code == 200

    def test_it_exports_fleet_gauges_and_token_counters(self, client, settings):
        settings.METRICS_BEARER_TOKEN = "tok"
        node, cred = node_with_credential()
        uuid = gpu_uuid()
        body = batch_payload(seq=1, gpus=[gpu_payload(uuid=uuid, util=61.5, power=420.0)],
                             engines=[engine_payload(prompt=1200, generation=300)])
        assert post(client, body, cred).status_code == 200
        text = client.get("/metrics", HTTP_AUTHORIZATION="Bearer tok").content.decode()
        site = node.site.slug
        labels = f'gpu="{uuid}",model="NVIDIA H100 80GB HBM3",node="{node.hostname}",site="{site}"'
        assert f"tokenmill_gpu_utilization_percent{{{labels}}} 61.5" in text
        assert f'tokenmill_tokens_total{{kind="prompt",site="{site}"}} 1200.0' in text
        assert f'tokenmill_nodes{{site="{site}",status="online"}} 1.0' in text
        rollup_minutes(now=settled())
        text = client.get("/metrics", HTTP_AUTHORIZATION="Bearer tok").content.decode()
        assert f'tokenmill_tokens_total{{kind="generation",site="{site}"}} 300.0' in text


class TestEnrollmentTokens:
    def test_it_lets_operator_admins_create_a_token_shown_once(self, client):
        admin = OperatorFactory()
        node, _ = node_with_credential()
        client.login(username=admin.username, password=PASSWORD)
        page = client.post("/fleet/enroll/", {"site": node.site.pk, "hours": 12, "note": "rack 7"})
        text = page.content.decode()
        value = page.context["issued"]["value"]
        assert value.startswith("tme_") and value in text
        assert f"tokenmill-agent enroll --portal http://testserver --token {value}" in text
        again = client.get("/fleet/enroll/").content.decode()
        assert value not in again and f"tme_{value.split('_')[1]}_…" in again
        r = post(client, {"token": value, "host": {"hostname": "new-node"}})
        assert r.status_code == 200 and Node.objects.filter(hostname="new-node", site=node.site).exists()

    def test_it_refuses_viewers(self, client):
        viewer = ViewerFactory()
        client.login(username=viewer.username, password=PASSWORD)
        assert client.get("/fleet/enroll/").status_code == 403

    def test_the_command_prints_a_working_token(self, client, capsys):
        node, _ = node_with_credential()
        call_command("enrollment_token", "--site", node.site.slug, "--hours", "2")
        value = capsys.readouterr().out.strip()
        assert post(client, {"token": value, "host": {"hostname": "cli-node"}}).status_code == 200


def test_it_publishes_the_openapi_document(client):
    served = client.get("/api/v1/openapi.json").json()
    checked_in = json.loads((settings.BASE_DIR / "docs" / "openapi.json").read_text())
    assert served == checked_in, "docs/openapi.json is stale: run `make openapi`"
    body = served["components"]["schemas"]["BatchIn"]
    assert body["properties"]["schema_version"]["const"] == 1


# Values that break types, ranges or shapes, for fuzzing every field of a valid batch.
_bad_values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


class TestFuzz:
    @pytest.fixture
    def node_cred(self):
        return node_with_credential()

    # Examples share the test's database transaction (and the node): each checks its own before/after counts.
    @hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=st.data())
    def test_it_never_answers_5xx_nor_writes_on_rejection(self, client, node_cred, data):
        node, cred = node_cred
        seq = IngestedBatch.objects.filter(node=node).count() + 1
        body = batch_payload(seq=seq, gpus=[gpu_payload(uuid=f"GPU-{seq:08d}-0000-0000-0000-000000000000")],
                             engines=[engine_payload()])
        body["events"] = [{"ts": time.time(), "gpu_uuid": body["gpus"][0]["uuid"], "kind": "xid", "code": 13}]
        path = data.draw(st.sampled_from([p for p in _paths(body) if p]))
        value = data.draw(_bad_values)
        target = body
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        raw = json.dumps(body, allow_nan=True).encode()
        before = table_counts()
        response = post(client, None, cred, raw=raw)
        assert response.status_code < 500
        if response.status_code >= 400:
            assert table_counts() == before
            assert response.json()["detail"]
