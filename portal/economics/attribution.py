"""Who each GPU-hour belongs to, as a pure function of history: the inventory (when each GPU was on the books),
its measured hour (energy, utilization), the allocations and the deployment windows. Nothing here depends on when
or in what order those facts were recorded, or on how a range of hours is split into runs: re-attributing any
range yields the same figures. The writes (economics.services) and the node page (economics.selectors) call it.

Per GPU and hour: the GPU counts for the part of the hour it was on the books (its `presence`, in GPU-hours); a
tenant's share is the part of that time it held the GPU times its share of the GPU (a MIG instance: slices / 7);
what nobody held is idle. Each share takes the same fraction of the GPU-hour's cost (economics.costmodel): capex,
opex, the energy the GPU measured and its busy time. Within a tenant's share, a deployment gets the part of it in
which it was live on that allocation (the lowest id, when two share one unit); the rest stays the tenant's.
"""

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from portal.capacity.models import Allocation, Deployment
from portal.economics.costmodel import CAPACITY_FIELDS, ZERO, CapacityCost, capacity_cost, kwh
from portal.fleet.models import Site
from portal.fleet.selectors import GpuOnBooks
from portal.hours import HOUR

SECONDS_PER_HOUR = Decimal(3600)


@dataclass(frozen=True)
class Reading:
    energy_mj: int
    util_mean: float  # percent, time-weighted over the seconds reported
    seconds: float


@dataclass
class Attributed:
    """The attribution of some GPU-hours, in full precision: per (site, tenant or None = idle, hour) and per
    (deployment, hour), each a sum of CapacityCost parts."""

    tenants: dict[tuple[int, int | None, datetime], dict[str, Decimal]]
    deployments: dict[tuple[int, datetime], dict[str, Decimal]]


def _clip(lo: datetime, hi: datetime | None, a: datetime, b: datetime) -> tuple[datetime, datetime]:
    return max(lo, a), min(hi or b, b)


def _hours(lo: datetime, hi: datetime) -> Decimal:
    return Decimal((hi - lo).total_seconds()) / SECONDS_PER_HOUR if hi > lo else ZERO


def _minus(lo: datetime, hi: datetime, taken: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """[lo, hi) without the intervals already taken."""
    parts = [(lo, hi)]
    for t_lo, t_hi in taken:
        parts = [piece for p_lo, p_hi in parts
                 for piece in ((p_lo, min(p_hi, t_lo)), (max(p_lo, t_hi), p_hi)) if piece[1] > piece[0]]
    return parts


def _add(into: dict[str, Decimal], cost: CapacityCost) -> None:
    for name in CAPACITY_FIELDS:
        into[name] = into.get(name, ZERO) + getattr(cost, name)


def attribute(*, hours: Iterable[datetime], now: datetime, sites: dict[int, Site], gpus: list[GpuOnBooks],
              readings: dict[tuple[int, datetime], Reading], allocations: dict[int, list[Allocation]],
              deployments_of: dict[int, list[Deployment]]) -> Attributed:
    """Attribute `gpus` over `hours` (an hour still running counts up to `now`). `allocations` by GPU id,
    `deployments_of` by allocation id (sorted by id)."""
    out = Attributed(tenants=defaultdict(dict), deployments=defaultdict(dict))
    for hour in hours:
        end = min(hour + HOUR, now)
        for gpu in gpus:
            g_lo, g_hi = _clip(gpu.start, gpu.end, hour, end)
            present = _hours(g_lo, g_hi)
            if present <= 0:
                continue
            reading = readings.get((gpu.gpu_id, hour), Reading(0, 0.0, 0.0))
            busy = Decimal(str(reading.util_mean)) / 100 * Decimal(str(reading.seconds)) / SECONDS_PER_HOUR
            cost = capacity_cost(site=sites[gpu.site_id], gpu_hours=present, busy_gpu_hours=busy,
                                 energy_kwh=kwh(reading.energy_mj))
            held = ZERO
            for allocation in allocations.get(gpu.gpu_id, ()):
                a_lo, a_hi = _clip(allocation.starts_at, allocation.ends_at, g_lo, g_hi)
                slice_ = allocation.share
                weight = _hours(a_lo, a_hi) * slice_
                if weight <= 0:
                    continue
                held += weight
                share = cost.share(weight / present)
                _add(out.tenants[(gpu.site_id, allocation.tenant_id, hour)], share)
                taken: list[tuple[datetime, datetime]] = []
                for deployment in deployments_of.get(allocation.pk, ()):
                    d_lo, d_hi = _clip(deployment.active_from, deployment.ended_at, a_lo, a_hi)
                    # Two deployments on one unit at once: the first keeps the overlap (not split further).
                    parts = _minus(d_lo, d_hi, taken)
                    taken += parts
                    d_weight = sum((_hours(lo, hi) for lo, hi in parts), ZERO) * slice_
                    if d_weight > 0:
                        _add(out.deployments[(deployment.pk, hour)], cost.share(d_weight / present))
            _add(out.tenants[(gpu.site_id, None, hour)], cost.share(max(ZERO, present - held) / present))
    return out
