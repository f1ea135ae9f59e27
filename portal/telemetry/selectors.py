"""Time series for charts. A range reads the coarsest tier that still gives enough points: raw samples for an
hour, minutes for a day, hours beyond. Each read is one indexed range query whatever the length of history."""

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import BigIntegerField, Count, Func, Q
from django.utils import timezone

from portal.fleet.models import Node
from portal.telemetry.models import GpuHour, GpuMinute, GpuSample, IngestedBatch, UsageHour, UsageMinute, UsageSample


@dataclass(frozen=True)
class StoreQueue:
    waiting: int  # accepted, not yet written into the tiers by the store worker
    set_aside: int  # the store worker could not store them; kept with their error until queued again


def store_queue() -> StoreQueue:
    """The accepted batches not yet in the telemetry tiers, in one query (the pending index holds only them)."""
    counts = IngestedBatch.objects.filter(stored_at__isnull=True).aggregate(
        waiting=Count("id", filter=Q(store_error="")), set_aside=Count("id", filter=~Q(store_error="")))
    return StoreQueue(waiting=counts["waiting"], set_aside=counts["set_aside"])


@dataclass(frozen=True)
class Range:
    key: str
    label: str
    span: timedelta
    tier: str


RANGES = {
    r.key: r
    for r in (
        Range("1h", "1 hour", timedelta(hours=1), "raw"),
        Range("24h", "24 hours", timedelta(hours=24), "minute"),
        Range("7d", "7 days", timedelta(days=7), "hour"),
        Range("30d", "30 days", timedelta(days=30), "hour"),
    )
}
class EpochMs(Func):
    """A timestamp as integer milliseconds since the epoch: plotly draws them on a date axis like ISO strings, and
    the driver reads an integer several times faster than it parses a timestamp (a day of minutes for 8 GPUs is
    11,520 of them)."""

    output_field = BigIntegerField()

    def as_postgresql(self, compiler, connection, **extra):
        return self.as_sql(compiler, connection, template="(EXTRACT(EPOCH FROM %(expressions)s) * 1000)::bigint",
                           **extra)

    def as_sqlite(self, compiler, connection, **extra):
        return self.as_sql(compiler, connection,
                           template="CAST(ROUND((julianday(%(expressions)s) - 2440587.5) * 86400000.0) AS INTEGER)",
                           **extra)


_GPU_TIERS = {"raw": (GpuSample, "memory_used_mib"), "minute": (GpuMinute, "memory_used_mib_max"),
              "hour": (GpuHour, "memory_used_mib_max")}
_USAGE_TIERS = {"raw": UsageSample, "minute": UsageMinute, "hour": UsageHour}


def node_series(*, node: Node, range_key: str, now: datetime | None = None) -> dict:
    """Per-GPU utilization, memory, power and temperature, and per-endpoint tokens/s, over the range; times are
    epoch milliseconds (UTC)."""
    rng = RANGES[range_key]
    now = now or timezone.now()
    start = now - rng.span
    model, memory = _GPU_TIERS[rng.tier]
    gpus: dict[int, dict] = {}
    names = {gpu.pk: gpu.index for gpu in node.gpus.all()}
    rows = (model.objects.filter(gpu_id__in=list(names), ts__gte=start, ts__lt=now).order_by("gpu_id", "ts")
            .values_list("gpu_id", EpochMs("ts"), "util_mean", memory, "power_mean_w", "temp_max_c"))
    for gpu_id, ts, util, mem, power, temp in rows:
        series = gpus.setdefault(gpu_id, {"name": f"GPU {names[gpu_id]}", "ts": [], "util": [], "memory": [],
                                          "power": [], "temp": []})
        series["ts"].append(ts)
        series["util"].append(util)
        series["memory"].append(mem)
        series["power"].append(power)
        series["temp"].append(temp)
    endpoints = {e.pk: f"{e.model} ({e.url.split('//')[-1].split('/')[0]})" for e in node.endpoints.all()}
    seconds = {"raw": node.interval_s, "minute": 60, "hour": 3600}[rng.tier]
    tokens: dict[int, dict] = {}
    usage = (_USAGE_TIERS[rng.tier].objects.filter(endpoint_id__in=list(endpoints), ts__gte=start, ts__lt=now)
             .order_by("endpoint_id", "ts")
             .values_list("endpoint_id", EpochMs("ts"), "prompt_tokens", "generation_tokens"))
    for endpoint_id, ts, prompt, generation in usage:
        series = tokens.setdefault(endpoint_id, {"name": endpoints[endpoint_id], "ts": [], "tps": []})
        series["ts"].append(ts)
        series["tps"].append(round((prompt + generation) / seconds, 1))
    return {"range": rng, "gpus": [gpus[k] for k in sorted(gpus, key=lambda pk: names[pk])],
            "tokens": list(tokens.values())}
