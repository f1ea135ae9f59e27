"""Reads for tenants. Every function a tenant can reach takes the tenant that portal.tenants.access resolved (or an
API key's tenant), never an id from the request alone."""

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

from django.db.models import Case, Count, IntegerField, QuerySet, Value, When
from django.utils import timezone

from portal.accounts.models import User
from portal.capacity.models import CapacityRequest, Deployment, Quota
from portal.capacity.selectors import (
    UsageLine,
    deployment_windows,
    last_complete_minute,
    owned_usage,
    tenant_capacity_requests,
    tenant_deployments,
    tenant_gpus_held,
    tenant_usage_last_minute,
    usage_for_tenant,
)
from portal.fleet.models import Gpu, MigInstance, ServingEndpoint
from portal.hours import day_floor
from portal.tenants.models import ApiKey, Invitation, MemberRole, Membership, Plan, Tenant, TenantStatus


def memberships_for_user(*, user: User) -> QuerySet[Membership]:
    return Membership.objects.filter(user=user).select_related("tenant").order_by("tenant__name")


def account_exists(*, email: str) -> bool:
    return User.objects.filter(email__iexact=email.strip()).exists()


# Operators --------------------------------------------------------------------------------------------------------


def tenants_for_operators(*, status: str | None = None) -> QuerySet[Tenant]:
    """Tenants with their plan and member counts; pending sign-ups first, oldest first (the onboarding queue)."""
    tenants = Tenant.objects.select_related("plan").annotate(
        members=Count("memberships"),
        queue=Case(When(status=TenantStatus.PENDING, then=Value(0)), default=Value(1), output_field=IntegerField()),
    )
    if status:
        tenants = tenants.filter(status=status)
    return tenants.order_by("queue", "created_at", "name")


def tenant_admins(*, tenant: Tenant) -> QuerySet[User]:
    return User.objects.filter(memberships__tenant=tenant, memberships__role=MemberRole.ADMIN).order_by("pk")


def plans() -> QuerySet[Plan]:
    return Plan.objects.annotate(tenant_count=Count("tenants")).order_by("gpus", "tokens_per_minute", "name")


# Tenant portal ----------------------------------------------------------------------------------------------------


def tenant_members(*, tenant: Tenant) -> QuerySet[Membership]:
    return Membership.objects.filter(tenant=tenant).select_related("user").order_by("role", "user__email")


def tenant_open_invitations(*, tenant: Tenant) -> QuerySet[Invitation]:
    return Invitation.objects.filter(tenant=tenant, accepted_at__isnull=True, revoked_at__isnull=True).select_related(
        "invited_by")


def tenant_api_keys(*, tenant: Tenant) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(tenant=tenant).select_related("created_by")


def tenant_requests(*, tenant: Tenant) -> QuerySet[CapacityRequest]:
    return tenant_capacity_requests(tenant=tenant).select_related("requested_by", "decided_by")


def tenant_deployment_list(*, tenant: Tenant) -> QuerySet[Deployment]:
    return tenant_deployments(tenant=tenant).prefetch_related("allocations__gpu", "allocations__mig_instance")


@dataclass
class Health:
    """A deployment's endpoint as its node's agent last saw it."""

    up: bool | None = None
    probe_latency_ms: float | None = None
    last_seen: datetime | None = None
    models: list[str] = field(default_factory=list)

    @property
    def state(self) -> str:
        return "unknown" if self.up is None else "up" if self.up else "down"


def deployment_health(*, deployments: list[Deployment]) -> dict[int, Health]:
    """Per deployment id: its ServingEndpoint rows (node + metrics_url), up if any model there answers."""
    endpoints = defaultdict(list)
    for ep in ServingEndpoint.objects.filter(node_id__in={d.node_id for d in deployments},
                                             url__in={d.metrics_url for d in deployments}):
        endpoints[(ep.node_id, ep.url)].append(ep)
    health = {}
    for d in deployments:
        eps = endpoints.get((d.node_id, d.metrics_url), [])
        h = Health()
        if eps:
            h.up = any(ep.up for ep in eps)
            latencies = [ep.probe_latency_ms for ep in eps if ep.probe_latency_ms is not None]
            h.probe_latency_ms = max(latencies) if latencies else None
            seen = [ep.last_seen for ep in eps if ep.last_seen]
            h.last_seen = max(seen) if seen else None
            h.models = sorted({ep.model for ep in eps})
        health[d.pk] = h
    return health


@dataclass
class Overview:
    tokens_today: int
    tokens_month: int
    requests_month: int
    minute: datetime
    tokens_last_minute: int
    tokens_per_minute_quota: int | None
    gpus_held: float
    gpus_quota: int | None
    quota_set: bool

    @property
    def minute_share(self) -> float | None:
        return self.tokens_last_minute / self.tokens_per_minute_quota if self.tokens_per_minute_quota else None

    @property
    def gpu_share(self) -> float | None:
        return self.gpus_held / self.gpus_quota if self.gpus_quota else None


def _tokens(lines: list[UsageLine]) -> int:
    return sum(line.tokens for line in lines)


def tenant_overview(*, tenant: Tenant, now: datetime | None = None) -> Overview:
    """Tokens today and this month, the last complete minute's tokens against the per-minute quota, and the GPUs
    held now (whole-GPU equivalents) against the GPU quota."""
    now = now or timezone.now()
    day = day_floor(now)
    month = day.replace(day=1)
    month_lines = usage_for_tenant(tenant=tenant, start=month, end=now, by_day=True, now=now)
    quota = Quota.objects.filter(tenant=tenant).first()
    return Overview(
        tokens_today=_tokens([ln for ln in month_lines if ln.day and ln.day >= day]),
        tokens_month=_tokens(month_lines),
        requests_month=sum(ln.requests_ok + ln.requests_failed for ln in month_lines),
        minute=last_complete_minute(now=now),  # the minute the quota is checked on
        tokens_last_minute=tenant_usage_last_minute(tenant=tenant, now=now),
        tokens_per_minute_quota=quota.tokens_per_minute if quota else None,
        gpus_held=round(tenant_gpus_held(tenant=tenant, at=now), 3),  # as the GPU quota counts
        gpus_quota=quota.gpus if quota else None,
        quota_set=quota is not None,
    )


def day_range(start: date, end: date) -> tuple[datetime, datetime]:
    """[start 00:00, end+1 00:00) in UTC, for inclusive date ranges."""
    return (datetime.combine(start, time.min, tzinfo=UTC),
            datetime.combine(end + timedelta(days=1), time.min, tzinfo=UTC))


def tenant_usage_by_day(*, tenant: Tenant, start: date, end: date, now: datetime | None = None) -> list[UsageLine]:
    """The tenant's usage per model and UTC day over the inclusive date range."""
    lo, hi = day_range(start, end)
    now = now or timezone.now()
    return usage_for_tenant(tenant=tenant, start=lo, end=min(hi, now), by_day=True, now=now) if lo < now else []


def deployment_usage_by_day(*, deployment: Deployment, start: date, end: date,
                            now: datetime | None = None) -> list[UsageLine]:
    """One deployment's usage per UTC day while it owned its endpoint (the caller got it through its tenant)."""
    now = now or timezone.now()
    lo, hi = day_range(start, end)
    days: dict[datetime, UsageLine] = {}
    for _window, ts, p, g, ok, failed in owned_usage(windows=deployment_windows([deployment], lo, min(hi, now)),
                                                     now=now):
        day = day_floor(ts)
        line = days.setdefault(day, UsageLine(model=deployment.model_name, day=day))
        line.prompt_tokens += p
        line.generation_tokens += g
        line.requests_ok += ok
        line.requests_failed += failed
    return [days[d] for d in sorted(days)]


@dataclass
class ModelTotal:
    model: str
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.generation_tokens


def totals_by_model(lines: list[UsageLine]) -> list[ModelTotal]:
    totals: dict[str, ModelTotal] = {}
    for line in lines:
        t = totals.setdefault(line.model, ModelTotal(model=line.model))
        t.prompt_tokens += line.prompt_tokens
        t.generation_tokens += line.generation_tokens
        t.requests += line.requests_ok + line.requests_failed
    return sorted(totals.values(), key=lambda t: -t.tokens)


def fleet_gpu_types() -> list[str]:
    """GPU model names installed in the fleet: what a capacity request can ask for."""
    return list(Gpu.objects.order_by("name").values_list("name", flat=True).distinct())


def fleet_mig_profiles() -> list[tuple[str, str]]:
    """(GPU model name, MIG profile) pairs the fleet has configured."""
    return list(MigInstance.objects.order_by("gpu__name", "profile").values_list("gpu__name", "profile").distinct())
