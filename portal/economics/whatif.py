"""What-if: the cost per million tokens and margin a site would reach at another utilization, allocation rate or
price, from a model fitted to the site's own measured month (not from industry figures).

Per installed GPU-hour: fixed cost (capex + opex) is constant; energy is measured kWh per GPU-hour fitted as a
line in utilization (least squares over the site's hours); tokens grow with busy GPU-hours at the site's measured
tokens per busy GPU-hour. Utilization cannot exceed the allocation rate (only allocated GPUs serve tenants)."""

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from portal.economics.selectors import HOURS_PER_MONTH, MILLION, MJ_PER_KWH
from portal.fleet.models import Site
from portal.telemetry.models import SiteHour


@dataclass(frozen=True)
class SiteModel:
    site: Site
    fixed_per_gpu_hour: Decimal
    kwh_idle: float
    kwh_per_util: float
    tokens_per_busy_gpu_hour: float
    measured_utilization: float
    points: list[tuple[float, float]]  # (utilization, cost per 1M tokens) per measured day

    def energy_cost(self, utilization: float) -> Decimal:
        kwh = Decimal(str(max(0.0, self.kwh_idle + self.kwh_per_util * utilization)))
        return kwh * self.site.pue * self.site.energy_price_kwh

    def cost_per_gpu_hour(self, utilization: float) -> Decimal:
        return self.fixed_per_gpu_hour + self.energy_cost(utilization)

    def cost_per_million(self, utilization: float) -> Decimal | None:
        tokens = Decimal(str(utilization * self.tokens_per_busy_gpu_hour))
        if tokens <= 0:
            return None
        return (self.cost_per_gpu_hour(utilization) / tokens * MILLION).quantize(Decimal("0.0001"))


def site_model(*, site: Site, start: datetime, end: datetime) -> SiteModel | None:
    rows = list(SiteHour.objects.filter(site=site, ts__gte=start, ts__lt=end, gpus_installed__gt=0).values_list(
        "ts", "gpus_installed", "util_seconds", "energy_mj", "prompt_tokens", "generation_tokens"))
    if len(rows) < 2:
        return None
    xs, ys = [], []
    busy_total, tokens_total, gpu_hours = 0.0, 0, 0
    days: dict[str, list[float]] = {}
    for ts, gpus, util_seconds, energy_mj, prompt, generation in rows:
        util = util_seconds / (gpus * 3600 * 100)
        xs.append(util)
        ys.append(energy_mj / float(MJ_PER_KWH) / gpus)
        busy_total += util * gpus
        tokens_total += prompt + generation
        gpu_hours += gpus
        day = days.setdefault(f"{ts:%Y-%m-%d}", [0.0, 0, 0, 0])
        day[0] += util * gpus
        day[1] += gpus
        day[2] += prompt + generation
        day[3] += energy_mj
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    fixed = site.gpu_capex / (site.depreciation_months * HOURS_PER_MONTH) + site.other_opex_gpu_hour
    model = SiteModel(
        site=site, fixed_per_gpu_hour=fixed, kwh_idle=mean_y - slope * mean_x, kwh_per_util=slope,
        tokens_per_busy_gpu_hour=tokens_total / busy_total if busy_total else 0.0,
        measured_utilization=busy_total / gpu_hours, points=[],
    )
    points = []
    for busy, gpus, tokens, energy_mj in days.values():
        if tokens:
            # Measured, not modelled: the day's fixed cost plus the energy its GPUs actually used.
            cost = fixed * gpus + Decimal(energy_mj) / MJ_PER_KWH * site.pue * site.energy_price_kwh
            points.append((busy / gpus, float(cost / tokens * MILLION)))
    return SiteModel(**{**model.__dict__, "points": points})


@dataclass(frozen=True)
class Scenario:
    utilization: float
    allocation: float
    price_per_million: Decimal
    cost_per_million: Decimal | None
    margin: Decimal | None
    vs_measured: float | None
    vs_half: float | None


def scenario(*, model: SiteModel, utilization: float, allocation: float, price_per_million: Decimal) -> Scenario:
    """Cost per million tokens and gross margin at these settings; the change against the site's measured
    utilization and against 50% (a typical single-tenant cluster)."""
    utilization = min(utilization, allocation)
    cost = model.cost_per_million(utilization)
    margin = (price_per_million - cost) / price_per_million if cost is not None and price_per_million else None
    measured = model.cost_per_million(model.measured_utilization)
    half = model.cost_per_million(0.5)

    def change(reference: Decimal | None) -> float | None:
        return float(cost / reference - 1) if cost is not None and reference else None

    return Scenario(utilization=utilization, allocation=allocation, price_per_million=price_per_million,
                    cost_per_million=cost, margin=margin, vs_measured=change(measured), vs_half=change(half))
