"""Cost of running the factory, from each site's cost model and measured energy.

An hour of a site costs: installed GPUs x (capex / depreciation hours + other opex per GPU-hour) + measured energy
(kWh, from NVML's energy counter or integrated power) x PUE x price per kWh. Cost per million tokens is that cost
over the tokens served (input + output) x 10^6. Idle capacity cost is the fixed part (capex + opex) times the share
of GPU time not busy. Money is Decimal in the site's currency; sites in different currencies are never summed.
"""

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.db.models import F, Sum
from django.db.models.functions import Least, TruncDay
from django.utils import timezone

from portal.capacity.models import Deployment
from portal.economics.models import CostHour, DeploymentDay, DeploymentHour
from portal.fleet.models import Node, Site
from portal.telemetry.models import GpuHour, SiteHour, UsageHour, UsageSample
from portal.tenants.models import Tenant

HOURS_PER_MONTH = Decimal("730.5")
# Sums of the attributed-cost columns (economics.models._AttributedCost), under the short names Cost is built from.
COST_SUMS = {"g": Sum("gpu_hours"), "b": Sum("busy_gpu_hours"), "k": Sum("energy_kwh"), "c": Sum("capex"),
             "e": Sum("energy"), "o": Sum("opex")}
MJ_PER_KWH = Decimal(3_600_000_000)
MILLION = Decimal(1_000_000)
CENT = Decimal("0.01")


@dataclass
class Cost:
    """Cost and output of a scope over a period, in one currency."""

    currency: str
    capex: Decimal = Decimal(0)
    energy: Decimal = Decimal(0)
    opex: Decimal = Decimal(0)
    idle: Decimal = Decimal(0)
    tokens: int = 0
    gpu_hours: Decimal = Decimal(0)
    busy_gpu_hours: Decimal = Decimal(0)
    energy_kwh: Decimal = Decimal(0)

    @property
    def total(self) -> Decimal:
        return self.capex + self.energy + self.opex

    @property
    def per_million_tokens(self) -> Decimal | None:
        if not self.tokens:
            return None
        return (self.total / self.tokens * MILLION).quantize(Decimal("0.0001"))

    @property
    def tokens_per_unit(self) -> int | None:
        """Tokens per unit of currency (per dollar for USD)."""
        total = self.total
        return int(self.tokens / total) if total else None

    @property
    def utilization(self) -> float | None:
        return float(self.busy_gpu_hours / self.gpu_hours) if self.gpu_hours else None

    def add(self, other: "Cost") -> None:
        assert other.currency == self.currency
        for name in ("capex", "energy", "opex", "idle", "tokens", "gpu_hours", "busy_gpu_hours", "energy_kwh"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def hour_cost(*, site: Site, gpus: int, energy_mj: int, util_seconds: float, tokens: int,
              hours: Decimal = Decimal(1)) -> Cost:
    """The cost of `gpus` GPUs of `site` over `hours`, given what they reported."""
    gpu_hours = Decimal(gpus) * hours
    capex = gpu_hours * site.gpu_capex / (site.depreciation_months * HOURS_PER_MONTH)
    opex = gpu_hours * site.other_opex_gpu_hour
    kwh = Decimal(energy_mj) / MJ_PER_KWH
    busy = min(gpu_hours, Decimal(str(util_seconds)) / Decimal(360_000))  # util% x seconds -> busy GPU-hours
    idle_share = (gpu_hours - busy) / gpu_hours if gpu_hours else Decimal(0)
    return Cost(
        currency=site.currency, capex=capex, energy=kwh * site.pue * site.energy_price_kwh, opex=opex,
        idle=(capex + opex) * idle_share, tokens=tokens, gpu_hours=gpu_hours, busy_gpu_hours=busy, energy_kwh=kwh,
    )


@dataclass
class SitePeriod:
    site: Site
    cost: Cost
    daily: list[tuple[datetime, Cost]] = field(default_factory=list)


def site_costs(*, start: datetime, end: datetime, site_ids: list[int] | None = None) -> list[SitePeriod]:
    """Each site's cost over [start, end), with its daily breakdown, from the site tier summed per UTC day in the
    database (two queries; a month is ~30 rows per site). Summing hours first is exact: every term of hour_cost is
    linear in GPU-hours, energy and busy time, and busy time is capped at the installed GPU-hours hour by hour."""
    sites = {s.pk: s for s in Site.objects.filter(**({"pk__in": site_ids} if site_ids else {}))}
    out = {pk: SitePeriod(site=s, cost=Cost(currency=s.currency)) for pk, s in sites.items()}
    rows = (SiteHour.objects.filter(site_id__in=sites, ts__gte=start, ts__lt=end)
            .annotate(day=TruncDay("ts", tzinfo=UTC)).values("site_id", "day")
            .annotate(gpu_hours=Sum("gpus_installed"), energy=Sum("energy_mj"),
                      busy=Sum(Least("util_seconds", F("gpus_installed") * 360_000.0)),
                      tokens=Sum(F("prompt_tokens") + F("generation_tokens")))
            .order_by("day"))
    for row in rows:
        period = out[row["site_id"]]
        cost = hour_cost(site=period.site, gpus=row["gpu_hours"], energy_mj=row["energy"],
                         util_seconds=row["busy"], tokens=row["tokens"])
        period.cost.add(cost)
        period.daily.append((row["day"], cost))
    return sorted(out.values(), key=lambda p: p.site.name)


def costs_by_currency(periods: list[SitePeriod]) -> dict[str, Cost]:
    totals: dict[str, Cost] = {}
    for period in periods:
        totals.setdefault(period.cost.currency, Cost(currency=period.cost.currency)).add(period.cost)
    return dict(sorted(totals.items()))


def utilization_over(*, start: datetime, end: datetime) -> float | None:
    """Busy GPU-hours / installed GPU-hours over the period, fleet-wide, from the site tier."""
    agg = SiteHour.objects.filter(ts__gte=start, ts__lt=end).aggregate(u=Sum("util_seconds"),
                                                                       g=Sum("gpus_installed"))
    if not agg["g"]:
        return None
    return agg["u"] / (agg["g"] * 3600 * 100)


def tokens_per_second_now(*, window: timedelta = timedelta(seconds=60), now: datetime | None = None) -> float:
    now = now or timezone.now()
    agg = UsageSample.objects.filter(ts__gte=now - window - timedelta(seconds=10), ts__lt=now - timedelta(
        seconds=10)).aggregate(p=Sum("prompt_tokens"), g=Sum("generation_tokens"))
    return ((agg["p"] or 0) + (agg["g"] or 0)) / window.total_seconds()


def node_cost(*, node: Node, start: datetime, end: datetime) -> Cost:
    """A node's cost and tokens over [start, end) from its GPUs' hour tier and its endpoints' usage."""
    gpus = node.gpus.count()  # served from the prefetch cache when the caller prefetched the node's GPUs
    hours = Decimal((end - start).total_seconds()) / Decimal(3600)
    gpu = GpuHour.objects.filter(gpu__node=node, ts__gte=start, ts__lt=end).aggregate(
        e=Sum("energy_mj"), u=_util_seconds())
    usage = UsageHour.objects.filter(endpoint__node=node, ts__gte=start, ts__lt=end).aggregate(
        p=Sum("prompt_tokens"), g=Sum("generation_tokens"))
    return hour_cost(site=node.site, gpus=gpus, energy_mj=gpu["e"] or 0, util_seconds=gpu["u"] or 0,
                     tokens=(usage["p"] or 0) + (usage["g"] or 0), hours=hours)


def _util_seconds() -> Sum:
    return Sum(F("util_mean") * F("seconds"))


def utilization_vs_cost(periods: list[SitePeriod]) -> dict[str, list[tuple[float, Decimal, str]]]:
    """Per site, one point per day: (utilization, cost per million tokens, day) — the factory's own curve."""
    points: dict[str, list] = defaultdict(list)
    for period in periods:
        for day, cost in period.daily:
            if cost.utilization is not None and cost.per_million_tokens is not None:
                points[period.site.name].append((cost.utilization, cost.per_million_tokens, f"{day:%Y-%m-%d}"))
    return dict(points)


def attributed_costs(*, start: datetime, end: datetime) -> dict[tuple[int, int | None], Cost]:
    """Cost per (site, tenant) over [start, end) from the attribution tier; tenant None is idle capacity."""
    sites = {s.pk: s for s in Site.objects.all()}
    out = {}
    rows = (CostHour.objects.filter(ts__gte=start, ts__lt=end).values("site_id", "tenant_id")
            .annotate(**COST_SUMS))
    for r in rows:
        fixed = r["c"] + r["o"]
        idle = fixed if r["tenant_id"] is None else fixed * (1 - r["b"] / r["g"]) if r["g"] else Decimal(0)
        out[(r["site_id"], r["tenant_id"])] = Cost(
            currency=sites[r["site_id"]].currency, capex=r["c"], energy=r["e"], opex=r["o"], idle=idle,
            gpu_hours=r["g"], busy_gpu_hours=r["b"], energy_kwh=r["k"])
    return out


@dataclass
class DeploymentLine:
    deployment: Deployment
    cost: Cost

    @property
    def settings_label(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.deployment.settings.items())) or "defaults"


_HOUR_SUMS = {**COST_SUMS, "p": Sum("prompt_tokens"), "n": Sum("generation_tokens")}


def _cost_from_sums(currency: str, r: dict) -> Cost:
    idle = (r["c"] + r["o"]) * (1 - r["b"] / r["g"]) if r["g"] else Decimal(0)
    return Cost(currency=currency, capex=r["c"], energy=r["e"], opex=r["o"], idle=idle, tokens=r["p"] + r["n"],
                gpu_hours=r["g"], busy_gpu_hours=r["b"], energy_kwh=r["k"])


@dataclass(frozen=True)
class DeploymentCost:
    deployment_id: int
    model_name: str
    tenant_id: int
    site_id: int
    cost: Cost


DAY = timedelta(days=1)


def _day(ts: datetime) -> datetime:
    return ts.replace(hour=0, minute=0, second=0, microsecond=0)


def deployment_sums(*, start: datetime, end: datetime, group: tuple[str, ...], sums: dict) -> list[dict]:
    """`sums` of the deployment tier over [start, end), grouped by `group` (which may name "day"): whole UTC days
    from DeploymentDay and the partial days at either end from DeploymentHour, so the rows read grow with the
    deployments and days, not hours. Today's day row holds every hour attributed so far: it answers for the end
    of the period when no hour at or after `end` has been attributed. Rows of different tiers come back apart;
    callers add them up."""
    first = start if start == _day(start) else _day(start) + DAY
    last = _day(end)
    if first > last:
        return _grouped(DeploymentHour, start, end, group, sums)
    if last < end and not DeploymentHour.objects.filter(ts__gte=end, ts__lt=last + DAY).exists():
        last += DAY
    rows = _grouped(DeploymentDay, first, last, group, sums)
    for lo, hi in ((start, first), (last, end)):
        if lo < hi:
            rows += _grouped(DeploymentHour, lo, hi, group, sums)
    return rows


def _grouped(model, start: datetime, end: datetime, group: tuple[str, ...], sums: dict) -> list[dict]:
    rows = model.objects.filter(ts__gte=start, ts__lt=end)
    if "day" in group:
        rows = rows.annotate(day=TruncDay("ts", tzinfo=UTC))
    return list(rows.values(*group).annotate(**sums).order_by())


def deployment_costs(*, start: datetime, end: datetime) -> list[DeploymentCost]:
    """Every deployment's tokens and the cost of the capacity its units held over the period, from the daily and
    hourly attribution tiers (grouped by deployment alone: joining first would multiply the work by the rows
    scanned); the model, tenant and deployment views are all sums of these."""
    sums: dict[int, dict] = {}
    for row in deployment_sums(start=start, end=end, group=("deployment_id",), sums=_HOUR_SUMS):
        total = sums.setdefault(row["deployment_id"], dict.fromkeys(_HOUR_SUMS, 0))
        for name in _HOUR_SUMS:
            total[name] += row[name]
    facts = Deployment.objects.filter(pk__in=list(sums)).values_list(
        "pk", "model_name", "tenant_id", "node__site_id", "node__site__currency")
    return [DeploymentCost(deployment_id=pk, model_name=model, tenant_id=tenant, site_id=site,
                           cost=_cost_from_sums(currency, sums[pk])) for pk, model, tenant, site, currency in facts]


def deployment_ranking(*, costs: list[DeploymentCost], limit: int | None = None) -> list[DeploymentLine]:
    """Deployments ranked by tokens per unit of currency; only the `limit` shown are loaded as objects."""
    ranked = sorted(costs, key=lambda c: -(c.cost.tokens_per_unit or 0))[:limit]
    deployments = Deployment.objects.select_related("tenant", "node__site").in_bulk([c.deployment_id for c in ranked])
    return [DeploymentLine(deployment=deployments[c.deployment_id], cost=c.cost) for c in ranked]


def model_economics(*, costs: list[DeploymentCost]) -> list[tuple[str, Cost]]:
    """Cost and tokens per served model (and currency)."""
    models: dict[tuple[str, str], Cost] = {}
    for c in costs:
        models.setdefault((c.model_name, c.cost.currency), Cost(currency=c.cost.currency)).add(c.cost)
    return sorted(((name, cost) for (name, _currency), cost in models.items()), key=lambda item: item[0])


def tenant_economics(*, start: datetime, end: datetime, costs: list[DeploymentCost]) -> list[
        tuple[Tenant | None, Site, Cost]]:
    """Per tenant (and idle capacity) and site: attributed cost, tokens served there, cost per million tokens."""
    attributed = attributed_costs(start=start, end=end)
    tenants = {t.pk: t for t in Tenant.objects.filter(pk__in={k[1] for k in attributed if k[1]})}
    sites = {s.pk: s for s in Site.objects.all()}
    tokens: dict[tuple[int, int], int] = defaultdict(int)
    for c in costs:
        tokens[(c.site_id, c.tenant_id)] += c.cost.tokens
    out = []
    for (site_id, tenant_id), cost in attributed.items():
        if tenant_id is not None:
            cost.tokens = tokens.get((site_id, tenant_id), 0)
        out.append((tenants.get(tenant_id), sites[site_id], cost))
    return sorted(out, key=lambda row: (row[1].name, row[0] is None, row[0].name if row[0] else ""))
