"""Fleet metrics in Prometheus' exposition format, read from the database at scrape time."""

from collections.abc import Iterator

from django.db.models import Avg, Count, Sum
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from portal.alerts.models import Alert
from portal.fleet.models import Gpu, Node
from portal.telemetry.models import IngestedBatch, UsageMinute, UsageSample
from portal.telemetry.selectors import store_queue


class FleetCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        nodes = GaugeMetricFamily("tokenmill_nodes", "Nodes by site and status", labels=["site", "status"])
        for site, status, n in Node.objects.values_list("site__slug", "status").annotate(n=Count("id")):
            nodes.add_metric([site, status], n)
        yield nodes

        per_gpu = Gpu.objects.select_related("node__site").values_list(
            "uuid", "node__hostname", "node__site__slug", "name", "current_util", "current_power_w", "current_temp_c"
        )
        util = GaugeMetricFamily("tokenmill_gpu_utilization_percent", "Latest GPU utilization (interval mean)",
                                 labels=["gpu", "node", "site", "model"])
        power = GaugeMetricFamily("tokenmill_gpu_power_watts", "Latest GPU power draw (interval mean)",
                                  labels=["gpu", "node", "site", "model"])
        temp = GaugeMetricFamily("tokenmill_gpu_temperature_celsius", "Latest GPU temperature (interval max)",
                                 labels=["gpu", "node", "site", "model"])
        for uuid, host, site, name, u, p, t in per_gpu:
            labels = [uuid, host, site, name]
            if u is not None:
                util.add_metric(labels, u)
            if p is not None:
                power.add_metric(labels, p)
            if t is not None:
                temp.add_metric(labels, t)
        yield util
        yield power
        yield temp

        site_util = GaugeMetricFamily("tokenmill_site_utilization_percent", "Mean latest utilization per site",
                                      labels=["site"])
        for site, value in Gpu.objects.values_list("node__site__slug").annotate(u=Avg("current_util")):
            if value is not None:
                site_util.add_metric([site], value)
        yield site_util

        tokens = CounterMetricFamily("tokenmill_tokens", "Tokens served (rolled-up minutes plus raw not yet rolled)",
                                     labels=["site", "kind"])
        totals: dict[str, dict[str, int]] = {}
        for model in (UsageMinute, UsageSample):
            qs = model.objects.values_list("endpoint__node__site__slug").annotate(
                p=Sum("prompt_tokens"), g=Sum("generation_tokens"))
            if model is UsageSample:
                qs = qs.filter(ts__gte=_minute_watermark())
            else:
                qs = qs.filter(ts__lt=_minute_watermark())
            for site, p, g in qs:
                bucket = totals.setdefault(site, {"prompt": 0, "generation": 0})
                bucket["prompt"] += p or 0
                bucket["generation"] += g or 0
        for site, kinds in totals.items():
            for kind, value in kinds.items():
                tokens.add_metric([site, kind], value)
        yield tokens

        batches = CounterMetricFamily("tokenmill_ingested_batches", "Agent batches accepted")
        batches.add_metric([], IngestedBatch.objects.count())
        yield batches
        queue = GaugeMetricFamily("tokenmill_store_queue_batches",
                                  "Accepted batches not yet in the telemetry tiers: waiting for the store worker, or "
                                  "set aside with a store error (store_batches --retry-failed)", labels=["state"])
        waiting = store_queue()
        queue.add_metric(["waiting"], waiting.waiting)
        queue.add_metric(["failed"], waiting.set_aside)
        yield queue

        alerts = GaugeMetricFamily("tokenmill_open_alerts", "Open alerts by severity", labels=["severity"])
        for severity, n in Alert.objects.filter(resolved_at__isnull=True).values_list("severity").annotate(
                n=Count("id")):
            alerts.add_metric([severity], n)
        yield alerts


def _minute_watermark():
    from portal.telemetry.rollups import minute_rollup_covers_until

    return minute_rollup_covers_until()
