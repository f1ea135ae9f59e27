"""The isolation report: what a tenant holds and who it shares hardware with.

Per unit the tenant holds now: a whole GPU or a MIG instance (its profile, the physical GPU it is on and what other
tenants hold of that GPU), and the GPU's confidential-computing mode as its agent last reported it (agents/nvml.py
`_cc_mode`; blank where the driver has no CC support). A tenant is told how many other tenants share a GPU and how
many slices they hold, never who they are; operators see names.

The noisy-neighbour view sets, per hour, the tenant's TTFT p95 on its deployments that run on shared GPUs (merged
histogram buckets, the SLA pages' quantile) against its co-tenants' load on those GPUs: their tokens/s, each
co-tenant deployment counted for the share of its capacity held on the shared GPUs (the economics rule: a
deployment's figures are proportional to the capacity its units hold), and the GPUs' mean power draw (NVML reports
no utilization in MIG mode).
"""

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from portal.capacity.models import GPU_SLICES, Allocation, Deployment
from portal.capacity.selectors import allocations_at, allocations_overlapping, deployment_windows, owned_usage
from portal.hours import HOUR, hour_floor, hours_between
from portal.telemetry.histograms import merge, quantile
from portal.telemetry.models import GpuHour
from portal.tenants.models import Tenant

TTFT_QUANTILE = 0.95
NOISY_HOURS = 24


def noisy_window(*, now: datetime) -> tuple[datetime, datetime]:
    """The pages' noisy-neighbour window: the last 24 hours, from a whole hour up to now."""
    return hour_floor(now) - (NOISY_HOURS - 1) * HOUR, now


@dataclass(frozen=True)
class Neighbour:
    """Another tenant holding slices of the same physical GPU (named to operators only)."""

    name: str
    slices: int


@dataclass
class IsolationUnit:
    allocation_id: int
    site: str
    node: str
    gpu_index: int
    gpu_name: str
    gpu_uuid: str
    profile: str | None  # None: the whole GPU
    gi_id: int | None
    slices: int  # of the GPU's 7; a whole GPU holds all 7
    since: datetime
    cc_mode: str  # as NVML reported it: "on", "off", "devtools", "on, GPUs not ready"; "" when not reported
    deployments: list[str]
    own_slices_on_gpu: int  # this unit and the tenant's other units on the same GPU
    other_tenants: int
    other_slices: int
    neighbours: list[Neighbour] = field(default_factory=list)  # empty unless the viewer is an operator

    @property
    def whole(self) -> bool:
        return self.profile is None

    @property
    def free_slices(self) -> int:
        return GPU_SLICES - self.own_slices_on_gpu - self.other_slices

    @property
    def shared_label(self) -> str:
        """What a tenant is told: "2 other tenants, 4 of 7 slices", or that no other tenant is on the GPU."""
        if self.whole:
            return "not shared: the whole GPU"
        if not self.other_tenants:
            return "no other tenant"
        tenants = "1 other tenant" if self.other_tenants == 1 else f"{self.other_tenants} other tenants"
        return f"{tenants}, {self.other_slices} of {GPU_SLICES} slices"


@dataclass
class IsolationReport:
    tenant: Tenant
    now: datetime
    units: list[IsolationUnit]

    @property
    def shared_units(self) -> int:
        return sum(1 for u in self.units if u.other_tenants)

    @property
    def cc_counts(self) -> dict[str, int]:
        """Units per reported CC mode ("not reported" for a blank one)."""
        counts: dict[str, int] = defaultdict(int)
        for unit in self.units:
            counts[unit.cc_mode or "not reported"] += 1
        return dict(sorted(counts.items()))


def _slices(allocation: Allocation) -> int:
    return allocation.mig_instance.slices if allocation.mig_instance_id else GPU_SLICES


def isolation_for_tenant(*, tenant: Tenant, now: datetime, viewer_is_operator: bool) -> IsolationReport:
    """Every unit the tenant holds at `now`, with what other tenants hold of the same physical GPU (their names
    only when the viewer is an operator)."""
    held = list(allocations_at(at=now).filter(tenant=tenant)
                .select_related("gpu__node__site", "mig_instance")
                .prefetch_related("deployments")
                .order_by("gpu__node__hostname", "gpu__index", "slot_lo"))
    gpu_ids = {a.gpu_id for a in held}
    own_on_gpu: dict[int, int] = defaultdict(int)
    for allocation in held:
        own_on_gpu[allocation.gpu_id] += _slices(allocation)
    others: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for allocation in (allocations_at(at=now).filter(gpu_id__in=gpu_ids).exclude(tenant=tenant)
                       .select_related("tenant", "mig_instance")):
        others[allocation.gpu_id][allocation.tenant.name] += _slices(allocation)
    units = []
    for a in held:
        gpu, mig, sharing = a.gpu, a.mig_instance, others.get(a.gpu_id, {})
        live = [d.name for d in a.deployments.all()
                if d.active_from <= now and (d.ended_at is None or d.ended_at > now)]
        units.append(IsolationUnit(
            allocation_id=a.pk, site=gpu.node.site.name, node=gpu.node.hostname, gpu_index=gpu.index,
            gpu_name=gpu.name, gpu_uuid=gpu.uuid, profile=mig.profile if mig else None,
            gi_id=mig.gi_id if mig else None, slices=_slices(a), since=a.starts_at, cc_mode=gpu.cc_mode,
            deployments=sorted(live), own_slices_on_gpu=own_on_gpu[a.gpu_id], other_tenants=len(sharing),
            other_slices=sum(sharing.values()),
            neighbours=[Neighbour(name=name, slices=n) for name, n in sorted(sharing.items())]
            if viewer_is_operator else [],
        ))
    return IsolationReport(tenant=tenant, now=now, units=units)


@dataclass(frozen=True)
class NoisyHour:
    hour: datetime
    ttft_p95_s: float | None  # the tenant's, on its deployments on shared GPUs
    requests: int  # the tenant's requests the quantile rests on
    co_tokens_per_s: float | None  # co-tenants' tokens/s on the shared GPUs; None when none of them served
    gpu_power_w: float | None  # mean power of the shared GPUs over the hour


@dataclass
class NoisyNeighbours:
    start: datetime
    end: datetime
    shared_gpus: int
    co_tenants: int
    co_tenant_names: list[str]  # empty unless the viewer is an operator
    hours: list[NoisyHour]

    @property
    def correlation(self) -> float | None:
        """Pearson's r between the tenant's TTFT p95 and its co-tenants' tokens/s over the hours that have both;
        None with fewer than 3 such hours or a constant series."""
        pairs = [(h.ttft_p95_s, h.co_tokens_per_s) for h in self.hours
                 if h.ttft_p95_s is not None and h.co_tokens_per_s is not None]
        if len(pairs) < 3:
            return None
        xs, ys = zip(*pairs, strict=True)
        if len(set(xs)) < 2 or len(set(ys)) < 2:
            return None
        return statistics.correlation(xs, ys)


def noisy_neighbours(*, tenant: Tenant, start: datetime, end: datetime, now: datetime,
                     viewer_is_operator: bool = False) -> NoisyNeighbours:
    """Per hour of [start, end): the tenant's TTFT p95 on the GPUs it shares with other tenants, against those
    tenants' load on the same GPUs (tokens/s and the GPUs' mean power)."""
    own_gpus = set(allocations_overlapping(tenant=tenant, start=start, end=end).filter(mig_instance__isnull=False)
                   .values_list("gpu_id", flat=True))
    co_allocations = list(allocations_overlapping(start=start, end=end).filter(gpu_id__in=own_gpus)
                          .exclude(tenant=tenant).select_related("tenant"))
    shared = {a.gpu_id for a in co_allocations}
    names = sorted({a.tenant.name for a in co_allocations})
    own = list(Deployment.objects.filter(tenant=tenant, allocations__gpu_id__in=shared).distinct())
    co = list(Deployment.objects.filter(allocations__in=co_allocations).distinct()
              .prefetch_related("allocations__mig_instance"))

    latency: dict[datetime, dict | None] = {}
    for _window, ts, ttft in owned_usage(windows=deployment_windows(own, start, end), now=now, fields=("ttft",)):
        hour = hour_floor(ts)
        latency[hour] = merge(latency.get(hour), ttft)

    share = {d.pk: _share_on(d, shared, start, end) for d in co}
    tokens: dict[datetime, float] = defaultdict(float)
    served: set[datetime] = set()
    for w, ts, prompt, generation in owned_usage(windows=deployment_windows(co, start, end), now=now,
                                                 fields=("prompt_tokens", "generation_tokens")):
        hour = hour_floor(ts)
        tokens[hour] += float((prompt + generation) * share[w.deployment_id])
        served.add(hour)

    power: dict[datetime, list[float]] = defaultdict(list)
    for ts, watts in GpuHour.objects.filter(gpu_id__in=shared, ts__gte=hour_floor(start), ts__lt=end,
                                            power_mean_w__isnull=False).values_list("ts", "power_mean_w"):
        power[ts].append(watts)

    hours = []
    for hour in hours_between(start, min(end, now)):
        seconds = (min(hour + HOUR, end, now) - max(hour, start)).total_seconds()
        h = latency.get(hour)
        hours.append(NoisyHour(
            hour=hour, ttft_p95_s=quantile(TTFT_QUANTILE, h), requests=h["counts"][-1] if h else 0,
            co_tokens_per_s=tokens[hour] / seconds if hour in served and seconds > 0 else None,
            gpu_power_w=sum(power[hour]) / len(power[hour]) if power.get(hour) else None,
        ))
    return NoisyNeighbours(start=start, end=end, shared_gpus=len(shared), co_tenants=len(names),
                           co_tenant_names=names if viewer_is_operator else [], hours=hours)


def _share_on(deployment: Deployment, gpu_ids: set[int], start: datetime, end: datetime) -> Decimal:
    """The part of a deployment's capacity (unit_share summed over its units held in the window) that is on
    `gpu_ids`: its tokens count for that part of the shared GPUs' load."""
    held = [a for a in deployment.allocations.all()
            if a.starts_at < end and (a.ends_at is None or a.ends_at > start)]
    total = sum((a.share for a in held), Decimal(0))
    on = sum((a.share for a in held if a.gpu_id in gpu_ids), Decimal(0))
    return on / total if total else Decimal(0)
