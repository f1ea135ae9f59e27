"""Where a site's bring-up stands: nodes per lifecycle stage, GPUs sellable against the plan, days on the 90-day
clock, and the day the plan completes at the rate GPUs have become sellable so far."""

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from django.db.models import Prefetch
from django.utils import timezone

from portal.bringup.models import BringUpPlan
from portal.fleet.models import Gpu, Node, NodeLifecycle, NodeLifecycleChange, Site
from portal.health.selectors import cordoned

PIPELINE = (NodeLifecycle.PLANNED, NodeLifecycle.PROVISIONING, NodeLifecycle.BURN_IN, NodeLifecycle.SELLABLE,
            NodeLifecycle.CORDONED, NodeLifecycle.RETIRED)


@dataclass
class BringUp:
    site: Site
    plan: BringUpPlan
    today: date
    stages: dict[str, int]  # nodes per lifecycle value; PLANNED includes nodes of the plan not yet named
    planned_nodes: int
    planned_gpus: int
    sellable_gpus: int
    nodes: list[Node] = field(default_factory=list)

    @property
    def pipeline(self) -> list[tuple[NodeLifecycle, int]]:
        return [(NodeLifecycle(s), self.stages[s]) for s in PIPELINE]

    @property
    def days_elapsed(self) -> int:
        return max(0, (self.today - self.plan.started_on).days)

    @property
    def target_date(self) -> date:
        return self.plan.started_on + timedelta(days=self.plan.target_days)

    @property
    def rate_per_day(self) -> float | None:
        """GPUs made sellable per day since the clock started; None before the first one."""
        return self.sellable_gpus / max(1, self.days_elapsed) if self.sellable_gpus else None

    @property
    def projected_date(self) -> date | None:
        if self.sellable_gpus >= self.planned_gpus:
            return self.today
        if self.rate_per_day is None:
            return None
        return self.today + timedelta(days=math.ceil((self.planned_gpus - self.sellable_gpus) / self.rate_per_day))

    @property
    def days_late(self) -> int | None:
        """Days the projection ends after the target (negative: early); None without a projection."""
        return (self.projected_date - self.target_date).days if self.projected_date else None

    @property
    def days_ahead(self) -> int:
        return -self.days_late if self.days_late is not None and self.days_late < 0 else 0

    @property
    def under_way(self) -> bool:
        return self.sellable_gpus < self.planned_gpus

    @property
    def sellable_share(self) -> float:
        return self.sellable_gpus / self.planned_gpus if self.planned_gpus else 0.0


def site_bringup(*, site: Site, now: datetime | None = None) -> BringUp | None:
    """The site's bring-up, or None when it has no plan."""
    plan = BringUpPlan.objects.filter(site=site).prefetch_related("lines").first()
    if plan is None:
        return None
    return _bringup(plan, (now or timezone.now()).date())


def bringups_under_way(*, now: datetime | None = None) -> list[BringUp]:
    """Every site whose planned GPUs are not all sellable yet, for the fleet page."""
    today = (now or timezone.now()).date()
    plans = BringUpPlan.objects.select_related("site").prefetch_related("lines").order_by("site__name")
    return [b for b in (_bringup(p, today) for p in plans) if b.under_way]


def _bringup(plan: BringUpPlan, today: date) -> BringUp:
    nodes = list(Node.objects.filter(site=plan.site).order_by("hostname").prefetch_related(
        Prefetch("lifecycle_changes", queryset=NodeLifecycleChange.objects.order_by("at", "pk"))))
    stages = Counter(n.lifecycle for n in nodes)
    planned_nodes = sum(line.nodes for line in plan.lines.all())
    in_plan = sum(1 for n in nodes if n.lifecycle != NodeLifecycle.RETIRED)
    stages[NodeLifecycle.PLANNED] += max(0, planned_nodes - in_plan)
    return BringUp(
        site=plan.site, plan=plan, today=today, stages={s: stages.get(s, 0) for s in PIPELINE},
        planned_nodes=planned_nodes, planned_gpus=sum(line.gpus for line in plan.lines.all()),
        sellable_gpus=sellable_gpus(nodes=[n for n in nodes if n.lifecycle == NodeLifecycle.SELLABLE]),
        nodes=nodes,
    )


def sellable_gpus(*, nodes: list[Node]) -> int:
    """GPUs in service on these nodes that are not cordoned (whole GPUs; a GPU with a cordoned MIG instance is
    still mostly sellable and counts)."""
    out = cordoned(node_ids=[n.pk for n in nodes])
    gpus = Gpu.objects.filter(node__in=nodes, retired_at__isnull=True).values_list("pk", "node_id")
    return sum(1 for gpu_id, node_id in gpus if node_id not in out.node_ids and gpu_id not in out.gpu_ids)
