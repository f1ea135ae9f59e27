"""Reading the health policy's state: the rules, which units are cordoned, the incidents a tenant was affected by
and the notices it got."""

from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import Q, QuerySet
from django.utils import timezone

from portal.capacity.models import Allocation
from portal.health.catalog import CATALOG, Action
from portal.health.models import Cordon, HealthRule, Incident, TenantNotice
from portal.tenants.models import Tenant


def rules() -> list[HealthRule]:
    """The policy in force, one rule per XID: the operator's saved rule, else NVIDIA's catalog default (unsaved,
    so a code the catalog adds later applies without a migration)."""
    saved = {r.xid: r for r in HealthRule.objects.select_related("updated_by")}
    defaults = {code: _default(code) for code in CATALOG if code not in saved}
    return sorted([*saved.values(), *defaults.values()], key=lambda r: r.xid)


def rule_for(*, xid: int) -> HealthRule:
    saved = HealthRule.objects.filter(xid=xid).first()
    if saved is not None:
        return saved
    if xid in CATALOG:
        return _default(xid)
    return HealthRule(xid=xid, title="Unlisted XID", action=Action.RECORD)


def _default(code: int) -> HealthRule:
    entry = CATALOG[code]
    return HealthRule(xid=code, title=entry.title, nvidia_action=entry.nvidia_action, action=entry.action,
                      note=entry.note[:300])


@dataclass
class Cordoned:
    """Open cordons by scope, for placement: a unit is out if its node, its GPU or (MIG) its instance is."""

    node_ids: set[int] = field(default_factory=set)
    gpu_ids: set[int] = field(default_factory=set)
    mig_ids: set[int] = field(default_factory=set)

    def blocks(self, *, node_id: int, gpu_id: int, mig_id: int | None) -> bool:
        return node_id in self.node_ids or gpu_id in self.gpu_ids or (mig_id is not None and mig_id in self.mig_ids)

    def blocks_gpu_anywhere(self, *, node_id: int, gpu_id: int, mig_ids: list[int]) -> bool:
        """A whole-GPU allocation needs every slice free of cordons."""
        return self.blocks(node_id=node_id, gpu_id=gpu_id, mig_id=None) or bool(self.mig_ids & set(mig_ids))


def cordoned(*, node_ids: list[int] | None = None) -> Cordoned:
    rows = Cordon.objects.filter(ended_at__isnull=True)
    if node_ids is not None:
        rows = rows.filter(node_id__in=node_ids)
    found = Cordoned()
    for node_id, gpu_id, mig_id in rows.values_list("node_id", "gpu_id", "mig_instance_id"):
        if mig_id is not None:
            found.mig_ids.add(mig_id)
        elif gpu_id is not None:
            found.gpu_ids.add(gpu_id)
        else:
            found.node_ids.add(node_id)
    return found


def open_cordons(*, node_ids: list[int] | None = None) -> QuerySet[Cordon]:
    rows = (Cordon.objects.filter(ended_at__isnull=True)
            .select_related("node", "node__site", "gpu", "mig_instance", "incident", "started_by"))
    return rows.filter(node_id__in=node_ids) if node_ids is not None else rows


def cordon_history(*, node_id: int) -> QuerySet[Cordon]:
    return (Cordon.objects.filter(node_id=node_id).select_related("gpu", "mig_instance", "incident", "started_by",
                                                                  "ended_by"))


def incidents(*, open_only: bool = False, node_id: int | None = None) -> QuerySet[Incident]:
    rows = Incident.objects.select_related("node", "node__site", "gpu")
    if open_only:
        rows = rows.filter(closed_at__isnull=True)
    return rows.filter(node_id=node_id) if node_id is not None else rows


def allocations_hit(*, incident: Incident) -> QuerySet[Allocation]:
    """The allocations that held the incident's unit at some point while it was open: their tenants are told,
    and their SLA windows in that period are marked."""
    end = incident.closed_at or timezone.now()
    rows = Allocation.objects.filter(starts_at__lt=end).filter(
        Q(ends_at__isnull=True) | Q(ends_at__gt=incident.opened_at)).select_related("tenant", "gpu", "mig_instance")
    if _gpu_wide(incident):
        return rows.filter(gpu_id=incident.gpu_id)
    return rows.filter(gpu__node_id=incident.node_id)


def _gpu_wide(incident: Incident) -> bool:
    """An incident touches its GPU only, unless it has none or its action takes the whole node out."""
    return incident.gpu_id is not None and incident.action != Action.CORDON_NODE


def incidents_affecting(*, tenant: Tenant, start: datetime, end: datetime) -> list[Incident]:
    """Incidents (other than record-only ones) that overlapped [start, end) on a unit the tenant held meanwhile,
    oldest first."""
    held = list(Allocation.objects.filter(tenant=tenant, starts_at__lt=end)
                .filter(Q(ends_at__isnull=True) | Q(ends_at__gt=start))
                .values_list("gpu_id", "gpu__node_id", "starts_at", "ends_at"))
    if not held:
        return []
    candidates = (Incident.objects.exclude(action=Action.RECORD)
                  .filter(node_id__in={n for _, n, *_ in held}, opened_at__lt=end)
                  .filter(Q(closed_at__isnull=True) | Q(closed_at__gt=start)).order_by("opened_at", "pk"))
    now = timezone.now()
    found = []
    for incident in candidates:
        lo, hi = incident.opened_at, incident.closed_at or now
        for gpu_id, node_id, a_start, a_end in held:
            same_unit = gpu_id == incident.gpu_id if _gpu_wide(incident) else node_id == incident.node_id
            if same_unit and a_start < hi and (a_end is None or a_end > lo):
                found.append(incident)
                break
    return found


def notices_for_tenant(*, tenant: Tenant, limit: int = 20) -> QuerySet[TenantNotice]:
    return TenantNotice.objects.filter(tenant=tenant).select_related("incident")[:limit]
