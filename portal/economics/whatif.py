"""What-if: the cost per million tokens and margin a site would reach at another utilization, allocation rate or
price, from a model fitted to the site's own measured hours (not from industry figures), and which part of a
change in cost per token each of its two causes explains.

Per GPU-hour on the books: fixed cost (capex + opex, economics.costmodel) is constant; energy is measured kWh per
GPU-hour, fitted as a line in utilization (least squares over the site's hours). Tokens = utilization x tokens per
busy GPU-hour, and tokens per busy GPU-hour is itself fitted as a line in utilization: at higher load engines run
larger batches, so each busy second yields more tokens. Two effects lower the cost per token as utilization rises:
  1. the fixed cost is spread over more busy hours: alone, it lowers cost per token by at most 1 - u1/u2 (from 50 %
     to 70 %, about 29 %);
  2. more tokens per busy GPU-hour at the higher load, as far as the site's own hours show it.
A claim such as "70 % utilization gives 40 % lower cost per token than 50 %" needs both; the what-if says how much
of it each explains on this site's data. Utilization cannot exceed the allocation rate; a capped input is said so.
"""

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from django.db.models import F, Sum

from portal.economics.costmodel import MILLION, energy_cost, fixed_per_gpu_hour
from portal.economics.models import CostHour
from portal.fleet.models import Site
from portal.telemetry.models import SiteHour


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope (slope 0 when x does not vary)."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return mean_y - slope * mean_x, slope


@dataclass(frozen=True)
class SiteModel:
    site: Site
    fixed_per_gpu_hour: Decimal
    kwh_idle: float
    kwh_per_util: float
    tokens_per_busy_idle: float  # tokens per busy GPU-hour, intercept of the fit in utilization
    tokens_per_busy_per_util: float  # and its slope: the batching effect
    measured_utilization: float
    utilization_range: tuple[float, float]  # of the hours the fits rest on
    hours: int  # how many measured site-hours the fits rest on
    points: list[tuple[float, float]]  # (utilization, cost per 1M tokens) per measured day

    def tokens_per_busy_gpu_hour(self, utilization: float) -> float:
        return max(0.0, self.tokens_per_busy_idle + self.tokens_per_busy_per_util * utilization)

    def energy_cost(self, utilization: float) -> Decimal:
        kwh = Decimal(str(max(0.0, self.kwh_idle + self.kwh_per_util * utilization)))
        return energy_cost(self.site, kwh)

    def cost_per_gpu_hour(self, utilization: float) -> Decimal:
        return self.fixed_per_gpu_hour + self.energy_cost(utilization)

    def cost_per_million(self, utilization: float, *, throughput_at: float | None = None) -> Decimal | None:
        """Cost per 1M tokens at `utilization`; with `throughput_at`, tokens per busy GPU-hour held at that load's
        value (the utilization effect alone)."""
        rate = self.tokens_per_busy_gpu_hour(utilization if throughput_at is None else throughput_at)
        tokens = Decimal(str(utilization * rate))
        if tokens <= 0:
            return None
        return (self.cost_per_gpu_hour(utilization) / tokens * MILLION).quantize(Decimal("0.0001"))


def site_model(*, site: Site, start: datetime, end: datetime) -> SiteModel | None:
    """The model of a site fitted to its hours in [start, end): capacity and energy from the attribution tier,
    tokens from the site tier."""
    capacity = {r["ts"]: r for r in CostHour.objects.filter(site=site, ts__gte=start, ts__lt=end).values("ts")
                .annotate(gpu_hours=Sum("gpu_hours"), busy=Sum("busy_gpu_hours"), kwh=Sum("energy_kwh")).order_by()}
    tokens = dict(SiteHour.objects.filter(site=site, ts__gte=start, ts__lt=end).values_list("ts").annotate(
        tokens=Sum(F("prompt_tokens") + F("generation_tokens"))).order_by())
    hours = [(ts, r) for ts, r in sorted(capacity.items()) if r["gpu_hours"] > 0]
    if len(hours) < 2:
        return None
    utils = [float(r["busy"] / r["gpu_hours"]) for _ts, r in hours]
    kwh_idle, kwh_per_util = _line(utils, [float(r["kwh"] / r["gpu_hours"]) for _ts, r in hours])
    served = [(u, tokens.get(ts, 0) / float(r["busy"])) for (ts, r), u in zip(hours, utils, strict=True)
              if r["busy"] > 0 and tokens.get(ts, 0) > 0]
    tpb_idle, tpb_slope = _line(*zip(*served, strict=True)) if len(served) >= 2 else (
        (served[0][1], 0.0) if served else (0.0, 0.0))
    gpu_hours = sum(float(r["gpu_hours"]) for _ts, r in hours)
    fixed = fixed_per_gpu_hour(site)
    days: dict[str, list] = {}
    for ts, r in hours:
        day = days.setdefault(f"{ts.astimezone(UTC):%Y-%m-%d}", [Decimal(0), Decimal(0), Decimal(0), 0])
        day[0] += r["busy"]
        day[1] += r["gpu_hours"]
        day[2] += r["kwh"]
        day[3] += tokens.get(ts, 0)
    # Measured, not modelled: each day's fixed cost plus the energy its GPUs actually used.
    points = [(float(busy / gpu_h), float((fixed * gpu_h + energy_cost(site, kwh)) / tok * MILLION))
              for busy, gpu_h, kwh, tok in days.values() if tok]
    return SiteModel(site=site, fixed_per_gpu_hour=fixed, kwh_idle=kwh_idle, kwh_per_util=kwh_per_util,
                     tokens_per_busy_idle=tpb_idle, tokens_per_busy_per_util=tpb_slope,
                     measured_utilization=sum(float(r["busy"]) for _ts, r in hours) / gpu_hours,
                     utilization_range=(min(u for u, _ in served), max(u for u, _ in served)) if served else (0, 0),
                     hours=len(served), points=points)


@dataclass(frozen=True)
class Effects:
    """How the cost per token changes from `low` to `high` utilization, and why."""

    low: float
    high: float
    total: float | None  # relative change of cost per token (negative: cheaper)
    utilization_alone: float | None  # with tokens per busy GPU-hour held at the low load's
    batching: float | None  # the rest: the measured gain in tokens per busy GPU-hour

    def supports(self, claimed_reduction: float) -> bool | None:
        return None if self.total is None else -self.total >= claimed_reduction


def effects(model: SiteModel, low: float, high: float) -> Effects:
    base = model.cost_per_million(low)
    alone = model.cost_per_million(high, throughput_at=low)
    both = model.cost_per_million(high)
    if not base or alone is None or both is None:
        return Effects(low, high, None, None, None)
    total, utilization_alone = float(both / base - 1), float(alone / base - 1)
    return Effects(low, high, total, utilization_alone, total - utilization_alone)


@dataclass(frozen=True)
class Scenario:
    utilization: float
    allocation: float
    capped_from: float | None  # the utilization asked for, when the allocation rate capped it
    outside_measured: bool  # beyond the utilizations the fits rest on: an extrapolation
    price_per_million: Decimal
    cost_per_million: Decimal | None
    margin: Decimal | None
    vs_measured: float | None
    vs_half: float | None
    from_half: Effects


def scenario(*, model: SiteModel, utilization: float, allocation: float, price_per_million: Decimal) -> Scenario:
    """Cost per million tokens and gross margin at these settings; the change against the site's measured
    utilization and against 50 % (a typical single-tenant cluster), split into its two causes."""
    capped_from = utilization if utilization > allocation else None
    utilization = min(utilization, allocation)
    cost = model.cost_per_million(utilization)
    margin = (price_per_million - cost) / price_per_million if cost is not None and price_per_million else None
    measured = model.cost_per_million(model.measured_utilization)
    half = model.cost_per_million(0.5)

    def change(reference: Decimal | None) -> float | None:
        return float(cost / reference - 1) if cost is not None and reference else None

    low, high = model.utilization_range
    return Scenario(utilization=utilization, allocation=allocation, capped_from=capped_from,
                    outside_measured=not low <= utilization <= high, price_per_million=price_per_million,
                    cost_per_million=cost, margin=margin, vs_measured=change(measured), vs_half=change(half),
                    from_half=effects(model, 0.5, utilization))
