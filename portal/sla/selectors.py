"""Reads for SLAs: measuring a tenant's indicators over a window, its policy, and its compliance history.

Scope: the tenant's deployments' endpoints while each was live (portal.capacity.selectors.deployment_windows), read
through the same tier split as usage (capacity.selectors.usage_tiers): whole past hours from UsageHour, the edges and
the current hour from UsageMinute.
Latency quantiles come from the merged histogram-bucket deltas (portal.telemetry.histograms: Prometheus'
histogram_quantile), never from averages; availability is probes up / probes; error rate is failed / all requests.
"""

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from portal.capacity.models import Deployment
from portal.capacity.selectors import deployment_windows, owned_usage
from portal.sla.models import QUANTILE_SLIS, SlaBreach, SlaEvaluation, SlaObjective, SlaPolicy, Sli
from portal.telemetry.histograms import Histogram, merge, quantile
from portal.tenants.models import Tenant, TenantStatus


@dataclass
class Reading:
    value: float | None
    samples: int


@dataclass
class _Totals:
    requests_ok: int = 0
    requests_failed: int = 0
    probes: int = 0
    probes_up: int = 0
    histograms: dict[str, Histogram | None] = field(default_factory=lambda: {"ttft": None, "itl": None, "e2e": None})


def _totals(*, tenant: Tenant, start: datetime, end: datetime, now: datetime, histograms: list[str]) -> _Totals:
    """Sums over the usage the tenant owned in [start, end) (capacity.selectors.owned_usage: one query per usage
    tier, however many deployments; the hourly beat and a seeded month call this thousands of times)."""
    totals = _Totals()
    windows = deployment_windows(list(Deployment.objects.filter(tenant=tenant)), start, end)
    fields = ("requests_ok", "requests_failed", "probes", "probes_up", *histograms)
    for _window, _ts, ok, failed, probes, up, *values in owned_usage(windows=windows, now=now, fields=fields):
        totals.requests_ok += ok
        totals.requests_failed += failed
        totals.probes += probes
        totals.probes_up += up
        for name, h in zip(histograms, values, strict=True):
            if h is not None:
                totals.histograms[name] = merge(totals.histograms[name], h)
    return totals


def sli_readings(*, tenant: Tenant, start: datetime, end: datetime, now: datetime | None = None,
                 slis: set[str] | None = None) -> dict[str, Reading]:
    """The tenant's SLIs (all, or those named) over [start, end). A value is None when the window had nothing to
    measure. Only the histograms of the quantile SLIs asked for are read and merged."""
    wanted = {sli: spec for sli, spec in QUANTILE_SLIS.items() if slis is None or sli in slis}
    totals = _totals(tenant=tenant, start=start, end=end, now=now or timezone.now(),
                     histograms=[name for name, _ in wanted.values()])
    readings = {}
    for sli, (name, q) in wanted.items():
        h = totals.histograms[name]
        readings[sli] = Reading(value=quantile(q, h), samples=h["counts"][-1] if h else 0)
    requests = totals.requests_ok + totals.requests_failed
    readings[Sli.ERROR_RATE] = Reading(value=100 * totals.requests_failed / requests if requests else None,
                                       samples=requests)
    readings[Sli.AVAILABILITY] = Reading(
        value=100 * totals.probes_up / totals.probes if totals.probes else None, samples=totals.probes)
    return readings


@dataclass(frozen=True)
class BreachedWindows:
    count: int  # windows of the period that breached
    total: int  # windows of the period evaluated
    first: datetime  # end of the first breaching window
    worst: float  # the worst value measured in a breaching window


def sla_breached_windows(*, tenant: Tenant, start: datetime, end: datetime,
                         slis: set[str]) -> dict[str, BreachedWindows]:
    """Per SLI, the tenant's evaluation windows ending in (start, end] that breached their target (one query)."""
    found: dict[str, BreachedWindows] = {}
    rows = SlaEvaluation.objects.filter(tenant=tenant, sli__in=slis, window_end__gt=start, window_end__lte=end)
    totals = dict(rows.values_list("sli").annotate(n=Count("id")).order_by())
    for sli, value, window_end in rows.filter(compliant=False).order_by("window_end").values_list(
            "sli", "value", "window_end"):
        higher_is_better = sli == Sli.AVAILABILITY
        if sli not in found:
            found[sli] = BreachedWindows(count=1, total=totals[sli], first=window_end, worst=value)
        else:
            previous = found[sli]
            worst = min(previous.worst, value) if higher_is_better else max(previous.worst, value)
            found[sli] = BreachedWindows(count=previous.count + 1, total=previous.total, first=previous.first,
                                         worst=worst)
    return found


def policy_for_tenant(*, tenant: Tenant) -> SlaPolicy | None:
    """The tenant's own override if it has one, else its plan's policy."""
    override = SlaPolicy.objects.filter(tenant=tenant).first()
    if override is not None:
        return override
    if tenant.plan_id is None:
        return None
    return SlaPolicy.objects.filter(plan_id=tenant.plan_id).first()


def objectives_for_tenant(*, tenant: Tenant) -> list[SlaObjective]:
    policy = policy_for_tenant(tenant=tenant)
    return list(policy.objectives.all()) if policy else []


def objectives_for_tenants(*, tenants: list[Tenant]) -> dict[int, list[SlaObjective]]:
    """objectives_for_tenant for many tenants in two queries (policy_for_tenant's rule: the override, else the
    plan's policy)."""
    found = SlaPolicy.objects.filter(Q(tenant__in=tenants) | Q(plan_id__in={t.plan_id for t in tenants}))
    by_tenant, by_plan = {}, {}
    for policy in found.prefetch_related("objectives"):
        if policy.tenant_id:
            by_tenant[policy.tenant_id] = policy
        else:
            by_plan[policy.plan_id] = policy
    out = {}
    for tenant in tenants:
        policy = by_tenant.get(tenant.pk) or by_plan.get(tenant.plan_id)
        out[tenant.pk] = list(policy.objectives.all()) if policy else []
    return out


def tenants_to_evaluate() -> QuerySet[Tenant]:
    return Tenant.objects.filter(status=TenantStatus.ACTIVE).order_by("pk")


def policies() -> QuerySet[SlaPolicy]:
    return SlaPolicy.objects.select_related("plan", "tenant").prefetch_related("objectives").order_by(
        "tenant", "name")


@dataclass
class SliStatus:
    objective: SlaObjective
    latest: SlaEvaluation | None
    windows: int = 0
    met: int = 0
    # This month's windows that breached, when any did: the credit the month's invoice carries (billing reads the
    # same sla_breached_windows).
    credit_due: BreachedWindows | None = None

    @property
    def met_share(self) -> float | None:
        return self.met / self.windows if self.windows else None


@dataclass
class Compliance:
    tenant: Tenant
    policy: SlaPolicy | None
    statuses: list[SliStatus]
    series: dict[str, list[SlaEvaluation]]
    breaches: list[SlaBreach]

    @property
    def marked(self) -> list[SlaEvaluation]:
        """Windows of the period a health incident touched on a unit the tenant held, newest first."""
        rows = [e for evaluations in self.series.values() for e in evaluations if e.incident_id]
        return sorted(rows, key=lambda e: (e.window_end, e.sli), reverse=True)

    @property
    def open_breaches(self) -> int:
        return sum(1 for b in self.breaches if b.ended_at is None)


def tenant_compliance(*, tenant: Tenant, since: datetime, until: datetime | None = None) -> Compliance:
    """The tenant's objectives with their latest evaluation and share of windows met since `since`, the series of
    evaluations per SLI for the charts, and its breaches that overlap the period."""
    policy = policy_for_tenant(tenant=tenant)
    objectives = list(policy.objectives.all()) if policy else []
    evaluations = SlaEvaluation.objects.filter(tenant=tenant, window_end__gte=since).select_related("incident")
    if until is not None:
        evaluations = evaluations.filter(window_end__lte=until)
    series: dict[str, list[SlaEvaluation]] = defaultdict(list)
    for evaluation in evaluations.order_by("window_end"):
        series[evaluation.sli].append(evaluation)
    now = until or timezone.now()
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    breached = sla_breached_windows(tenant=tenant, start=month, end=now, slis={o.sli for o in objectives})
    statuses = []
    for objective in objectives:
        rows = series.get(objective.sli, [])
        measured = [e for e in rows if e.compliant is not None]
        statuses.append(SliStatus(objective=objective, latest=rows[-1] if rows else None, windows=len(measured),
                                  met=sum(1 for e in measured if e.compliant),
                                  credit_due=breached.get(objective.sli) if objective.credit_pct else None))
    breaches = list(SlaBreach.objects.filter(tenant=tenant).exclude(ended_at__lt=since).order_by("-started_at"))
    return Compliance(tenant=tenant, policy=policy, statuses=statuses, series=dict(series), breaches=breaches)


def fleet_compliance(*, since: datetime) -> list[Compliance]:
    """tenant_compliance for every active tenant, for the operators' overview."""
    return [tenant_compliance(tenant=t, since=since) for t in tenants_to_evaluate().select_related("plan")]
