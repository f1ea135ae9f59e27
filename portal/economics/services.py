"""Cost attribution writes: each GPU-hour's cost to whoever held the GPU, the rest to idle capacity, stored as
CostHour (per site, tenant or idle, hour) and DeploymentHour/DeploymentDay (per deployment). The arithmetic is
economics.attribution (a pure function of history); this module gathers its inputs and replaces whole hours."""

from dataclasses import fields
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.core.cache import cache
from django.db import transaction
from django.db.models import Sum
from django.db.models.functions import TruncDay
from django.utils import timezone

from portal.capacity.selectors import HourUsage, deployment_usage_by_hour
from portal.economics.attribution import HOUR, attribute
from portal.economics.costmodel import CAPACITY_FIELDS, ZERO
from portal.economics.models import CostHour, DeploymentDay, DeploymentHour
from portal.economics.selectors import attribution_inputs, attribution_version_key
from portal.hours import day_floor
from portal.locks import transaction_lock

PLACES = Decimal("0.00000001")
USAGE_FIELDS = tuple(f.name for f in fields(HourUsage))
ATTRIBUTION_LOCK = "economics.attribution"


def _quantized(values: dict[str, Decimal]) -> dict[str, Decimal]:
    return {name: values.get(name, ZERO).quantize(PLACES) for name in CAPACITY_FIELDS}


def cost_hours_attribute(*, hours: list[datetime], now: datetime | None = None) -> int:
    """Recompute CostHour and DeploymentHour rows for these hours (an hour still running counts up to `now`), and
    the DeploymentDay rows of their days. Idempotent and order-free: an hour's rows depend only on history and are
    replaced whole. Each stored figure is rounded to 8 places; a site-hour's idle row takes what rounding the
    tenants' rows left, so the rows of a site-hour add up exactly to the site's cost for it."""
    now = now or timezone.now()
    hours = sorted({h for h in hours if h < now})
    if not hours:
        return 0
    start, end = hours[0], hours[-1] + HOUR
    with transaction.atomic():
        # The rollups (every minute) and a re-attribution run (the long queue) may replace the same hours at
        # once: without the lock, each deletes what the other has not committed yet and both sets would stay.
        transaction_lock(ATTRIBUTION_LOCK)
        attributed = attribute(hours=hours, now=now, **attribution_inputs(start=start, end=end))
        usage = deployment_usage_by_hour(start=start, end=min(end, now), now=now)
        rows = _cost_rows(attributed.tenants)
        wanted = set(hours)
        deployment_keys = set(attributed.deployments) | {key for key in usage if key[1] in wanted}
        CostHour.objects.filter(ts__in=hours).delete()
        CostHour.objects.bulk_create(rows, batch_size=5000)
        DeploymentHour.objects.filter(ts__in=hours).delete()
        DeploymentHour.objects.bulk_create(
            [DeploymentHour(deployment_id=d, ts=ts, **vars(usage.get((d, ts), HourUsage())),
                            **_quantized(attributed.deployments.get((d, ts), {})))
             for d, ts in sorted(deployment_keys, key=lambda k: (k[1], k[0]))],
            batch_size=5000,
        )
        days = {day_floor(h) for h in hours}
        _deployment_days_refresh(days=days)
        transaction.on_commit(lambda: _attribution_versions_bump(days))
    return len(rows)


def _attribution_versions_bump(days: set[datetime]) -> None:
    """A new version for each day re-attributed (economics.selectors.attribution_version_key): what was kept
    for the old one is read no more."""
    for day in days:
        key = attribution_version_key(day)
        cache.add(key, 0, timeout=None)
        cache.incr(key)


def _cost_rows(tenants: dict[tuple[int, int | None, datetime], dict[str, Decimal]]) -> list[CostHour]:
    site_hours: dict[tuple[int, datetime], dict[str, Decimal]] = {}
    for (site_id, _tenant, ts), values in tenants.items():
        total = site_hours.setdefault((site_id, ts), dict.fromkeys(CAPACITY_FIELDS, ZERO))
        for name in CAPACITY_FIELDS:
            total[name] += values.get(name, ZERO)
    rows, held = [], {}
    for (site_id, tenant_id, ts), values in sorted(tenants.items(), key=lambda item: (item[0][2], item[0][0],
                                                                                        item[0][1] or 0)):
        if tenant_id is None:
            continue
        quantized = _quantized(values)
        rows.append(CostHour(site_id=site_id, tenant_id=tenant_id, ts=ts, **quantized))
        taken = held.setdefault((site_id, ts), dict.fromkeys(CAPACITY_FIELDS, ZERO))
        for name in CAPACITY_FIELDS:
            taken[name] += quantized[name]
    for (site_id, ts), total in site_hours.items():
        taken = held.get((site_id, ts), dict.fromkeys(CAPACITY_FIELDS, ZERO))
        rows.append(CostHour(site_id=site_id, tenant_id=None, ts=ts,
                             **{name: total[name].quantize(PLACES) - taken[name] for name in CAPACITY_FIELDS}))
    return rows


def _deployment_days_refresh(*, days: set[datetime]) -> None:
    """Rewrite these days' DeploymentDay rows as the sums of their DeploymentHour rows."""
    sums = {f"sum_{name}": Sum(name) for name in (*CAPACITY_FIELDS, *USAGE_FIELDS)}
    DeploymentDay.objects.filter(ts__in=days).delete()
    for day in days:
        rows = (DeploymentHour.objects.filter(ts__gte=day, ts__lt=day + timedelta(days=1))
                .annotate(day=TruncDay("ts", tzinfo=UTC)).values("deployment_id", "day").annotate(**sums).order_by())
        DeploymentDay.objects.bulk_create(
            [DeploymentDay(deployment_id=r["deployment_id"], ts=r["day"],
                           **{name.removeprefix("sum_"): r[name] for name in sums}) for r in rows],
            batch_size=5000,
        )
