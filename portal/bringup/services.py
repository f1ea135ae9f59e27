"""Writing a site's bring-up plan and naming its planned nodes; both audited."""

from datetime import date

from django.db import transaction
from django.utils import timezone

from portal.accounts.models import User
from portal.audit.services import audit_record
from portal.bringup.models import BringUpPlan, PlannedCapacity
from portal.fleet.models import Node, Site
from portal.fleet.services import nodes_plan


class BringUpError(Exception):
    """A plan change that cannot be made; `field` names the form field at fault."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def plan_set(*, site: Site, started_on: date, target_days: int, soak_minutes: int, note: str,
             by: User | None) -> BringUpPlan:
    with transaction.atomic():
        plan, created = BringUpPlan.objects.update_or_create(site=site, defaults={
            "started_on": started_on, "target_days": target_days, "soak_minutes": soak_minutes, "note": note,
        })
        if created:
            plan.created_by = by
            plan.save(update_fields=["created_by"])
        audit_record(actor=by, action="bringup.plan_set", target=plan, after={
            "started_on": started_on.isoformat(), "target_days": target_days, "soak_minutes": soak_minutes})
    return plan


def plan_line_set(*, plan: BringUpPlan, gpu_model: str, nodes: int, gpus_per_node: int,
                  by: User | None) -> PlannedCapacity:
    """Plan so many nodes of one GPU model (replacing that model's line)."""
    with transaction.atomic():
        line, _ = PlannedCapacity.objects.update_or_create(
            plan=plan, gpu_model=gpu_model, defaults={"nodes": nodes, "gpus_per_node": gpus_per_node})
        audit_record(actor=by, action="bringup.plan_line_set", target=plan,
                     after={"gpu_model": gpu_model, "nodes": nodes, "gpus_per_node": gpus_per_node})
    return line


def planned_nodes_name(*, plan: BringUpPlan, line: PlannedCapacity, hostnames: list[str],
                       by: User | None) -> list[Node]:
    """Name nodes of a plan line, so provisioning can take them (by hostname) through burn-in to sale."""
    named = Node.objects.filter(site=plan.site, planned_gpu_model=line.gpu_model).exclude(
        lifecycle="retired").count()
    if named + len(hostnames) > line.nodes:
        raise BringUpError(f"the plan has {line.nodes} {line.gpu_model} node(s) and {named} are named already: "
                           "raise the plan's node count first", field="hostnames")
    try:
        with transaction.atomic():
            nodes = nodes_plan(site=plan.site, hostnames=hostnames, gpu_model=line.gpu_model,
                               gpus=line.gpus_per_node, at=timezone.now(), by=by)
            audit_record(actor=by, action="bringup.nodes_named", target=plan,
                         after={"gpu_model": line.gpu_model, "hostnames": hostnames})
    except ValueError as exc:
        raise BringUpError(str(exc), field="hostnames") from None
    return nodes
