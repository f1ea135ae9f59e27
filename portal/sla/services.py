"""Writes for SLAs: evaluating a tenant's objectives for a window end, and editing policies."""

from datetime import datetime, timedelta
from decimal import Decimal

from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone

from portal.accounts.models import User
from portal.alerts.models import Severity
from portal.alerts.services import alert_raise, alert_resolve_key
from portal.audit.services import audit_record, snapshot
from portal.health.models import Incident
from portal.health.selectors import incidents_affecting
from portal.sla.models import (
    HIGHER_IS_BETTER,
    SLI_UNITS,
    SlaBreach,
    SlaEvaluation,
    SlaObjective,
    SlaPolicy,
    Sli,
    sli_met,
)
from portal.sla.selectors import Reading, objectives_for_tenant, sli_readings
from portal.tenants.models import Plan, Tenant

ALERT_KIND = "sla_breach"


class SlaError(Exception):
    """A policy change that cannot be made (the message is safe to show)."""


def sla_alert_key(*, tenant: Tenant, sli: str) -> str:
    return f"sla:{tenant.pk}:{sli}"


def sla_evaluate_tenant(*, tenant: Tenant, window_end: datetime, now: datetime | None = None,
                        windows: set[int] | None = None) -> list[SlaEvaluation]:
    """Measure each of the tenant's objectives (those with these window lengths, if given) over its window ending
    at `window_end` and record the result; a failing window opens (or extends) a breach and raises the tenant+SLI
    alert, a compliant one ends the breach and resolves it. Idempotent: an (tenant, SLI, window end) already
    evaluated is skipped, so a re-run writes nothing. Returns the evaluations written by this call."""
    done = set(SlaEvaluation.objects.filter(tenant=tenant, window_end=window_end).values_list("sli", flat=True))
    objectives = [o for o in objectives_for_tenant(tenant=tenant)
                  if o.sli not in done and (windows is None or o.window in windows)]
    readings: dict[int, dict[str, Reading]] = {}
    for window in {o.window for o in objectives}:
        readings[window] = sli_readings(tenant=tenant, start=window_end - timedelta(seconds=window), end=window_end,
                                        now=now, slis={o.sli for o in objectives if o.window == window})
    written = []
    longest = max((o.window for o in objectives), default=0)
    affecting = incidents_affecting(tenant=tenant, start=window_end - timedelta(seconds=longest),
                                    end=window_end) if objectives else []
    for objective in objectives:
        reading = readings[objective.window][objective.sli]
        compliant = None if reading.value is None else sli_met(objective.sli, reading.value, objective.target)
        incident = _first_overlapping(affecting, window_end - timedelta(seconds=objective.window), window_end)
        try:
            with transaction.atomic():
                evaluation = SlaEvaluation.objects.create(
                    tenant=tenant, sli=objective.sli, window_end=window_end, window_seconds=objective.window,
                    target=objective.target, value=reading.value, compliant=compliant, samples=reading.samples,
                    incident=incident)
                _track_breach(tenant=tenant, objective=objective, evaluation=evaluation)
        except IntegrityError:
            continue  # another worker evaluated the same window first
        written.append(evaluation)
    return written


def _first_overlapping(incidents: list[Incident], start: datetime, end: datetime) -> Incident | None:
    now = timezone.now()
    return next((i for i in incidents if i.opened_at < end and (i.closed_at or now) > start), None)


def sla_windows_mark(*, tenant: Tenant, start: datetime, end: datetime) -> int:
    """Mark the tenant's windows already evaluated that overlap [start, end) with the first health incident on a
    unit it held meanwhile (an incident reported late, or still open). Returns the windows whose mark changed."""
    longest = SlaEvaluation.objects.filter(tenant=tenant).aggregate(w=Max("window_seconds"))["w"] or 0
    rows = list(SlaEvaluation.objects.filter(tenant=tenant, window_end__gt=start,
                                             window_end__lt=end + timedelta(seconds=longest)))
    if not rows:
        return 0
    affecting = incidents_affecting(tenant=tenant, start=start - timedelta(seconds=longest),
                                    end=end + timedelta(seconds=longest))
    changed = []
    for row in rows:
        incident = _first_overlapping(affecting, row.window_end - timedelta(seconds=row.window_seconds),
                                      row.window_end)
        if incident is not None and row.incident_id != incident.pk:
            row.incident = incident
            changed.append(row)
    SlaEvaluation.objects.bulk_update(changed, ["incident"])
    return len(changed)


def _track_breach(*, tenant: Tenant, objective: SlaObjective, evaluation: SlaEvaluation) -> None:
    if evaluation.compliant is None:
        return
    key = sla_alert_key(tenant=tenant, sli=objective.sli)
    open_breach = SlaBreach.objects.select_for_update().filter(tenant=tenant, sli=objective.sli,
                                                               ended_at__isnull=True).first()
    if evaluation.compliant:
        if open_breach is not None and evaluation.window_end > open_breach.last_failed_at:
            open_breach.ended_at = evaluation.window_end
            open_breach.save(update_fields=["ended_at"])
            alert_resolve_key(key=key)
        return
    value = evaluation.value
    if open_breach is None:
        SlaBreach.objects.create(tenant=tenant, sli=objective.sli, target=objective.target,
                                 started_at=evaluation.window_end, last_failed_at=evaluation.window_end,
                                 worst_value=value)
    else:
        worst = min if objective.sli in HIGHER_IS_BETTER else max
        open_breach.worst_value = worst(value, open_breach.worst_value)
        open_breach.last_failed_at = max(open_breach.last_failed_at, evaluation.window_end)
        open_breach.windows += 1
        open_breach.save(update_fields=["worst_value", "last_failed_at", "windows"])
    unit = SLI_UNITS[Sli(objective.sli)]
    alert_raise(
        key=key, kind=ALERT_KIND, severity=Severity.WARNING, at=evaluation.window_end,
        title=f"SLA breach: {tenant.name} {Sli(objective.sli).label}",
        detail=(f"{value:.4g} {unit} against a target of {objective.target_label} over the "
                f"{objective.get_window_display()} window ending {evaluation.window_end:%Y-%m-%d %H:%M} UTC"),
    )


def sla_policy_create(*, name: str, by: User | None, plan: Plan | None = None,
                      tenant: Tenant | None = None) -> SlaPolicy:
    if (plan is None) == (tenant is None):
        raise SlaError("A policy belongs to a plan or overrides one tenant's plan: choose exactly one.")
    if plan is not None and SlaPolicy.objects.filter(plan=plan).exists():
        raise SlaError(f"Plan {plan} already has an SLA policy.")
    if tenant is not None and SlaPolicy.objects.filter(tenant=tenant).exists():
        raise SlaError(f"{tenant} already has an SLA override.")
    with transaction.atomic():
        policy = SlaPolicy.objects.create(name=name, plan=plan, tenant=tenant)
        audit_record(actor=by, action="sla.policy.create", target=policy, tenant=tenant,
                     after={"name": name, "scope": policy.scope})
    return policy


def sla_objective_set(*, policy: SlaPolicy, sli: str, target: Decimal, window: int, credit_pct: Decimal,
                      by: User | None) -> SlaObjective:
    """Add an objective to a policy or change its target, window or credit. Past evaluations keep the target they
    were measured against."""
    fields = ["sli", "target", "window", "credit_pct"]
    with transaction.atomic():
        objective = SlaObjective.objects.select_for_update().filter(policy=policy, sli=sli).first()
        before = snapshot(objective, fields) if objective else None
        if objective is None:
            objective = SlaObjective(policy=policy, sli=sli)
        objective.target, objective.window, objective.credit_pct = target, window, credit_pct
        objective.full_clean()
        objective.save()
        audit_record(actor=by, action="sla.objective.set", target=f"{policy}: {objective}", tenant=policy.tenant,
                     before=before, after=snapshot(objective, fields))
    return objective


def sla_objective_remove(*, policy: SlaPolicy, sli: str, by: User | None) -> None:
    with transaction.atomic():
        objective = SlaObjective.objects.filter(policy=policy, sli=sli).first()
        if objective is None:
            return
        before = snapshot(objective, ["sli", "target", "window", "credit_pct"])
        objective.delete()
        audit_record(actor=by, action="sla.objective.remove", target=f"{policy}: {objective}", tenant=policy.tenant,
                     before=before)


def evaluation_window_end(now: datetime | None = None) -> datetime:
    """Windows end on hour boundaries: the end of the latest whole hour."""
    return (now or timezone.now()).replace(minute=0, second=0, microsecond=0)
