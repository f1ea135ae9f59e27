from datetime import datetime

from django.db import IntegrityError, transaction
from django.utils import timezone

from portal.accounts.models import User
from portal.alerts.models import Severity
from portal.alerts.services import alert_raise, alert_resolve_key, alert_resolve_others
from portal.capacity.models import (
    WHOLE_GPU_SLOTS,
    Allocation,
    CapacityRequest,
    Deployment,
    Quota,
    RequestStatus,
)
from portal.capacity.selectors import deployments_unbillable, tenant_gpus_held, tenant_usage_last_minute
from portal.economics.reattribution import reattribution_request
from portal.fleet.models import Gpu, MigInstance, Node, NodeLifecycle, ScrapeTarget
from portal.fleet.services import node_set_scrape_targets
from portal.health.selectors import cordoned
from portal.standards.selectors import nodes_excluded
from portal.tenants.models import Tenant, TenantStatus


class CapacityError(Exception):
    """A capacity change that cannot be made; the message says why and is safe to show."""


def allocation_create(
    *, tenant: Tenant, gpu: Gpu, mig_instance: MigInstance | None = None, starts_at: datetime,
    ends_at: datetime | None = None, by: User | None = None, request: CapacityRequest | None = None,
) -> Allocation:
    """Give `tenant` a whole GPU (or one of its MIG instances) over [starts_at, ends_at). The database refuses an
    overlap with another allocation of the same unit; that refusal becomes a CapacityError."""
    if tenant.status != TenantStatus.ACTIVE:
        raise CapacityError(f"{tenant} is not active: only active tenants can hold capacity")
    if ends_at is not None and ends_at <= starts_at:
        raise CapacityError("The allocation must end after it starts.")
    if mig_instance is not None and mig_instance.gpu_id != gpu.pk:
        raise CapacityError("That MIG instance is not on the chosen GPU.")
    _check_on_books(gpu, starts_at, ends_at)
    _check_sellable(gpu, mig_instance, ends_at)
    _check_certified(gpu, ends_at)
    slots = (mig_instance.gi_id, mig_instance.gi_id + 1) if mig_instance else WHOLE_GPU_SLOTS
    unit = f"MIG {mig_instance.profile} (GI {mig_instance.gi_id})" if mig_instance else "the whole GPU"
    try:
        with transaction.atomic():
            # Two allocations of one GPU at once would each wait on the other's row in the exclusion check and
            # deadlock; locking the GPU first orders them, so the second meets the constraint's clear refusal.
            Gpu.objects.select_for_update().filter(pk=gpu.pk).values_list("pk", flat=True).first()
            allocation = Allocation.objects.create(
                tenant=tenant, gpu=gpu, mig_instance=mig_instance, slot_lo=slots[0], slot_hi=slots[1],
                starts_at=starts_at, ends_at=ends_at, created_by=by, request=request,
            )
    except IntegrityError as exc:
        if "allocation_no_overlap" not in str(exc):
            raise
        raise CapacityError(
            f"{unit[0].upper()}{unit[1:]} of GPU {gpu.index} on {gpu.node} is already allocated for part of that "
            "period."
        ) from None
    _reattribute_past(starts_at, ends_at)
    return allocation


def _check_sellable(gpu: Gpu, mig_instance: MigInstance | None, ends_at: datetime | None) -> None:
    """An allocation that holds a unit from now on goes only to a sellable node's units that are not cordoned;
    recording one wholly in the past corrects the books and is not judged by today's state."""
    if ends_at is not None and ends_at <= timezone.now():
        return
    node = gpu.node
    if node.lifecycle != NodeLifecycle.SELLABLE:
        raise CapacityError(f"{node} is {node.get_lifecycle_display().lower()}, not sellable: its units cannot be "
                            "allocated until it passes its acceptance test.")
    out = cordoned(node_ids=[node.pk])
    mig_ids = [mig_instance.pk] if mig_instance else list(gpu.mig_instances.values_list("pk", flat=True))
    if out.blocks_gpu_anywhere(node_id=node.pk, gpu_id=gpu.pk, mig_ids=mig_ids):
        raise CapacityError(f"GPU {gpu.index} on {node} is cordoned by a health incident: choose another unit.")


def _check_certified(gpu: Gpu, ends_at: datetime | None) -> None:
    """Where the placement policy excludes nodes off the certified stack, a new allocation that holds a unit from
    now on is refused on one; the past is not judged by today's stack (as in _check_sellable)."""
    if ends_at is not None and ends_at <= timezone.now():
        return
    off = nodes_excluded(node_ids=[gpu.node_id]).get(gpu.node_id)
    if off is not None:
        raise CapacityError(f"{gpu.node} is off the certified stack {off.stack.name} ({off.summary}): the placement "
                            "policy excludes it from new allocations, so choose another unit.")


def _check_on_books(gpu: Gpu, starts_at: datetime, ends_at: datetime | None) -> None:
    """A unit can only be held while it is on the books: not before its (or its node's) installation, not after
    its retirement."""
    installed = max(gpu.installed_at, gpu.node.installed_at)
    if starts_at < installed:
        raise CapacityError(f"GPU {gpu.index} on {gpu.node} is on the books from {installed:%Y-%m-%d %H:%M} UTC: "
                            "an allocation cannot start before it existed.")
    retired = min((t for t in (gpu.retired_at, gpu.node.retired_at) if t is not None), default=None)
    if retired is not None and (ends_at is None or ends_at > retired):
        raise CapacityError(f"GPU {gpu.index} on {gpu.node} was retired on {retired:%Y-%m-%d %H:%M} UTC: an "
                            "allocation must end by then.")


def _reattribute_past(start: datetime, end: datetime | None) -> None:
    """An allocation change that reaches into the past changes who paid for those hours: recompute them."""
    reattribution_request(start=start, end=end)


def allocation_end(*, allocation: Allocation, at: datetime | None = None) -> Allocation | None:
    """End an allocation now (or at `at`). One that had not started yet is withdrawn: nothing was held."""
    at = at or timezone.now()
    if allocation.ends_at is not None and allocation.ends_at <= at:
        raise CapacityError("This allocation has already ended.")
    if at <= allocation.starts_at:
        allocation.delete()
        return None
    allocation.ends_at = at
    allocation.save(update_fields=["ends_at"])
    _reattribute_past(at, None)
    return allocation


def allocation_move(*, allocation: Allocation, gpu: Gpu, mig_instance: MigInstance | None, by: User | None,
                    at: datetime | None = None) -> Allocation:
    """Hand a tenant a replacement unit: the allocation ends at `at` and a new one on the other unit starts
    then, in one transaction, so the tenant holds exactly one of the two at every instant."""
    at = at or timezone.now()
    with transaction.atomic():
        allocation_end(allocation=allocation, at=at)
        return allocation_create(tenant=allocation.tenant, gpu=gpu, mig_instance=mig_instance, starts_at=at,
                                 by=by, request=allocation.request)


def allocations_release_node(*, node: Node, at: datetime | None = None) -> int:
    """End every current or future allocation on a node's GPUs (decommissioning)."""
    at = at or timezone.now()
    released = 0
    for allocation in Allocation.objects.filter(gpu__node=node).exclude(ends_at__lte=at):
        allocation_end(allocation=allocation, at=at)
        released += 1
    return released


def capacity_request_create(
    *, tenant: Tenant, by: User | None, model_name: str, gpu_type: str, count: int, mig_profile: str = "",
    starts_at: datetime, note: str = "",
) -> CapacityRequest:
    if count < 1:
        raise CapacityError("Ask for at least one unit.")
    return CapacityRequest.objects.create(
        tenant=tenant, requested_by=by, model_name=model_name, gpu_type=gpu_type, count=count,
        mig_profile=mig_profile, starts_at=starts_at, note=note,
    )


def capacity_request_fulfil(
    *, request: CapacityRequest, units: list[tuple[Gpu, MigInstance | None]], by: User | None,
    ends_at: datetime | None = None,
) -> list[Allocation]:
    """Allocate the chosen units for the request, all or none."""
    if request.status != RequestStatus.OPEN:
        raise CapacityError(f"This request is already {request.get_status_display().lower()}.")
    if len(units) != request.count:
        raise CapacityError(f"The request is for {request.count} unit(s); {len(units)} chosen.")
    with transaction.atomic():
        allocations = [
            allocation_create(tenant=request.tenant, gpu=gpu, mig_instance=mig, starts_at=request.starts_at,
                              ends_at=ends_at, by=by, request=request)
            for gpu, mig in units
        ]
        request.status = RequestStatus.FULFILLED
        request.decided_at, request.decided_by = timezone.now(), by
        request.save(update_fields=["status", "decided_at", "decided_by"])
    return allocations


def capacity_request_decline(*, request: CapacityRequest, by: User | None, reason: str) -> CapacityRequest:
    if request.status != RequestStatus.OPEN:
        raise CapacityError(f"This request is already {request.get_status_display().lower()}.")
    request.status, request.decision_note = RequestStatus.DECLINED, reason
    request.decided_at, request.decided_by = timezone.now(), by
    request.save(update_fields=["status", "decision_note", "decided_at", "decided_by"])
    return request


def deployment_create(
    *, tenant: Tenant, name: str, model_name: str, engine: str, node: Node, metrics_url: str,
    allocations: list[Allocation], settings: dict | None = None, active_from: datetime | None = None,
) -> Deployment:
    """Record a deployment and tell the node's agent to scrape its endpoint (the ingest reply carries it)."""
    if not allocations:
        raise CapacityError("A deployment runs on at least one allocated unit.")
    foreign = [a for a in allocations if a.tenant_id != tenant.pk or a.gpu.node_id != node.pk]
    if foreign:
        raise CapacityError("Every unit must be allocated to the tenant, on the deployment's node.")
    with transaction.atomic():
        try:
            with transaction.atomic():
                deployment = Deployment.objects.create(
                    tenant=tenant, name=name, model_name=model_name, engine=engine, node=node,
                    metrics_url=metrics_url, settings=settings or {}, active_from=active_from or timezone.now(),
                )
        except IntegrityError:
            raise CapacityError(f"{metrics_url} on {node} already belongs to a live deployment.") from None
        deployment.allocations.set(allocations)
        targets = list(ScrapeTarget.objects.filter(node=node).values("url", "engine", "model"))
        if metrics_url not in {t["url"] for t in targets}:
            node_set_scrape_targets(node=node, targets=[*targets, {"url": metrics_url, "engine": engine,
                                                                   "model": model_name}])
        _reattribute_past(deployment.active_from, None)  # a backdated deployment owns its past hours too
    return deployment


def deployment_end(*, deployment: Deployment, at: datetime | None = None) -> Deployment:
    """Stop attributing the endpoint's usage to the tenant and stop scraping it."""
    at = at or timezone.now()
    with transaction.atomic():
        deployment.ended_at = at
        deployment.save(update_fields=["ended_at"])
        targets = ScrapeTarget.objects.filter(node=deployment.node).exclude(url=deployment.metrics_url)
        node_set_scrape_targets(node=deployment.node, targets=list(targets.values("url", "engine", "model")))
        _reattribute_past(at, None)
    return deployment


def quota_set(*, tenant: Tenant, tokens_per_minute: int | None, gpus: int | None) -> Quota:
    quota, _ = Quota.objects.update_or_create(tenant=tenant, defaults={"tokens_per_minute": tokens_per_minute,
                                                                        "gpus": gpus})
    return quota


def quotas_check(*, now: datetime | None = None) -> list[str]:
    """Alert on every tenant over a quota (tokens in the last rolled-up minute, GPUs held now); resolve the alert
    once it is back under. Idempotent; returns the keys of open quota alerts."""
    now = now or timezone.now()
    over = []
    for quota in Quota.objects.select_related("tenant").filter(tenant__status=TenantStatus.ACTIVE):
        checks = (
            ("tokens", quota.tokens_per_minute, tenant_usage_last_minute(tenant=quota.tenant, now=now),
             "tokens per minute"),
            ("gpus", quota.gpus, tenant_gpus_held(tenant=quota.tenant, at=now), "GPUs held"),
        )
        for name, limit, used, label in checks:
            key = f"quota:{name}:{quota.tenant_id}"
            if limit is not None and used > limit:
                alert_raise(key=key, kind="quota", severity=Severity.WARNING, at=now,
                            title=f"{quota.tenant} is over its {label} quota",
                            # tokens are whole; GPUs held count MIG slices in sevenths
                            detail=f"{used:,} used against a quota of {limit:,}" if isinstance(used, int) else
                            f"{used:,.2f} used against a quota of {limit:,}")
                over.append(key)
            else:
                alert_resolve_key(key=key)
    return over


UNBILLABLE_ALERT = "unbillable_endpoint"


def deployments_check_billable(*, now: datetime | None = None) -> list[int]:
    """Alert on every live deployment whose endpoint answers without any token counter the agent knows (its node's
    agent reports the families it finds): its tenant's tokens would go unbilled with every light green. Resolve
    the alert once the families are back or the deployment ended. Idempotent; returns the deployments alerted."""
    now = now or timezone.now()
    live = list(Deployment.objects.filter(ended_at__isnull=True, active_from__lte=now).select_related("tenant", "node"))
    unbillable = deployments_unbillable(deployments=live)
    alerted = []
    for deployment in live:
        if deployment.pk not in unbillable:
            continue
        since, model = unbillable[deployment.pk].since, unbillable[deployment.pk].model
        alert_raise(
            key=f"{UNBILLABLE_ALERT}:{deployment.pk}", kind=UNBILLABLE_ALERT, severity=Severity.CRITICAL, at=now,
            node_id=deployment.node_id,
            title=f"{deployment.name} ({deployment.tenant}) exposes no token counters: its tokens are not billed",
            detail=(f"{deployment.metrics_url} on {deployment.node.hostname} answers, but with none of the token "
                    f"families the agent reads for {deployment.get_engine_display()} (model {model}), since "
                    f"{since:%Y-%m-%d %H:%M} UTC. Check the engine's metrics prefix or version (docs/agent.md)."),
        )
        alerted.append(deployment.pk)
    alert_resolve_others(kind=UNBILLABLE_ALERT, keep=[f"{UNBILLABLE_ALERT}:{pk}" for pk in alerted])
    return alerted
