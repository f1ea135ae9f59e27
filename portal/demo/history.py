"""The demo factory's past, integrated from the simulated agents' own load model (agents.loadmodel): each node's
load curve, each GPU's share of it (idle while it serves no deployment), each endpoint's throughput and latency.
What a simulated agent reports from the moment `make demo` starts is the same model read live, so history flows
into live readings without a step. Every figure here is the model's expectation; the live agents add sampling
noise around it.

The one liberty taken with the past is growth: the factory ran at 55 % of today's load 30 days ago (tenants
onboarding), so the economics pages show it moving along its own cost curve.
"""

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from agents.config import SimulateConfig
from agents.loadmodel import (
    FAILED_SHARE,
    GEN_TOKENS_PER_REQUEST,
    PHASE_ENGINES,
    SIGMA,
    EndpointProfile,
    LoadCurve,
    endpoint_profile,
    gpu_factor,
    gpu_util,
    lognormal_hist,
    memory_used_mib,
    mig_memory_used_mib,
    power_w,
    temperature_c,
)
from agents.simulate import GPU_MODELS
from portal.capacity.models import Deployment
from portal.fleet.models import Gpu, Node, ServingEndpoint
from portal.hours import HOUR, hour_floor, hours_between
from portal.telemetry.bulk import insert_rows
from portal.telemetry.models import GpuHour, GpuMinute, UsageHour, UsageMinute
from portal.telemetry.rollups import hours_from_minutes

SIM_SEED = 42
LOAD_LEVEL = 0.78
SAMPLES_PER_HOUR = 12  # one per 5-minute bucket of the load curve's noise


@dataclass
class NodePlan:
    """What a demo node's simulated agent runs with, and when each GPU and endpoint served."""

    node: Node
    model_key: str
    mig: bool
    gpus: int = 8
    capacity: dict[str, float] = field(default_factory=dict)  # endpoint URL -> generation tokens/s at full load
    serving: dict[int, list[tuple[datetime, datetime | None]]] = field(default_factory=dict)  # GPU index -> windows
    live: dict[str, tuple[datetime, datetime | None]] = field(default_factory=dict)  # endpoint URL -> window

    def sim(self, *, now: datetime, unbillable: tuple[str, ...] = ()) -> SimulateConfig:
        serving = tuple(sorted(i for i, windows in self.serving.items() if _within(windows, now)))
        return SimulateConfig(gpus=self.gpus, gpu_model=self.model_key, mig=self.mig, seed=SIM_SEED, load=LOAD_LEVEL,
                              driver_version=self.node.driver_version, unbillable=unbillable, serving_gpus=serving,
                              capacity=tuple(sorted(self.capacity.items())))


def _within(windows: list[tuple[datetime, datetime | None]], t: datetime) -> bool:
    return any(lo <= t and (hi is None or t < hi) for lo, hi in windows)


def plan_nodes(*, nodes: list[Node], capacity: dict[tuple[int, str], float]) -> list[NodePlan]:
    """Each node's plan from its deployments: a GPU serves while a deployment holding it is live."""
    plans = {n.pk: NodePlan(node=n, model_key=n.model_key, mig=Gpu.objects.filter(node=n, mig_mode=True).exists())
             for n in nodes}
    for (node_id, url), tps in capacity.items():
        plans[node_id].capacity[url] = tps
    for d in Deployment.objects.filter(node__in=nodes).prefetch_related("allocations__gpu"):
        plan = plans[d.node_id]
        plan.live[d.metrics_url] = (d.active_from, d.ended_at)
        for a in d.allocations.all():
            lo = max(a.starts_at, d.active_from)
            hi = min((t for t in (a.ends_at, d.ended_at) if t is not None), default=None)
            plan.serving.setdefault(a.gpu.index, []).append((lo, hi))
    return list(plans.values())


def growth(t: datetime, now: datetime) -> float:
    return 0.55 + 0.45 * max(0.0, 1 - (now - t) / timedelta(days=30))


@dataclass
class _Span:
    """Samples of one node over one period (an hour or a minute): the load at each sample's midpoint."""

    ts: datetime
    seconds: float
    loads: list[tuple[datetime, float]]

    @property
    def step(self) -> float:
        return self.seconds / len(self.loads)


def _spans(curve: LoadCurve, starts: list[datetime], seconds: float, samples: int, now: datetime) -> list[_Span]:
    out = []
    for ts in starts:
        step = seconds / samples
        points = [ts + timedelta(seconds=(k + 0.5) * step) for k in range(samples)]
        out.append(_Span(ts, seconds, [(p, curve(p.timestamp()) * growth(p, now)) for p in points]))
    return out


def _gpu_row(gpu: Gpu, plan: NodePlan, factor: float, span: _Span) -> dict:
    model = GPU_MODELS[plan.model_key]
    windows = plan.serving.get(gpu.index, [])
    utils = [gpu_util(load, factor, _within(windows, t)) for t, load in span.loads]
    powers = [power_w(model.idle_w, model.power_limit_w, u) for u in utils]
    util = sum(utils) / len(utils)
    serving = _within(windows, span.ts + timedelta(seconds=span.seconds - 1))
    if gpu.mig_mode:  # NVML reports no utilization in MIG mode; memory is the instances'
        memory = sum(mig_memory_used_mib(model.mig_memory_mib[m.profile], serving) for m in gpu.mig_instances.all())
    else:
        memory = memory_used_mib(model.memory_mib, serving)
    return {"gpu_id": gpu.pk, "ts": span.ts, "seconds": span.seconds,
            "util_mean": None if gpu.mig_mode else round(util, 2),
            "util_max": None if gpu.mig_mode else round(max(utils), 2),
            "mem_util_mean": None if gpu.mig_mode else round(util * 0.35, 2), "memory_used_mib_max": memory,
            "power_mean_w": round(sum(powers) / len(powers), 1),
            "energy_mj": int(sum(p * span.step * 1000 for p in powers)), "temp_max_c": round(temperature_c(util), 1)}


def _usage_row(endpoint: ServingEndpoint, profile: EndpointProfile, billable: bool, window, span: _Span) -> dict:
    lo, hi = window
    live = [(t, load) for t, load in span.loads if lo <= t and (hi is None or t < hi)]
    generation = int(sum(profile.generation_tps(load) * span.step for _t, load in live))
    load = sum(x for _t, x in live) / len(live) if live else 0.0
    requests = generation // GEN_TOKENS_PER_REQUEST
    failed = round(requests * FAILED_SHARE)
    probes = int(span.step * len(live)) // 10

    def histogram(name: str, le: tuple[float, ...], median: float) -> dict:
        counts, total = lognormal_hist(le, requests, median, SIGMA[name])
        return {"le": list(le), "counts": counts, "sum": round(total, 3)}

    medians = profile.medians(load, phases=endpoint.engine in PHASE_ENGINES)

    return {"endpoint_id": endpoint.pk, "ts": span.ts,
            "prompt_tokens": round(generation * profile.prompt_ratio) if billable else 0,
            "generation_tokens": generation if billable else 0, "requests_ok": requests - failed,
            "requests_failed": failed, "probes": probes, "probes_up": probes,
            "prefill": None, "decode": None,  # engines without phase times (every row has the same keys)
            **{name: histogram(name, le, median) for name, (le, median) in medians.items()}}


def write_history(*, plans: list[NodePlan], now: datetime, start: datetime, minute_hours: int) -> list[datetime]:
    """GpuHour/UsageHour rows for every hour from `start` before the minute tier, GpuMinute/UsageMinute rows for
    the whole hours up to now, and the hour tier of those hours rolled up from the minutes as the rollup would.
    Returns the hours written."""
    hours = hours_between(start, now)
    minute_start = max(start, hour_floor(now - timedelta(hours=minute_hours)))
    minutes = [minute_start + timedelta(minutes=m) for m in range(int((now - minute_start).total_seconds()) // 60)]
    past = [h for h in hours if h < minute_start]
    gpu_hours, gpu_minutes, usage_hours, usage_minutes = [], [], [], []
    for plan in plans:
        node = plan.node
        curve = LoadCurve(SimulateConfig(seed=SIM_SEED, load=LOAD_LEVEL), node.hostname)
        hour_spans = _spans(curve, past, 3600.0, SAMPLES_PER_HOUR, now)
        minute_spans = _spans(curve, minutes, 60.0, 1, now)
        unbillable = set(ServingEndpoint.objects.filter(node=node, unbillable_since__isnull=False)
                         .values_list("url", flat=True))
        for gpu in Gpu.objects.filter(node=node).prefetch_related("mig_instances").order_by("index"):
            factor = gpu_factor(SIM_SEED, node.hostname, gpu.index)
            gpu_hours += [_gpu_row(gpu, plan, factor, span) for span in hour_spans]
            gpu_minutes += [_gpu_row(gpu, plan, factor, span) for span in minute_spans]
        for endpoint in ServingEndpoint.objects.filter(node=node, url__in=plan.live):
            profile = endpoint_profile(SIM_SEED, node.hostname, endpoint.url, plan.capacity.get(endpoint.url))
            window, billable = plan.live[endpoint.url], endpoint.url not in unbillable
            usage_hours += [_usage_row(endpoint, profile, billable, window, s) for s in hour_spans
                            if window[0] < s.ts + HOUR]
            usage_minutes += [_usage_row(endpoint, profile, billable, window, s) for s in minute_spans
                              if window[0] < s.ts + timedelta(minutes=1)]
    insert_rows(GpuHour, gpu_hours)
    insert_rows(GpuMinute, gpu_minutes)
    insert_rows(UsageHour, usage_hours)
    insert_rows(UsageMinute, usage_minutes)
    hours_from_minutes(node_ids=[p.node.pk for p in plans], start=minute_start, end=now)
    _current_readings(gpu_minutes)
    return hours


def _current_readings(minute_rows: list[dict]) -> None:
    """The grid shows current readings before the first agent batch: each GPU's last seeded minute."""
    latest = {row["gpu_id"]: row for row in minute_rows}
    gpus = list(Gpu.objects.filter(pk__in=latest))
    for gpu in gpus:
        row = latest[gpu.pk]
        gpu.current_util, gpu.current_power_w, gpu.current_temp_c = (row["util_mean"], row["power_mean_w"],
                                                                     row["temp_max_c"])
        gpu.current_memory_used_mib, gpu.current_at = row["memory_used_mib_max"], row["ts"].astimezone(UTC)
    Gpu.objects.bulk_update(gpus, ["current_util", "current_power_w", "current_temp_c", "current_memory_used_mib",
                                   "current_at"])
