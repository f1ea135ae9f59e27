"""The raw tiers' day partitions (portal.telemetry.partitions, migration 0004), on PostgreSQL: rows reach their day's
partition or DEFAULT, partitions are made ahead idempotently and take in the rows DEFAULT held for their day,
retention drops whole rolled-up days and keeps a day still to be rolled up, rollups and dashboards read across
partitions, and the migration reversed and applied again keeps every row. On SQLite the tables stay plain."""

import threading
import time as clock
from datetime import UTC, date, datetime, time, timedelta

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connection, transaction
from django.utils import timezone

from portal.economics.selectors import tokens_per_second_now
from portal.fleet.models import ServingEndpoint
from portal.telemetry import tasks
from portal.telemetry.models import GpuMinute, GpuSample, UsageMinute, UsageSample
from portal.telemetry.partitions import (
    DAYS_AHEAD,
    Dropped,
    Ensured,
    day_partitions,
    partition_name,
    raw_partitions_drop,
    raw_partitions_ensure,
)
from portal.telemetry.rollups import apply_retention, rollup_minutes
from portal.telemetry.selectors import node_series
from tests.factories import GpuFactory, batch_payload, engine_payload, gpu_payload, gpu_uuid, node_with_credential
from tests.test_ingest import post

pytestmark = pytest.mark.django_db
postgres_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite keeps plain tables")
GPU, USAGE = "telemetry_gpusample", "telemetry_usagesample"
DAY = timedelta(days=1)
PLACED = {GPU: "SELECT id, tableoid::regclass::text FROM telemetry_gpusample",
          USAGE: "SELECT id, tableoid::regclass::text FROM telemetry_usagesample"}


def placed(table: str) -> dict[int, str]:
    """Row id -> the partition holding it."""
    with connection.cursor() as cursor:
        cursor.execute(PLACED[table])
        return dict(cursor.fetchall())


def midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def today() -> date:
    return timezone.now().astimezone(UTC).date()


def settled() -> datetime:
    return timezone.now() + timedelta(seconds=6)


def raw_rows(*, gpu, endpoint, at: datetime, stored_at: datetime, gpus: int = 1, usage: int = 0) -> list[int]:
    ids = [GpuSample.objects.create(gpu=gpu, ts=at + timedelta(seconds=10 * i), stored_at=stored_at, seconds=10,
                                    energy_mj=1000 + i).pk for i in range(gpus)]
    return ids + [UsageSample.objects.create(endpoint=endpoint, ts=at + timedelta(seconds=10 * i), stored_at=stored_at,
                                             prompt_tokens=100 + i).pk for i in range(usage)]


@pytest.fixture
def gpu_and_endpoint():
    gpu = GpuFactory()
    endpoint = ServingEndpoint.objects.create(node=gpu.node, url="http://10.0.0.1:8000/metrics", model="m",
                                              engine="vllm")
    return gpu, endpoint


@pytest.mark.skipif(connection.vendor == "postgresql", reason="PostgreSQL partitions the raw tables")
def test_on_sqlite_the_tables_stay_plain_and_the_functions_say_so():
    assert raw_partitions_ensure() == Ensured(partitioned=False)
    assert raw_partitions_drop(before=timezone.now(), rolled_up_until=timezone.now()) == Dropped(
        partitioned=False, rows={GPU: 0, USAGE: 0})
    assert tasks.raw_partitions_ensure.apply().get() == {"partitioned": False, "created": [], "moved": 0, "busy": []}


@postgres_only
def test_the_raw_tables_are_partitioned_by_day_keeping_their_columns_indexes_and_foreign_keys():
    with connection.cursor() as cursor:
        cursor.execute("SELECT c.relname, p.partstrat, a.attname FROM pg_partitioned_table p "
                       "JOIN pg_class c ON c.oid = p.partrelid "
                       "JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]")
        assert sorted(cursor.fetchall()) == [(GPU, "r", "ts"), (USAGE, "r", "ts")]
        cursor.execute("SELECT conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid) "
                       "FROM pg_constraint WHERE conrelid::regclass::text = ANY(%s)", [[GPU, USAGE]])
        assert sorted(cursor.fetchall()) == [
            (GPU, "telemetry_gpusample_gpu_id_1de618f3_fk_fleet_gpu_id", "f",
             "FOREIGN KEY (gpu_id) REFERENCES fleet_gpu(id) DEFERRABLE INITIALLY DEFERRED"),
            (GPU, "telemetry_gpusample_pkey", "p", "PRIMARY KEY (id, ts)"),
            (USAGE, "telemetry_usagesampl_endpoint_id_2d211088_fk_fleet_ser", "f",
             "FOREIGN KEY (endpoint_id) REFERENCES fleet_servingendpoint(id) DEFERRABLE INITIALLY DEFERRED"),
            (USAGE, "telemetry_usagesample_pkey", "p", "PRIMARY KEY (id, ts)"),
            (USAGE, "telemetry_usagesample_probes_check", "c", "CHECK ((probes >= 0))"),
            (USAGE, "telemetry_usagesample_probes_up_check", "c", "CHECK ((probes_up >= 0))"),
        ]
        cursor.execute("SELECT tablename, indexname FROM pg_indexes WHERE tablename = ANY(%s)", [[GPU, USAGE]])
        assert sorted(cursor.fetchall()) == [
            (GPU, "telemetry_g_gpu_id_93a7ad_idx"), (GPU, "telemetry_g_ts_db7704_idx"),
            (GPU, "telemetry_gpusample_pkey"), (USAGE, "telemetry_u_endpoin_deb20d_idx"),
            (USAGE, "telemetry_u_ts_fe5359_idx"), (USAGE, "telemetry_usagesample_pkey")]
        cursor.execute("SELECT pg_get_serial_sequence('telemetry_gpusample', 'id'), "
                       "pg_get_serial_sequence('telemetry_usagesample', 'id')")
        assert cursor.fetchone() == ("public.telemetry_gpusample_id_seq", "public.telemetry_usagesample_id_seq")
    raw_partitions_ensure()
    for table in (GPU, USAGE):
        assert set(day_partitions(table=table)) >= {today() + DAY * i for i in range(DAYS_AHEAD + 1)}


@postgres_only
def test_a_row_lands_in_its_days_partition_and_one_of_a_day_without_one_in_default_still_rolled_up(client):
    raw_partitions_ensure()
    _node, cred = node_with_credential()
    uuid, now = gpu_uuid(), timezone.now()
    old_end = (now - timedelta(days=20)).timestamp()
    for seq, end, power in ((1, old_end, 300.0), (2, now.timestamp(), 500.0)):
        body = batch_payload(seq=seq, end=end, gpus=[gpu_payload(uuid=uuid, power=power)],
                             engines=[engine_payload(prompt=1000 * seq, generation=10 * seq)])
        assert post(client, body, cred).status_code == 200
    old_day = (now - timedelta(days=20, seconds=10)).astimezone(UTC).date()
    assert old_day not in day_partitions(table=GPU)
    for table, model in ((GPU, GpuSample), (USAGE, UsageSample)):
        assert placed(table) == {
            pk: f"{table}_default" if ts.date() == old_day else partition_name(table=table, day=today())
            for pk, ts in model.objects.values_list("pk", "ts")}
    rollup_minutes(now=settled())
    assert sorted(GpuMinute.objects.values_list("energy_mj", flat=True)) == [3_000_000, 5_000_000]
    assert sorted(UsageMinute.objects.values_list("prompt_tokens", flat=True)) == [1000, 2000]
    deleted = apply_retention(now=settled())
    assert (deleted["gpu_samples"], deleted["usage_samples"]) == (1, 1)
    assert list(GpuSample.objects.values_list("power_mean_w", flat=True)) == [500.0]
    assert set(placed(GPU).values()) == {partition_name(table=GPU, day=today())}


@postgres_only
def test_making_partitions_ahead_is_idempotent():
    later = timezone.now() + timedelta(days=40)
    days = [later.date() + DAY * i for i in range(3)]
    first = raw_partitions_ensure(now=later, days_ahead=2)
    assert first == Ensured(partitioned=True, created=[partition_name(table=t, day=d) for t in (GPU, USAGE)
                                                       for d in days])
    assert raw_partitions_ensure(now=later, days_ahead=2) == Ensured(partitioned=True)
    for table in (GPU, USAGE):
        assert set(days) <= set(day_partitions(table=table))
    beat = settings.CELERY_BEAT_SCHEDULE["telemetry-partitions"]
    assert beat["task"] == "portal.telemetry.tasks.raw_partitions_ensure"
    raw_partitions_ensure()
    assert tasks.raw_partitions_ensure.apply().get() == {"partitioned": True, "created": [], "moved": 0, "busy": []}


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_table_that_stays_locked_gets_its_partition_on_a_later_run_and_no_long_wait():
    locked, release, failures = threading.Event(), threading.Event(), []

    def long_read() -> None:
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("LOCK TABLE telemetry_gpusample IN ACCESS SHARE MODE")  # what a long read holds
                locked.set()
                release.wait(10)
        except Exception as exc:  # reported by the test thread
            failures.append(exc)
        finally:
            connection.close()

    day = today() + timedelta(days=50)
    gpu_day, usage_day = partition_name(table=GPU, day=day), partition_name(table=USAGE, day=day)
    reader = threading.Thread(target=long_read)
    reader.start()
    try:
        assert locked.wait(10)
        began = clock.monotonic()
        ensured = raw_partitions_ensure(now=midnight(day), days_ahead=0)
        assert clock.monotonic() - began < 3
        assert ensured == Ensured(partitioned=True, created=[usage_day], busy=[gpu_day])
    finally:
        release.set()
        reader.join(10)
    assert failures == []
    assert raw_partitions_ensure(now=midnight(day), days_ahead=0).created == [gpu_day]
    with connection.cursor() as cursor:  # the flush after this test empties tables but keeps partitions
        cursor.execute(f"DROP TABLE {gpu_day}, {usage_day}")


@postgres_only
def test_a_partition_made_for_a_day_that_default_holds_rows_of_takes_them_in(gpu_and_endpoint):
    gpu, endpoint = gpu_and_endpoint
    day = today() + timedelta(days=20)
    stored = timezone.now()
    ids = raw_rows(gpu=gpu, endpoint=endpoint, at=midnight(day) + timedelta(hours=3), stored_at=stored, gpus=2, usage=1)
    (next_day_id,) = raw_rows(gpu=gpu, endpoint=endpoint, at=midnight(day + DAY), stored_at=stored)
    before = sorted(GpuSample.objects.values_list("id", "ts", "energy_mj"))
    assert placed(GPU) == {ids[0]: f"{GPU}_default", ids[1]: f"{GPU}_default", next_day_id: f"{GPU}_default"}
    assert placed(USAGE) == {ids[2]: f"{USAGE}_default"}
    ensured = raw_partitions_ensure(now=midnight(day) + timedelta(hours=12), days_ahead=0)
    gpu_day, usage_day = partition_name(table=GPU, day=day), partition_name(table=USAGE, day=day)
    assert ensured == Ensured(partitioned=True, created=[gpu_day, usage_day], moved=3)
    assert placed(GPU) == {ids[0]: gpu_day, ids[1]: gpu_day, next_day_id: f"{GPU}_default"}
    assert placed(USAGE) == {ids[2]: usage_day}
    assert sorted(GpuSample.objects.values_list("id", "ts", "energy_mj")) == before
    assert GpuSample.objects.create(gpu=gpu, ts=midnight(day), stored_at=stored, seconds=10).pk > next_day_id


def _two_old_days(gpu, endpoint, now: datetime) -> tuple[date, date, int]:
    """Day a: 3 GPU and 2 usage rows, all rolled up; day b: a rolled-up GPU row and one stored after the minute
    watermark (now - 5 s at the next rollup); a recent row. Returns the days and the row not rolled up."""
    day_a, day_b = today() - timedelta(days=10), today() - timedelta(days=9)
    raw_partitions_ensure(now=now, days=[day_a, day_b])
    raw_rows(gpu=gpu, endpoint=endpoint, at=midnight(day_a), stored_at=now - timedelta(hours=1), gpus=3, usage=2)
    raw_rows(gpu=gpu, endpoint=endpoint, at=midnight(day_b), stored_at=now - timedelta(hours=1))
    (pending,) = raw_rows(gpu=gpu, endpoint=endpoint, at=midnight(day_b) + timedelta(hours=1), stored_at=now)
    raw_rows(gpu=gpu, endpoint=endpoint, at=now - timedelta(minutes=1), stored_at=now - timedelta(hours=1))
    with connection.cursor() as cursor:
        # Retention runs in a transaction of its own; here the rows' deferred foreign-key checks are pending in the
        # test's transaction, and PostgreSQL drops no table with such checks pending.
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
    return day_a, day_b, pending


@postgres_only
def test_dropping_old_days_keeps_a_day_with_a_row_not_rolled_up(gpu_and_endpoint):
    now = timezone.now()
    day_a, day_b, _pending = _two_old_days(*gpu_and_endpoint, now)
    dropped = raw_partitions_drop(before=now - timedelta(hours=48), rolled_up_until=now - timedelta(seconds=5))
    assert dropped == Dropped(
        partitioned=True, rows={GPU: 3, USAGE: 2},
        dropped=[partition_name(table=GPU, day=day_a), partition_name(table=USAGE, day=day_a),
                 partition_name(table=USAGE, day=day_b)],
        kept={partition_name(table=GPU, day=day_b): "rows not in the minute tier yet: 1"})
    assert day_a not in day_partitions(table=GPU) and day_b in day_partitions(table=GPU)
    assert GpuSample.objects.count() == 3 and UsageSample.objects.count() == 0


@postgres_only
def test_retention_counts_the_rows_of_dropped_days_and_keeps_a_day_not_rolled_up_whole(gpu_and_endpoint):
    now = timezone.now()
    _day_a, day_b, pending = _two_old_days(*gpu_and_endpoint, now)
    deleted = apply_retention(now=now)
    assert (deleted["gpu_samples"], deleted["usage_samples"]) == (3, 2)
    # Not trimmed row by row: the kept day holds its rolled-up row beside the pending one until it goes whole.
    kept = GpuSample.objects.filter(ts__lt=now - timedelta(hours=48))
    assert kept.count() == 2 and pending in set(kept.values_list("pk", flat=True))
    assert placed(GPU)[pending] == partition_name(table=GPU, day=day_b)
    assert GpuSample.objects.filter(ts__gte=now - timedelta(hours=1)).count() == 1
    later = now + timedelta(minutes=1)  # the row is rolled up by then: its day goes
    assert apply_retention(now=later)["gpu_samples"] == 2
    assert day_b not in day_partitions(table=GPU)


@postgres_only
def test_rollups_and_dashboards_read_rows_across_day_partitions(client):
    node, cred = node_with_credential()
    uuids = [gpu_uuid(), gpu_uuid()]
    boundary = midnight(today() - DAY)
    raw_partitions_ensure(days=[boundary.date() - DAY, boundary.date()])
    energy: dict[tuple[int, datetime], int] = {}
    tokens: dict[datetime, int] = {}
    for i in range(12):  # 10 s intervals from a minute before midnight to a minute after
        start = boundary - timedelta(seconds=60) + timedelta(seconds=10 * i)
        gpus = [gpu_payload(uuid=u, index=k, power=100.0 + 10 * i + k) for k, u in enumerate(uuids)]
        body = batch_payload(seq=i + 1, end=(start + timedelta(seconds=10)).timestamp(), gpus=gpus,
                             engines=[engine_payload(prompt=100 + i, generation=10)])
        assert post(client, body, cred).status_code == 200
        minute = start.replace(second=0)
        for k, g in enumerate(gpus):
            energy[(k, minute)] = energy.get((k, minute), 0) + g["energy_mj"]
        tokens[minute] = tokens.get(minute, 0) + 110 + i
    assert set(placed(GPU).values()) == {partition_name(table=GPU, day=boundary.date() - DAY),
                                         partition_name(table=GPU, day=boundary.date())}
    rollup_minutes(now=settled())
    index = dict(node.gpus.values_list("pk", "index"))
    assert {(index[g], ts): e for g, ts, e in GpuMinute.objects.values_list("gpu_id", "ts", "energy_mj")} == energy
    assert set(GpuMinute.objects.values_list("seconds", flat=True)) == {60.0}
    assert {ts: p + g for ts, p, g in UsageMinute.objects.values_list("ts", "prompt_tokens", "generation_tokens")
            } == tokens
    series = node_series(node=node, range_key="1h", now=boundary + timedelta(seconds=61))
    assert [len(s["ts"]) for s in series["gpus"]] == [12, 12]
    assert len(series["tokens"][0]["tps"]) == 12
    assert tokens_per_second_now(now=boundary + timedelta(seconds=70)) == pytest.approx(tokens[boundary] / 60)


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_the_migration_reversed_and_applied_again_keeps_every_row_and_the_next_id(gpu_and_endpoint):
    gpu, endpoint = gpu_and_endpoint
    now = timezone.now()
    for at in (now, now - timedelta(days=20)):
        raw_rows(gpu=gpu, endpoint=endpoint, at=at, stored_at=now, gpus=2, usage=1)
    rows = {model: sorted(model.objects.values_list("id", "ts", "stored_at")) for model in (GpuSample, UsageSample)}
    try:
        call_command("migrate", "telemetry", "0003", verbosity=0)
        with connection.cursor() as cursor:
            cursor.execute("SELECT relname, relkind FROM pg_class WHERE relname = ANY(%s)", [[GPU, USAGE]])
            assert sorted(cursor.fetchall()) == [(GPU, "r"), (USAGE, "r")]
        assert {model: sorted(model.objects.values_list("id", "ts", "stored_at")) for model in rows} == rows
        call_command("migrate", "telemetry", verbosity=0)
        assert {model: sorted(model.objects.values_list("id", "ts", "stored_at")) for model in rows} == rows
        old_day = (now - timedelta(days=20)).astimezone(UTC).date()
        assert set(placed(GPU).values()) == {partition_name(table=GPU, day=today()),
                                             partition_name(table=GPU, day=old_day)}
        newest = max(pk for pk, _ts, _stored in rows[GpuSample])
        assert GpuSample.objects.create(gpu=gpu, ts=now, stored_at=now, seconds=10).pk == newest + 1
    finally:
        call_command("migrate", "telemetry", verbosity=0)
        # The old day's partition would outlive the flush after this test; no other test expects it.
        raw_partitions_drop(before=midnight(today()), rolled_up_until=now + DAY)
