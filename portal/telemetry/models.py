"""Telemetry storage tiers.

GpuSample (one row per GPU per agent interval, raw, kept 48 h) -> GpuMinute (30 days) -> GpuHour (kept).
UsageSample (exact token/request/histogram deltas per endpoint and interval, kept 48 h) -> UsageMinute and
UsageHour, both kept forever: usage is never dropped, billing reads the minute tier.
On PostgreSQL the two raw tiers are partitioned by UTC day of ts, with a DEFAULT partition for any day without one
(migration 0004, telemetry.partitions); the primary key there is (id, ts).
"""

from django.db import models


class IngestedBatch(models.Model):
    """One accepted agent batch. (node, seq) is unique, so a resend is acknowledged without being stored twice.

    The ingest request validates a batch and commits it here with its payload (one INSERT): from then on it is
    durable and acknowledged. The store worker (`batches_store`) writes the payloads of many batches into the
    storage tiers in one transaction, sets `stored_at` and drops the payload."""

    node = models.ForeignKey("fleet.Node", on_delete=models.CASCADE, related_name="+")
    seq = models.BigIntegerField()
    digest = models.CharField(max_length=64, help_text="SHA-256 of the canonical batch, to tell a resend from a clash")
    interval_start = models.DateTimeField()
    interval_end = models.DateTimeField()
    received_at = models.DateTimeField(db_index=True)
    gpu_count = models.PositiveSmallIntegerField()
    dropped_batches = models.PositiveIntegerField(default=0)
    payload = models.BinaryField(null=True, help_text="The validated batch as JSON, until the store worker took it")
    stored_at = models.DateTimeField(null=True, db_index=True, help_text="When its rows reached the storage tiers")
    store_error = models.TextField(blank=True, help_text="Why the store worker could not store it (payload kept)")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["node", "seq"], name="batch_node_seq_unique")]
        indexes = [
            models.Index(fields=["node", "received_at"]),
            # The store worker's queue: small, because stored rows leave it.
            models.Index(fields=["id"], condition=models.Q(stored_at__isnull=True), name="batch_pending"),
        ]


class GpuSample(models.Model):
    gpu = models.ForeignKey("fleet.Gpu", on_delete=models.CASCADE, related_name="+", db_index=False)
    ts = models.DateTimeField(help_text="Start of the agent interval")
    stored_at = models.DateTimeField(help_text="When the store worker wrote it; retention deletes only rolled-up rows")
    seconds = models.FloatField(help_text="Length of the interval")
    util_mean = models.FloatField(null=True)
    util_max = models.FloatField(null=True)
    mem_util_mean = models.FloatField(null=True)
    memory_used_mib = models.IntegerField(null=True)
    power_mean_w = models.FloatField(null=True)
    energy_mj = models.BigIntegerField(null=True)
    temp_max_c = models.FloatField(null=True)
    sm_clock_mhz = models.IntegerField(null=True)

    class Meta:
        indexes = [models.Index(fields=["gpu", "ts"]), models.Index(fields=["ts"])]


class _GpuRollup(models.Model):
    """Aggregates of GpuSample. util/power are time-weighted means; energy is summed (measured where the GPU has a
    counter, otherwise power x time, as the agent reported it)."""

    gpu = models.ForeignKey("fleet.Gpu", on_delete=models.CASCADE, related_name="+", db_index=False)
    ts = models.DateTimeField()
    seconds = models.FloatField(help_text="Seconds of samples covered")
    util_mean = models.FloatField(null=True)
    util_max = models.FloatField(null=True)
    mem_util_mean = models.FloatField(null=True)
    memory_used_mib_max = models.IntegerField(null=True)
    power_mean_w = models.FloatField(null=True)
    energy_mj = models.BigIntegerField(null=True)
    temp_max_c = models.FloatField(null=True)

    class Meta:
        abstract = True


class GpuMinute(_GpuRollup):
    class Meta:
        constraints = [models.UniqueConstraint(fields=["gpu", "ts"], name="gpuminute_gpu_ts_unique")]
        indexes = [models.Index(fields=["ts"])]


class GpuHour(_GpuRollup):
    class Meta:
        constraints = [models.UniqueConstraint(fields=["gpu", "ts"], name="gpuhour_gpu_ts_unique")]
        indexes = [models.Index(fields=["ts"])]


class _Usage(models.Model):
    endpoint = models.ForeignKey("fleet.ServingEndpoint", on_delete=models.PROTECT, related_name="+", db_index=False)
    ts = models.DateTimeField()
    prompt_tokens = models.BigIntegerField(default=0)
    generation_tokens = models.BigIntegerField(default=0)
    requests_ok = models.BigIntegerField(default=0)
    requests_failed = models.BigIntegerField(default=0)
    probes = models.PositiveIntegerField(default=0, help_text="Health probes in the period")
    probes_up = models.PositiveIntegerField(default=0)
    # Histogram deltas as {"le": [...], "counts": [...cumulative, +Inf last], "sum": float}.
    ttft = models.JSONField(null=True)
    itl = models.JSONField(null=True)
    e2e = models.JSONField(null=True)
    prefill = models.JSONField(null=True)
    decode = models.JSONField(null=True)

    class Meta:
        abstract = True


class UsageSample(_Usage):
    stored_at = models.DateTimeField(help_text="When the store worker wrote it; retention deletes only rolled-up rows")

    class Meta:
        indexes = [models.Index(fields=["endpoint", "ts"]), models.Index(fields=["ts"])]


class UsageMinute(_Usage):
    class Meta:
        constraints = [models.UniqueConstraint(fields=["endpoint", "ts"], name="usageminute_endpoint_ts_unique")]
        indexes = [models.Index(fields=["ts"])]


class UsageHour(_Usage):
    class Meta:
        constraints = [models.UniqueConstraint(fields=["endpoint", "ts"], name="usagehour_endpoint_ts_unique")]
        indexes = [models.Index(fields=["ts"])]


class RollupWatermark(models.Model):
    """How far (by batch store time) each rollup has processed. Re-running a rollup changes nothing."""

    name = models.CharField(max_length=32, unique=True)
    stored_until = models.DateTimeField()


class SiteHour(models.Model):
    """Per site and hour: the tokens its endpoints served. The economics pages read it beside the attribution tier
    (economics.CostHour, which holds the capacity and its cost), so fleet-wide figures over months touch a few
    thousand rows, not millions."""

    site = models.ForeignKey("fleet.Site", on_delete=models.CASCADE, related_name="+", db_index=False)
    ts = models.DateTimeField()
    prompt_tokens = models.BigIntegerField(default=0)
    generation_tokens = models.BigIntegerField(default=0)
    requests = models.BigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["site", "ts"], name="sitehour_site_ts_unique")]
        indexes = [models.Index(fields=["ts"])]
