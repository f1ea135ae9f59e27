"""Reads of the factory's cost: per site, tenant, deployment, model and node, from the attribution tier (CostHour,
DeploymentHour/Day: every GPU-hour on the books, economics.attribution) and the usage tiers. The cost of a
GPU-hour is economics.costmodel's. Cost per million tokens is a scope's cost over the tokens it served (input +
output) x 10^6. Money is Decimal in the site's currency; sites in different currencies are never summed.
"""

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.core.cache import cache
from django.db.models import Count, F, Q, Sum
from django.db.models.functions import TruncDay
from django.utils import timezone

from portal.capacity.models import Allocation, Deployment
from portal.capacity.selectors import last_complete_minute, usage_tiers
from portal.economics.attribution import Reading, attribute
from portal.economics.costmodel import CAPACITY_FIELDS, JOULES_PER_KWH, MILLION, ZERO
from portal.economics.models import CostHour, DeploymentDay, DeploymentHour
from portal.economics.split import TokenTypeCost, cost_split
from portal.fleet.models import Node, Site
from portal.fleet.selectors import gpus_on_books
from portal.hours import DAY, day_ceil, day_floor, hour_ceil, hours_between
from portal.telemetry.models import GpuHour, RollupWatermark, SiteHour, UsageMinute, UsageSample
from portal.tenants.models import Tenant

# Sums of the attributed-cost columns (economics.models._AttributedCost), under their own names.
COST_SUMS = {name: Sum(name) for name in CAPACITY_FIELDS}


@dataclass
class Cost:
    """Cost and output of a scope over a period, in one currency. `idle` is the cost of capacity no tenant held
    (the same meaning on every page); `not_busy` the fixed cost of held-or-not GPU time that did no work."""

    currency: str
    capex: Decimal = ZERO
    energy: Decimal = ZERO
    opex: Decimal = ZERO
    idle: Decimal = ZERO
    tokens: int = 0
    gpu_hours: Decimal = ZERO
    busy_gpu_hours: Decimal = ZERO
    energy_kwh: Decimal = ZERO
    output_tokens: int = 0  # of `tokens`, the generated (decode) ones

    @property
    def total(self) -> Decimal:
        return self.capex + self.energy + self.opex

    @property
    def not_busy(self) -> Decimal:
        if not self.gpu_hours:
            return ZERO
        return (self.capex + self.opex) * (1 - self.busy_gpu_hours / self.gpu_hours)

    @property
    def per_million_tokens(self) -> Decimal | None:
        if not self.tokens:
            return None
        return (self.total / self.tokens * MILLION).quantize(Decimal("0.0001"))

    @property
    def kwh_per_million_tokens(self) -> Decimal | None:
        """The GPUs' measured energy (NVML's counter, or power integrated) per million tokens, input and output;
        the facility's is this x the site's PUE."""
        if not self.tokens:
            return None
        return (self.energy_kwh / self.tokens * MILLION).quantize(Decimal("0.0001"))

    @property
    def joules_per_output_token(self) -> Decimal | None:
        """The same energy per generated token, as energy-per-token benchmarks report it."""
        if not self.output_tokens:
            return None
        return (self.energy_kwh * JOULES_PER_KWH / self.output_tokens).quantize(Decimal("0.0001"))

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
        for name in ("capex", "energy", "opex", "idle", "tokens", "gpu_hours", "busy_gpu_hours", "energy_kwh",
                     "output_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def cost_of(currency: str, sums: dict, *, idle: Decimal = ZERO, tokens: int = 0, output_tokens: int = 0) -> Cost:
    """A Cost from the attributed-cost sums (COST_SUMS' names)."""
    return Cost(currency=currency, capex=sums["capex"] or ZERO, energy=sums["energy"] or ZERO,
                opex=sums["opex"] or ZERO, idle=idle, tokens=tokens, gpu_hours=sums["gpu_hours"] or ZERO,
                busy_gpu_hours=sums["busy_gpu_hours"] or ZERO, energy_kwh=sums["energy_kwh"] or ZERO,
                output_tokens=output_tokens)


def attribution_inputs(*, start: datetime, end: datetime, node_id: int | None = None) -> dict:
    """What attribution reads for [start, end): sites, the GPUs on the books (of one node, if given), their hour
    readings, the allocations of those GPUs and the deployments on each allocation (by id)."""
    gpus = gpus_on_books(start=start, end=end, node_id=node_id)
    ids = [g.gpu_id for g in gpus]
    readings = {(g, ts): Reading(energy or 0, util or 0.0, seconds or 0.0) for g, ts, energy, util, seconds in
                GpuHour.objects.filter(gpu_id__in=ids, ts__gte=start, ts__lt=end).values_list(
                    "gpu_id", "ts", "energy_mj", "util_mean", "seconds")}
    allocations: dict[int, list[Allocation]] = defaultdict(list)
    for a in (Allocation.objects.filter(gpu_id__in=ids, starts_at__lt=end)
              .filter(Q(ends_at__isnull=True) | Q(ends_at__gt=start)).select_related("mig_instance").order_by("pk")):
        allocations[a.gpu_id].append(a)
    deployments_of: dict[int, list[Deployment]] = defaultdict(list)
    live = Deployment.objects.filter(active_from__lt=end).filter(Q(ended_at__isnull=True) | Q(ended_at__gt=start))
    if node_id is not None:  # a deployment runs on units of its own node (capacity.services.deployment_create)
        live = live.filter(node_id=node_id)
    for deployment in live.prefetch_related("allocations").order_by("pk"):
        for allocation in deployment.allocations.all():
            deployments_of[allocation.pk].append(deployment)
    return {"sites": {s.pk: s for s in Site.objects.all()}, "gpus": gpus, "readings": readings,
            "allocations": allocations, "deployments_of": deployments_of}


@dataclass
class SitePeriod:
    site: Site
    cost: Cost
    daily: list[tuple[datetime, Cost]] = field(default_factory=list)


def site_costs(*, start: datetime, end: datetime, site_ids: list[int] | None = None) -> list[SitePeriod]:
    """Each site's cost over [start, end), with its daily breakdown: the attribution tier summed per UTC day in
    the database (every GPU-hour on the books, silent hours included), and the tokens its endpoints served."""
    sites = {s.pk: s for s in Site.objects.filter(**({"pk__in": site_ids} if site_ids else {}))}
    out = {pk: SitePeriod(site=s, cost=Cost(currency=s.currency)) for pk, s in sites.items()}
    tokens = {(r["site_id"], r["day"]): (r["tokens"], r["output"]) for r in (
        SiteHour.objects.filter(site_id__in=sites, ts__gte=start, ts__lt=end)
        .annotate(day=TruncDay("ts", tzinfo=UTC)).values("site_id", "day")
        .annotate(tokens=Sum(F("prompt_tokens") + F("generation_tokens")), output=Sum("generation_tokens"))
        .order_by())}
    rows = (CostHour.objects.filter(site_id__in=sites, ts__gte=start, ts__lt=end)
            .annotate(day=TruncDay("ts", tzinfo=UTC)).values("site_id", "day")
            # (the idle sums first: afterwards the cost sums' names shadow the columns)
            .annotate(**{f"idle_{name}": Sum(name, filter=Q(tenant__isnull=True))
                         for name in ("capex", "opex", "energy")})
            .annotate(**COST_SUMS).order_by("day"))
    for row in rows:
        period = out[row["site_id"]]
        key = (row["site_id"], row["day"])
        idle = sum((row[f"idle_{name}"] or ZERO for name in ("capex", "opex", "energy")), ZERO)
        served, output = tokens.get(key) or (0, 0)
        cost = cost_of(period.site.currency, row, idle=idle, tokens=served or 0, output_tokens=output or 0)
        period.cost.add(cost)
        period.daily.append((row["day"], cost))
    return sorted(out.values(), key=lambda p: p.site.name)


def costs_by_currency(periods: list[SitePeriod]) -> dict[str, Cost]:
    totals: dict[str, Cost] = {}
    for period in periods:
        totals.setdefault(period.cost.currency, Cost(currency=period.cost.currency)).add(period.cost)
    return dict(sorted(totals.items()))


def utilization_over(*, start: datetime, end: datetime) -> float | None:
    """Busy GPU-hours / GPU-hours on the books over the period, fleet-wide (a GPU that did not report counts as
    idle), from the attribution tier."""
    total = CostHour.objects.filter(ts__gte=start, ts__lt=end).aggregate(busy=Sum("busy_gpu_hours"),
                                                                         on_books=Sum("gpu_hours"))
    return float(total["busy"] / total["on_books"]) if total["on_books"] else None


def tokens_per_second_now(*, window: timedelta = timedelta(seconds=60), now: datetime | None = None) -> float:
    """Tokens per second over the minute that ended 10 s ago, from the raw samples; before any raw sample is
    there (a seeded history, or a portal just restored) from the last complete, rolled-up minute
    (capacity.selectors.last_complete_minute, the one the tenant pages show)."""
    now = now or timezone.now()
    total = UsageSample.objects.filter(ts__gte=now - window - timedelta(seconds=10), ts__lt=now - timedelta(
        seconds=10)).aggregate(tokens=Sum(F("prompt_tokens") + F("generation_tokens")), rows=Count("pk"))
    if not total["rows"]:
        total = UsageMinute.objects.filter(ts=last_complete_minute(now=now)).aggregate(
            tokens=Sum(F("prompt_tokens") + F("generation_tokens")))
        return (total["tokens"] or 0) / 60
    return (total["tokens"] or 0) / window.total_seconds()


def attributed_through() -> datetime | None:
    """Cost is attributed up to this moment (the last rollup; None before the first): every page's cost and
    tokens end here, so the node, site, tenant and deployment figures of a period agree."""
    return RollupWatermark.objects.filter(name="attribution").values_list("stored_until", flat=True).first()


def attribution_version_key(day: datetime) -> str:
    """The cache key of a UTC day's attribution version, which cost_hours_attribute bumps whenever it rewrites an
    hour of the day: every change to what a day's cost is computed from ends in a re-attribution of its hours."""
    return f"economics:attribution-version:{day:%Y%m%d}"


NODE_DAY_TTL_S = 40 * 86400


def node_cost(*, node: Node, start: datetime, end: datetime, through: datetime | None) -> Cost:
    """A node's cost and tokens over [start, end) up to `through` (attributed_through(), where every page's cost
    ends): its GPUs attributed hour by hour exactly as the books are (economics.attribution), so only the hours it
    was on the books count, and its endpoints' usage. Whole past days are kept in the cache under their
    attribution version, so a 30-day figure attributes the partial days at its ends, not 720 hours a request."""
    # The hours that begin in the period, as in the attribution tier, up to where attribution has reached.
    start, end = hour_ceil(start), min(end, through or start)
    cost = Cost(currency=node.site.currency)
    first, last = day_ceil(start), day_floor(end)
    days = [first + DAY * i for i in range((last - first) // DAY)] if first < last else []
    versions = cache.get_many([attribution_version_key(day) for day in days])
    # v2: the kept days carry their output tokens too (energy per token).
    keys = {day: f"economics:node-day:v2:{node.pk}:{day:%Y%m%d}:{versions.get(attribution_version_key(day), 0)}"
            for day in days}
    known = cache.get_many(list(keys.values()))
    missing = [day for day, key in keys.items() if key not in known]
    # Two passes whatever the cache holds: the partial first day, then from the first day not kept to the end.
    head_end = first if days else end
    for day_cost in _node_costs_by_day(node, start, head_end, now=end).values():
        cost.add(day_cost)
    tail_start = min(missing, default=last) if days else end
    tail = _node_costs_by_day(node, tail_start, end, now=end)
    fresh = {keys[day]: tail.get(day, Cost(currency=cost.currency)) for day in missing}
    if fresh:
        cache.set_many(fresh, timeout=NODE_DAY_TTL_S)
    for day, day_cost in tail.items():
        if day >= last or day in missing:
            cost.add(day_cost)
    for day in days:
        if day not in missing:
            cost.add(known[keys[day]])
    return cost


def _node_costs_by_day(node: Node, start: datetime, end: datetime, *, now: datetime) -> dict[datetime, Cost]:
    """The node's cost and tokens over [start, end) per UTC day, attributed in one pass."""
    out: dict[datetime, Cost] = defaultdict(lambda: Cost(currency=node.site.currency))
    if start >= end:
        return out
    attributed = attribute(hours=hours_between(start, end), now=now,
                           **attribution_inputs(start=start, end=end, node_id=node.pk))
    for (_site, tenant, ts), values in attributed.tenants.items():
        out[day_floor(ts)].add(cost_of(node.site.currency, values, idle=sum(
            (values[n] for n in ("capex", "opex", "energy")), ZERO) if tenant is None else ZERO))
    for model, lo, hi in usage_tiers(start=start, end=end, now=now):
        for r in (model.objects.filter(endpoint__node=node, ts__gte=lo, ts__lt=hi)
                  .annotate(day=TruncDay("ts", tzinfo=UTC)).values("day")
                  .annotate(p=Sum("prompt_tokens"), g=Sum("generation_tokens")).order_by()):
            out[r["day"]].tokens += (r["p"] or 0) + (r["g"] or 0)
            out[r["day"]].output_tokens += r["g"] or 0
    return out


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
    for r in (CostHour.objects.filter(ts__gte=start, ts__lt=end).values("site_id", "tenant_id")
              .annotate(**COST_SUMS).order_by()):
        idle = r["capex"] + r["opex"] + r["energy"] if r["tenant_id"] is None else ZERO
        out[(r["site_id"], r["tenant_id"])] = cost_of(sites[r["site_id"]].currency, r, idle=idle)
    return out


@dataclass
class DeploymentLine:
    deployment: Deployment
    cost: Cost

    @property
    def settings_label(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.deployment.settings.items())) or "defaults"


_HOUR_SUMS = {**COST_SUMS, **{name: Sum(name) for name in (
    "prompt_tokens", "generation_tokens", "prefill_seconds", "decode_seconds")}}


@dataclass(frozen=True)
class DeploymentCost:
    deployment_id: int
    model_name: str
    tenant_id: int
    site_id: int
    cost: Cost
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    def split(self, *, rule: str, output_weight: Decimal) -> TokenTypeCost:
        return cost_split(cost=self.cost.total, input_tokens=self.cost.tokens - self.cost.output_tokens,
                          output_tokens=self.cost.output_tokens, prefill_seconds=self.prefill_seconds,
                          decode_seconds=self.decode_seconds, rule=rule, output_weight=output_weight)


def deployment_sums(*, start: datetime, end: datetime, group: tuple[str, ...], sums: dict,
                    tenant: Tenant | None = None) -> list[dict]:
    """`sums` of the deployment tier over [start, end), grouped by `group` (which may name "day"): whole UTC days
    from DeploymentDay and the partial days at either end from DeploymentHour, so the rows read grow with the
    deployments and days, not hours. Today's day row holds every hour attributed so far: it answers for the end
    of the period when no hour at or after `end` has been attributed. Rows of different tiers come back apart;
    callers add them up."""
    first, last = day_ceil(start), day_floor(end)
    if first > last:
        return _grouped(DeploymentHour, start, end, group, sums, tenant)
    if last < end and not DeploymentHour.objects.filter(ts__gte=end, ts__lt=last + DAY).exists():
        last += DAY
    rows = _grouped(DeploymentDay, first, last, group, sums, tenant)
    for lo, hi in ((start, first), (last, end)):
        if lo < hi:
            rows += _grouped(DeploymentHour, lo, hi, group, sums, tenant)
    return rows


def _grouped(model, start: datetime, end: datetime, group: tuple[str, ...], sums: dict,
             tenant: Tenant | None) -> list[dict]:
    rows = model.objects.filter(ts__gte=start, ts__lt=end)
    if tenant is not None:
        rows = rows.filter(deployment__tenant=tenant)
    if "day" in group:
        rows = rows.annotate(day=TruncDay("ts", tzinfo=UTC))
    return list(rows.values(*group).annotate(**sums).order_by())


def deployment_costs(*, start: datetime, end: datetime, tenant: Tenant | None = None) -> list[DeploymentCost]:
    """Every deployment's (or one tenant's deployments') tokens and the cost of the capacity its units held over
    the period, from the daily and hourly attribution tiers (grouped by deployment alone: joining first would
    multiply the work by the rows scanned); the model, tenant and deployment views are all sums of these."""
    sums: dict[int, dict] = {}
    for row in deployment_sums(start=start, end=end, group=("deployment_id",), sums=_HOUR_SUMS, tenant=tenant):
        total = sums.setdefault(row["deployment_id"], dict.fromkeys(_HOUR_SUMS, 0))
        for name in _HOUR_SUMS:
            total[name] += row[name]
    facts = Deployment.objects.filter(pk__in=list(sums)).values_list(
        "pk", "model_name", "tenant_id", "node__site_id", "node__site__currency")
    return [DeploymentCost(deployment_id=pk, model_name=model, tenant_id=tenant, site_id=site,
                           cost=cost_of(currency, sums[pk], tokens=sums[pk]["prompt_tokens"] + sums[pk][
                               "generation_tokens"], output_tokens=sums[pk]["generation_tokens"]),
                           prefill_seconds=sums[pk]["prefill_seconds"], decode_seconds=sums[pk]["decode_seconds"])
            for pk, model, tenant, site, currency in facts]


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


def tenant_energy(*, tenant: Tenant, start: datetime, end: datetime) -> list[tuple[str, Cost]]:
    """The tenant's own deployments per model: tokens and the measured GPU energy of the units they held (MIG:
    slices ÷ 7), for the tenant portal's energy per token. Only energy and tokens are shown there, not cost."""
    return model_economics(costs=deployment_costs(start=start, end=end, tenant=tenant))


def tenant_economics(*, start: datetime, end: datetime, costs: list[DeploymentCost]) -> list[
        tuple[Tenant | None, Site, Cost]]:
    """Per tenant (and idle capacity) and site: attributed cost, tokens served there, cost per million tokens."""
    attributed = attributed_costs(start=start, end=end)
    tenants = {t.pk: t for t in Tenant.objects.filter(pk__in={k[1] for k in attributed if k[1]})}
    sites = {s.pk: s for s in Site.objects.all()}
    tokens: dict[tuple[int, int], int] = defaultdict(int)
    output: dict[tuple[int, int], int] = defaultdict(int)
    for c in costs:
        tokens[(c.site_id, c.tenant_id)] += c.cost.tokens
        output[(c.site_id, c.tenant_id)] += c.cost.output_tokens
    out = []
    for (site_id, tenant_id), cost in attributed.items():
        if tenant_id is not None:
            cost.tokens = tokens.get((site_id, tenant_id), 0)
            cost.output_tokens = output.get((site_id, tenant_id), 0)
        out.append((tenants.get(tenant_id), sites[site_id], cost))
    return sorted(out, key=lambda row: (row[1].name, row[0] is None, row[0].name if row[0] else ""))
