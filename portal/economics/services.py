"""Cost attribution: each GPU-hour's cost goes to whoever held the GPU, the rest to idle capacity."""

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.db import transaction
from django.db.models import Q, Sum
from django.db.models.functions import TruncDay

from portal.capacity.models import Allocation, Deployment
from portal.economics.models import CostHour, DeploymentDay, DeploymentHour
from portal.economics.selectors import HOURS_PER_MONTH, MJ_PER_KWH
from portal.fleet.models import Gpu, NodeStatus, ServingEndpoint, Site
from portal.telemetry.models import GpuHour, UsageHour, UsageMinute

HOUR = timedelta(hours=1)
ZERO = Decimal(0)


def allocation_shares(*, allocations: list[Allocation], hour: datetime) -> list[tuple[Allocation, Decimal]]:
    """Each allocation's share of one GPU-hour: share of the GPU (MIG: slices/7) x share of the hour held."""
    out = []
    for a in allocations:
        lo, hi = max(a.starts_at, hour), min(a.ends_at or hour + HOUR, hour + HOUR)
        if hi > lo:
            gpu_share = Decimal(a.mig_instance.slices) / 7 if a.mig_instance_id else Decimal(1)
            out.append((a, Decimal((hi - lo).total_seconds()) / Decimal(3600) * gpu_share))
    return out


def gpu_hour_shares(*, allocations: list[Allocation], hour: datetime) -> dict[int | None, Decimal]:
    """How one GPU-hour divides between tenants; idle under None. The shares always add up to exactly 1."""
    shares: dict[int | None, Decimal] = defaultdict(Decimal)
    for allocation, share in allocation_shares(allocations=allocations, hour=hour):
        shares[allocation.tenant_id] += share
    shares[None] = 1 - sum(shares.values(), ZERO)
    return dict(shares)


def cost_hours_attribute(*, hours: list[datetime]) -> int:
    """Recompute CostHour (per site and tenant, idle included) and DeploymentHour rows for these hours, and the
    DeploymentDay rows of their days. Idempotent: an hour's (and a day's) rows are replaced whole."""
    if not hours:
        return 0
    hours = sorted(set(hours))
    sites = {s.pk: s for s in Site.objects.all()}
    gpus = list(Gpu.objects.exclude(node__status=NodeStatus.DECOMMISSIONED).select_related("node"))
    readings = {(g, ts): (energy or 0, util or 0.0, seconds or 0.0) for g, ts, energy, util, seconds in
                GpuHour.objects.filter(ts__in=hours).values_list("gpu_id", "ts", "energy_mj", "util_mean", "seconds")}
    allocations: dict[int, list[Allocation]] = defaultdict(list)
    overlapping = Allocation.objects.filter(starts_at__lt=hours[-1] + HOUR).filter(
        Q(ends_at__isnull=True) | Q(ends_at__gt=hours[0])).select_related("mig_instance")
    for a in overlapping:
        allocations[a.gpu_id].append(a)
    deployment_of = _deployments_by_allocation(hours)
    rows: dict[tuple[int, int | None, datetime], dict[str, Decimal]] = {}
    by_deployment: dict[tuple[int, datetime], dict[str, Decimal]] = {}
    for hour in hours:
        for gpu in gpus:
            site = sites[gpu.node.site_id]
            energy_mj, util, seconds = readings.get((gpu.pk, hour), (0, 0.0, 0.0))
            kwh = Decimal(energy_mj) / MJ_PER_KWH
            gpu_hour = {
                "gpu_hours": Decimal(1),
                "busy_gpu_hours": Decimal(str(util)) / 100 * Decimal(str(seconds)) / Decimal(3600),
                "energy_kwh": kwh,
                "capex": site.gpu_capex / (site.depreciation_months * HOURS_PER_MONTH),
                "energy": kwh * site.pue * site.energy_price_kwh,
                "opex": site.other_opex_gpu_hour,
            }
            held = allocation_shares(allocations=allocations.get(gpu.pk, []), hour=hour)
            idle = 1 - sum((share for _a, share in held), ZERO)
            for allocation, share in [*held, (None, idle)]:
                if share == 0:
                    continue
                tenant_id = allocation.tenant_id if allocation else None
                _accumulate(rows.setdefault((site.pk, tenant_id, hour), defaultdict(Decimal)), gpu_hour, share)
                deployment_id = deployment_of.get(allocation.pk) if allocation else None
                if deployment_id:
                    _accumulate(by_deployment.setdefault((deployment_id, hour), defaultdict(Decimal)), gpu_hour,
                                share)
    tokens = _deployment_tokens(hours)
    places = Decimal("0.00000001")
    with transaction.atomic():
        CostHour.objects.filter(ts__in=hours).delete()
        CostHour.objects.bulk_create(
            [CostHour(site_id=site_id, tenant_id=tenant_id, ts=ts, **{k: v.quantize(places) for k, v in values.items()})
             for (site_id, tenant_id, ts), values in rows.items()],
            batch_size=5000,
        )
        DeploymentHour.objects.filter(ts__in=hours).delete()
        keys = set(by_deployment) | set(tokens)
        DeploymentHour.objects.bulk_create(
            [DeploymentHour(deployment_id=d, ts=ts, prompt_tokens=tokens.get((d, ts), (0, 0))[0],
                            generation_tokens=tokens.get((d, ts), (0, 0))[1],
                            **{k: by_deployment.get((d, ts), {}).get(k, ZERO).quantize(places) for k in _FIELDS})
             for d, ts in keys],
            batch_size=5000,
        )
        _deployment_days_refresh(days={h.replace(hour=0, minute=0, second=0, microsecond=0) for h in hours})
    return len(rows)


def _deployment_days_refresh(*, days: set[datetime]) -> None:
    """Rewrite these days' DeploymentDay rows as the sums of their DeploymentHour rows."""
    sums = {f"sum_{name}": Sum(name) for name in (*_FIELDS, "prompt_tokens", "generation_tokens")}
    DeploymentDay.objects.filter(ts__in=days).delete()
    for day in days:
        rows = (DeploymentHour.objects.filter(ts__gte=day, ts__lt=day + timedelta(days=1))
                .annotate(day=TruncDay("ts", tzinfo=UTC)).values("deployment_id", "day").annotate(**sums).order_by())
        DeploymentDay.objects.bulk_create(
            [DeploymentDay(deployment_id=r["deployment_id"], ts=r["day"],
                           **{name.removeprefix("sum_"): r[name] for name in sums}) for r in rows],
            batch_size=5000,
        )


_FIELDS = ("gpu_hours", "busy_gpu_hours", "energy_kwh", "capex", "energy", "opex")


def _accumulate(row: dict[str, Decimal], gpu_hour: dict[str, Decimal], share: Decimal) -> None:
    for name in _FIELDS:
        row[name] += share * gpu_hour[name]


def _live(hours: list[datetime]):
    return Deployment.objects.filter(active_from__lt=hours[-1] + HOUR).filter(
        Q(ended_at__isnull=True) | Q(ended_at__gt=hours[0]))


def _deployments_by_allocation(hours: list[datetime]) -> dict[int, int]:
    """Allocation id -> the live deployment running on it (the first, if two share a unit)."""
    through = Deployment.allocations.through.objects.filter(deployment__in=_live(hours)).order_by("deployment_id")
    out: dict[int, int] = {}
    for allocation_id, deployment_id in through.values_list("allocation_id", "deployment_id"):
        out.setdefault(allocation_id, deployment_id)
    return out


def _deployment_tokens(hours: list[datetime]) -> dict[tuple[int, datetime], tuple[int, int]]:
    """Tokens each deployment's endpoint served in each hour while the deployment was live: the hour tier for
    hours it covered whole, the minute tier for the hours it started or ended in."""
    deployments = list(_live(hours))
    endpoints: dict[tuple[int, str], list[int]] = defaultdict(list)
    for pk, node_id, url in ServingEndpoint.objects.filter(node_id__in={d.node_id for d in deployments}).values_list(
            "pk", "node_id", "url"):
        endpoints[(node_id, url)].append(pk)
    owner = {pk: d for d in deployments for pk in endpoints[(d.node_id, d.metrics_url)]}
    out: dict[tuple[int, datetime], tuple[int, int]] = defaultdict(lambda: (0, 0))
    partial = []
    for endpoint_id, ts, prompt, generation in UsageHour.objects.filter(
            endpoint_id__in=owner, ts__in=hours).values_list("endpoint_id", "ts", "prompt_tokens", "generation_tokens"):
        d = owner[endpoint_id]
        if d.active_from <= ts and (d.ended_at is None or d.ended_at >= ts + HOUR):
            p, g = out[(d.pk, ts)]
            out[(d.pk, ts)] = (p + prompt, g + generation)
        else:
            partial.append((d, endpoint_id, ts))
    for d, endpoint_id, ts in partial:
        lo, hi = max(ts, d.active_from), min(ts + HOUR, d.ended_at or ts + HOUR)
        if lo < hi:
            agg = UsageMinute.objects.filter(endpoint_id=endpoint_id, ts__gte=lo, ts__lt=hi).aggregate(
                p=Sum("prompt_tokens"), g=Sum("generation_tokens"))
            p, g = out[(d.pk, ts)]
            out[(d.pk, ts)] = (p + (agg["p"] or 0), g + (agg["g"] or 0))
    return dict(out)
