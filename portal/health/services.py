"""The health policy at work: XID events become incidents, incidents open cordons and tell the tenants who hold
the unit, quiet incidents close, and cordons end after a passing acceptance test or an audited override.

Called by the ingest store (health_events_apply) with the events a batch carried, by the beat
(incidents_close_quiet), by the burn-in's accept step (cordons_end) and by operator admins' views."""

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from portal.accounts.models import User
from portal.audit.services import audit_record
from portal.fleet.models import Gpu, HealthEvent, HealthEventKind, MigInstance, Node, NodeLifecycle
from portal.fleet.services import node_lifecycle_set
from portal.health.catalog import CATALOG, Action
from portal.health.models import DEFAULT_QUIET_MINUTES, Cordon, HealthRule, Incident, TenantNotice
from portal.health.selectors import allocations_hit, rule_for

CORDONING = (Action.CORDON_GPU, Action.CORDON_NODE)


class HealthError(Exception):
    """An operator action on the health policy that cannot be done; the message is safe to show."""


@dataclass(frozen=True)
class _Rule:
    action: str
    title: str
    quiet_minutes: int


def _rule(code: int | None, rules: dict[int, HealthRule]) -> _Rule:
    """The operator's rule for an XID where one was saved, else NVIDIA's catalog default; an XID neither lists
    is recorded (and alerted on as before), nothing more."""
    if code in rules:
        r = rules[code]
        return _Rule(action=r.action, title=r.title, quiet_minutes=r.quiet_minutes)
    entry = CATALOG.get(code) if code is not None else None
    if entry is not None:
        return _Rule(action=entry.action, title=entry.title, quiet_minutes=DEFAULT_QUIET_MINUTES)
    return _Rule(action=Action.RECORD, title="Unlisted XID", quiet_minutes=DEFAULT_QUIET_MINUTES)


def health_events_apply(*, events: list[HealthEvent]) -> list[Incident]:
    """Group each XID event into its incident (one per XID and GPU, until the rule's quiet period passes without
    another), and on a new incident do what the rule says. Returns the incidents opened or extended."""
    xids = [e for e in events if e.kind == HealthEventKind.XID]
    if not xids:
        return []
    rules = {r.xid: r for r in HealthRule.objects.filter(xid__in={e.code for e in xids})}
    touched: dict[int, Incident] = {}
    for event in sorted(xids, key=lambda e: e.at):
        incident = _incident_for(event, _rule(event.code, rules))
        touched[incident.pk] = incident
    return list(touched.values())


def _incident_for(event: HealthEvent, rule: _Rule) -> Incident:
    scope = f"gpu:{event.gpu_id}" if event.gpu_id else f"node:{event.node_id}"
    key = f"xid:{event.code}:{scope}"
    with transaction.atomic():
        incident = Incident.objects.select_for_update().filter(key=key, closed_at__isnull=True).first()
        if incident is not None and event.at <= incident.last_event_at + timedelta(minutes=incident.quiet_minutes):
            incident.events += 1
            incident.last_event_at = max(incident.last_event_at, event.at)
            incident.opened_at = min(incident.opened_at, event.at)
            incident.save(update_fields=["events", "last_event_at", "opened_at"])
            return incident
        if incident is not None:
            _close(incident)
        where = f"GPU {event.gpu.index}" if event.gpu_id else "the node"
        incident = Incident.objects.create(
            key=key, node_id=event.node_id, gpu_id=event.gpu_id, xid=event.code, action=rule.action,
            title=f"XID {event.code} ({rule.title}) on {where} of {event.node.hostname}", opened_at=event.at,
            last_event_at=event.at, quiet_minutes=rule.quiet_minutes,
        )
        _act(incident, event.node)
    return incident


def _act(incident: Incident, node: Node) -> None:
    if incident.action in CORDONING:
        gpu = incident.gpu if incident.action == Action.CORDON_GPU else None
        cordon_open(node=node, gpu=gpu, at=incident.opened_at, incident=incident,
                    reason=f"{incident.title}: {incident.get_action_display().lower()} by the health policy")
    elif incident.action == Action.NOTIFY_TENANT:
        notices_send(incident=incident)


def _close(incident: Incident) -> None:
    incident.closed_at = incident.last_event_at + timedelta(minutes=incident.quiet_minutes)
    incident.save(update_fields=["closed_at"])


def incidents_close_quiet(*, now: datetime | None = None) -> int:
    """Close XID incidents whose quiet period has passed; they close at the end of that period, not when this
    runs. Their cordons stay until the node passes its acceptance test."""
    now = now or timezone.now()
    closed = 0
    for incident in Incident.objects.filter(closed_at__isnull=True, xid__isnull=False):
        if incident.last_event_at + timedelta(minutes=incident.quiet_minutes) <= now:
            _close(incident)
            closed += 1
    return closed


def cordon_open(*, node: Node, at: datetime, reason: str, gpu: Gpu | None = None,
                mig_instance: MigInstance | None = None, incident: Incident | None = None,
                by: User | None = None) -> Cordon:
    """Take a unit out of placement. An operator's cordon gets an incident of its own, so its holders are told
    and their SLA windows marked as for an XID. A unit already cordoned keeps its first cordon."""
    scope_key = (f"mig:{mig_instance.pk}" if mig_instance else f"gpu:{gpu.pk}" if gpu else f"node:{node.pk}")
    with transaction.atomic():
        existing = Cordon.objects.filter(scope_key=scope_key, ended_at__isnull=True).first()
        if existing is not None:
            return existing
        if incident is None:
            unit = (f"MIG {mig_instance.profile} of GPU {gpu.index}" if mig_instance
                    else f"GPU {gpu.index}" if gpu else "the node")
            incident = Incident.objects.create(
                key=f"manual:{scope_key}", node=node, gpu=gpu,
                action=Action.CORDON_NODE if gpu is None else Action.CORDON_GPU,
                title=f"{unit} of {node.hostname} cordoned by {by or 'an operator'}: {reason}",
                opened_at=at, last_event_at=at,
            )
        cordon = Cordon.objects.create(node=node, gpu=gpu, mig_instance=mig_instance, scope_key=scope_key,
                                       incident=incident, reason=reason[:300], started_at=at, started_by=by)
        if gpu is None:
            node_lifecycle_set(node=node, lifecycle=NodeLifecycle.CORDONED, at=at, by=by, reason=reason)
        if by is not None:
            audit_record(actor=by, action="health.cordon", target=cordon, after={"scope": scope_key,
                                                                                 "reason": reason})
        notices_send(incident=incident)
    return cordon


def cordons_end(*, node: Node, at: datetime, reason: str, by: User | None, override: bool) -> int:
    """End every open cordon on the node (its own, its GPUs', its MIG instances'), with the operator's incidents
    that opened them. Called when the node passes its acceptance test."""
    with transaction.atomic():
        ended = Cordon.objects.filter(node=node, ended_at__isnull=True).update(
            ended_at=at, ended_by=by, end_reason=reason[:300], override=override)
        Incident.objects.filter(node=node, key__startswith="manual:", closed_at__isnull=True).update(closed_at=at)
    return ended


def cordon_override(*, cordon: Cordon, reason: str, by: User) -> None:
    """An operator admin returns a unit to sale without a passing acceptance test: audited, reason required."""
    if not reason.strip():
        raise HealthError("say why the unit may be sold without passing its acceptance test")
    at = timezone.now()
    with transaction.atomic():
        if not Cordon.objects.filter(pk=cordon.pk, ended_at__isnull=True).update(
                ended_at=at, ended_by=by, end_reason=reason[:300], override=True):
            raise HealthError("this cordon has already ended")
        if cordon.incident_id and cordon.incident.key.startswith("manual:"):
            Incident.objects.filter(pk=cordon.incident_id, closed_at__isnull=True).update(closed_at=at)
        if cordon.gpu_id is None and cordon.node.lifecycle == NodeLifecycle.CORDONED:
            node_lifecycle_set(node=cordon.node, lifecycle=NodeLifecycle.SELLABLE, at=at, by=by,
                               reason=f"cordon overridden by {by}: {reason}")
        audit_record(actor=by, action="health.cordon_override", target=cordon,
                     before={"scope": cordon.scope_key, "reason": cordon.reason}, after={"reason": reason})


def notices_send(*, incident: Incident) -> list[TenantNotice]:
    """Tell each tenant that held the incident's unit while it was open: a notice in its portal, mailed to its
    admins. Once per tenant and incident."""
    from portal.health.tasks import notice_mail  # the task module imports this one

    created = []
    for allocation in allocations_hit(incident=incident):
        unit = (f"MIG {allocation.mig_instance.profile} on GPU {allocation.gpu.index}" if allocation.mig_instance_id
                else f"GPU {allocation.gpu.index}") + f" of {incident.node.hostname}"
        cordoned = incident.action in CORDONING
        notice, new = TenantNotice.objects.get_or_create(
            tenant=allocation.tenant, incident=incident, defaults={
                "unit": unit, "created_at": timezone.now(),
                "title": f"{'Cordoned' if cordoned else 'Fault on'} {unit}",
                "body": _notice_body(incident, unit, cordoned),
            })
        if new:
            created.append(notice)
            transaction.on_commit(partial(notice_mail.delay, notice.pk, settings.PORTAL_BASE_URL), robust=True)
    return created


def _notice_body(incident: Incident, unit: str, cordoned: bool) -> str:
    entry = CATALOG.get(incident.xid) if incident.xid is not None else None
    lines = [f"{incident.title}, from {incident.opened_at:%Y-%m-%d %H:%M} UTC."]
    if entry is not None:
        lines.append(entry.note)
    if cordoned:
        lines.append(f"{unit} is out of placement until it passes its acceptance test; we will propose a "
                     "replacement unit. Your SLA windows in this period are marked with this incident.")
    else:
        lines.append("The GPU stays in service: this XID usually comes from the application (check its logs).")
    return " ".join(lines)


def rule_set(*, xid: int, action: str, quiet_minutes: int, note: str, by: User) -> HealthRule:
    """Save the operator's rule for an XID (the catalog's default until then); audited with what it replaced."""
    if action not in Action.values:
        raise HealthError(f"unknown action {action!r}")
    current = rule_for(xid=xid)
    before = {"action": current.action, "quiet_minutes": current.quiet_minutes, "note": current.note}
    entry = CATALOG.get(xid)
    with transaction.atomic():
        rule, _ = HealthRule.objects.update_or_create(xid=xid, defaults={
            "action": action, "quiet_minutes": quiet_minutes, "note": note, "updated_by": by,
            "updated_at": timezone.now(), "title": entry.title if entry else current.title,
            "nvidia_action": entry.nvidia_action if entry else "",
        })
        audit_record(actor=by, action="health.rule_set", target=rule, before=before,
                     after={"action": action, "quiet_minutes": quiet_minutes, "note": note})
    return rule
