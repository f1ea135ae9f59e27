"""Minute and hour rollups, and retention. Idempotent: each rollup recomputes whole periods from the tier below,
so re-running one changes nothing. Which periods to recompute is decided by the batches the store worker wrote
since the rollup's watermark, so late batches from an agent's spool are folded in too."""

from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Max, Q, Sum
from django.db.models.functions import TruncHour, TruncMinute
from django.utils import timezone

from portal.economics.services import cost_hours_attribute
from portal.hours import hour_floor, hours_between
from portal.telemetry import histograms
from portal.telemetry.models import (
    GpuHour,
    GpuMinute,
    GpuSample,
    IngestedBatch,
    RollupWatermark,
    SiteHour,
    UsageHour,
    UsageMinute,
    UsageSample,
)
from portal.telemetry.partitions import raw_default_delete, raw_partitions_drop
from portal.telemetry.schemas import HISTOGRAMS

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A store flush commits within a short transaction stamped with its start (stored_at); rolling only what was stored
# this long ago never misses a flush in flight.
SETTLE = timedelta(seconds=5)
# Nodes whose affected periods all lie this close to now are rolled together in one query.
RECENT = timedelta(minutes=15)
MINUTE_FIELDS = ["seconds", "util_mean", "util_max", "mem_util_mean", "memory_used_mib_max", "power_mean_w",
                 "energy_mj", "temp_max_c"]
USAGE_FIELDS = ["prompt_tokens", "generation_tokens", "requests_ok", "requests_failed", "probes", "probes_up",
                *HISTOGRAMS]


def _watermark(name: str) -> datetime:
    row = RollupWatermark.objects.filter(name=name).first()
    return row.stored_until if row else EPOCH


def _set_watermark(name: str, until: datetime) -> None:
    RollupWatermark.objects.update_or_create(name=name, defaults={"stored_until": until})


def minute_rollup_covers_until() -> datetime:
    """Batches stored up to this time are in the minute tier."""
    return _watermark("minute")


def _floor(ts: datetime, period: timedelta) -> datetime:
    seconds = int(period.total_seconds())
    return datetime.fromtimestamp(int(ts.timestamp()) // seconds * seconds, tz=UTC)


def _affected(since: datetime, until: datetime, period: timedelta) -> list[tuple[list[int], datetime, datetime]]:
    """(node ids, start, end) ranges of periods touched by batches stored in (since, until]."""
    spans: dict[int, list[datetime]] = {}
    rows = IngestedBatch.objects.filter(stored_at__gt=since, stored_at__lte=until).values_list(
        "node_id", "interval_start", "interval_end")
    for node_id, start, end in rows:
        lo, hi = _floor(start, period), _floor(end - timedelta(microseconds=1), period) + period
        span = spans.setdefault(node_id, [lo, hi])
        span[0], span[1] = min(span[0], lo), max(span[1], hi)
    recent = [n for n, (lo, _hi) in spans.items() if lo >= until - RECENT]
    groups = []
    if recent:
        groups.append((recent, min(spans[n][0] for n in recent), max(spans[n][1] for n in recent)))
    groups += [([n], lo, hi) for n, (lo, hi) in spans.items() if lo < until - RECENT]
    return groups


def _weighted(field: str) -> Sum:
    return Sum(F(field) * F("seconds"))


def _gpu_aggregate(source, trunc, node_ids: list[int], lo: datetime, hi: datetime, memory_field: str) -> list[dict]:
    return list(
        source.objects.filter(gpu__node_id__in=node_ids, ts__gte=lo, ts__lt=hi)
        .annotate(period=trunc("ts", tzinfo=UTC))
        .values("gpu_id", "period")
        .annotate(
            secs=Sum("seconds"),
            util_w=_weighted("util_mean"), util_s=Sum("seconds", filter=Q(util_mean__isnull=False)),
            mem_w=_weighted("mem_util_mean"), mem_s=Sum("seconds", filter=Q(mem_util_mean__isnull=False)),
            pow_w=_weighted("power_mean_w"), pow_s=Sum("seconds", filter=Q(power_mean_w__isnull=False)),
            umax=Max("util_max"), memmax=Max(memory_field), energy=Sum("energy_mj"), tmax=Max("temp_max_c"),
        )
    )


def _rollup_rows(model, aggregates: Iterable[dict]) -> list:
    def ratio(w, s):
        return w / s if w is not None and s else None

    return [
        model(
            gpu_id=a["gpu_id"], ts=a["period"], seconds=a["secs"], util_mean=ratio(a["util_w"], a["util_s"]),
            util_max=a["umax"], mem_util_mean=ratio(a["mem_w"], a["mem_s"]), memory_used_mib_max=a["memmax"],
            power_mean_w=ratio(a["pow_w"], a["pow_s"]), energy_mj=a["energy"], temp_max_c=a["tmax"],
        )
        for a in aggregates
    ]


def _usage_rows(model, source, trunc_period: timedelta, node_ids: list[int], lo: datetime, hi: datetime) -> list:
    merged: dict[tuple[int, datetime], dict] = defaultdict(lambda: dict.fromkeys(USAGE_FIELDS, None))
    rows = source.objects.filter(endpoint__node_id__in=node_ids, ts__gte=lo, ts__lt=hi).values(
        "endpoint_id", "ts", *USAGE_FIELDS)
    for row in rows:
        acc = merged[(row["endpoint_id"], _floor(row["ts"], trunc_period))]
        for name in USAGE_FIELDS:
            if name in HISTOGRAMS:
                acc[name] = histograms.merge(acc[name], row[name])
            else:
                acc[name] = (acc[name] or 0) + row[name]
    return [model(endpoint_id=endpoint_id, ts=ts, **values) for (endpoint_id, ts), values in merged.items()]


def rollup_minutes(*, now: datetime | None = None) -> int:
    """Recompute the minute tier for every period touched since the last run; returns minute rows written."""
    until = (now or timezone.now()) - SETTLE
    since = _watermark("minute")
    written = 0
    with transaction.atomic():
        for node_ids, lo, hi in _affected(since, until, timedelta(minutes=1)):
            gpu_rows = _rollup_rows(
                GpuMinute, _gpu_aggregate(GpuSample, TruncMinute, node_ids, lo, hi, "memory_used_mib"))
            usage_rows = _usage_rows(UsageMinute, UsageSample, timedelta(minutes=1), node_ids, lo, hi)
            written += _upsert(GpuMinute, gpu_rows, ["gpu", "ts"], MINUTE_FIELDS)
            written += _upsert(UsageMinute, usage_rows, ["endpoint", "ts"], USAGE_FIELDS)
        _set_watermark("minute", until)
    return written


def hours_from_minutes(*, node_ids: list[int], start: datetime, end: datetime) -> set[datetime]:
    """Recompute the hour tier (GPU and usage hours) of these nodes over whole hours in [start, end) from the minute
    tier; returns the hours written."""
    gpu_rows = _rollup_rows(GpuHour, _gpu_aggregate(GpuMinute, TruncHour, node_ids, start, end, "memory_used_mib_max"))
    usage_rows = _usage_rows(UsageHour, UsageMinute, timedelta(hours=1), node_ids, start, end)
    _upsert(GpuHour, gpu_rows, ["gpu", "ts"], MINUTE_FIELDS)
    _upsert(UsageHour, usage_rows, ["endpoint", "ts"], USAGE_FIELDS)
    return {row.ts for row in gpu_rows} | {row.ts for row in usage_rows}


def rollup_hours(*, now: datetime | None = None) -> int:
    """Recompute the hour tier from the minute tier, for periods the minute rollup has already covered, then the
    site tier and the attribution for the same hours. Returns the hours recomputed plus the rows written after."""
    now = now or timezone.now()
    until = min(now - SETTLE, _watermark("minute"))
    since = _watermark("hour")
    if until <= since:
        return 0
    hours: set[datetime] = set()
    with transaction.atomic():
        for node_ids, lo, hi in _affected(since, until, timedelta(hours=1)):
            hours |= hours_from_minutes(node_ids=node_ids, start=lo, end=hi)
        written = len(hours) + rollup_site_hours(hours=sorted(hours))
        # Attribution reads the GPU hours just written; same transaction, so pages never see one without the other.
        # Every hour since the last attributed one is attributed too: a GPU that reported nothing still cost.
        # The hour still running is attributed up to `now`, and again next time; every page's cost is through it.
        current = hour_floor(now)
        first = max(_watermark("attribution") if _has_watermark("attribution") else current,
                    current - ATTRIBUTION_CATCH_UP)
        written += cost_hours_attribute(hours=sorted(hours | set(hours_between(first, now))), now=now)
        _set_watermark("attribution", now)
        _set_watermark("hour", until)
    return written


# A watermark further behind (the rollups were stopped for weeks) catches up this far back, at most, per run.
ATTRIBUTION_CATCH_UP = timedelta(days=31)


def _has_watermark(name: str) -> bool:
    return RollupWatermark.objects.filter(name=name).exists()


def rollup_site_hours(*, hours: list[datetime]) -> int:
    """Recompute SiteHour (the tokens each site's endpoints served) for these hours from UsageHour."""
    if not hours:
        return 0
    SiteHour.objects.filter(ts__in=hours).delete()
    usage = (UsageHour.objects.filter(ts__in=hours).values("endpoint__node__site_id", "ts")
             .annotate(p=Sum("prompt_tokens"), g=Sum("generation_tokens"),
                       r=Sum(F("requests_ok") + F("requests_failed"))).order_by())
    rows = [SiteHour(site_id=a["endpoint__node__site_id"], ts=a["ts"], prompt_tokens=a["p"] or 0,
                     generation_tokens=a["g"] or 0, requests=a["r"] or 0) for a in usage]
    return _upsert(SiteHour, rows, ["site", "ts"], ["prompt_tokens", "generation_tokens", "requests"])


def _upsert(model, rows: list, unique: list[str], fields: list[str], chunk: int = 2000) -> int:
    for i in range(0, len(rows), chunk):
        model.objects.bulk_create(rows[i:i + chunk], update_conflicts=True, unique_fields=unique, update_fields=fields)
    return len(rows)


def apply_retention(*, now: datetime | None = None) -> dict[str, int]:
    """Delete raw rows past their window once rolled up (on PostgreSQL whole days at a time), minute GPU rows past
    theirs, old dedup records. Usage minutes and hours are never deleted."""
    now = now or timezone.now()
    rollup_minutes(now=now)
    rollup_hours(now=now)
    minute_wm = _watermark("minute")
    raw_cutoff = now - timedelta(hours=settings.TELEMETRY_RAW_RETENTION_HOURS)
    # A batch may be up to 30 days old on arrival (ingest's limit): minute rows older than that plus a day can
    # receive nothing new, and the hour tier already holds them.
    minute_cutoff = now - timedelta(days=max(settings.TELEMETRY_MINUTE_RETENTION_DAYS, 30) + 1)
    dropped = raw_partitions_drop(before=raw_cutoff, rolled_up_until=minute_wm)
    deleted = {
        name: dropped.rows[model._meta.db_table] + _raw_rows_delete(model, dropped.partitioned, raw_cutoff, minute_wm)
        for name, model in (("gpu_samples", GpuSample), ("usage_samples", UsageSample))
    } | {
        "gpu_minutes": GpuMinute.objects.filter(ts__lt=minute_cutoff).delete()[0],
        # Only stored batches: one set aside with a store error keeps its payload until it is stored.
        "batches": IngestedBatch.objects.filter(received_at__lt=now - timedelta(days=31),
                                                stored_at__isnull=False).delete()[0],
    }
    return deleted


def _raw_rows_delete(model, partitioned: bool, before: datetime, rolled_up_until: datetime) -> int:
    """Raw rows past the window, deleted one by one: on plain tables (SQLite) all of them; on PostgreSQL only
    those in DEFAULT, since a day partition goes whole once its day is past the window (raw_partitions_drop), so
    raw readings are kept for the window and at most a day more."""
    if partitioned:
        return raw_default_delete(table=model._meta.db_table, before=before, rolled_up_until=rolled_up_until)
    return model.objects.filter(ts__lt=before, stored_at__lte=rolled_up_until).delete()[0]
