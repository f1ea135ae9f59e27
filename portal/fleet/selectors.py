from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db.models import Avg, Count, Prefetch, Q, QuerySet, Sum
from django.utils import timezone

from portal.alerts.models import Alert
from portal.fleet.models import EnrollmentToken, Gpu, HealthEvent, MigInstance, Node, NodeStatus, Site


@dataclass
class FleetHeadline:
    gpus_total: int
    gpus_online: int
    util_now: float | None
    power_now_kw: float | None
    nodes_by_status: dict[str, int]
    open_alerts: int


@dataclass
class SiteGrid:
    site: Site
    nodes: list[Node] = field(default_factory=list)


def fleet_headline(*, now: datetime | None = None) -> FleetHeadline:
    now = now or timezone.now()
    online = Q(node__status=NodeStatus.ONLINE)
    gpu = Gpu.objects.aggregate(
        total=Count("id"),
        online=Count("id", filter=online),
        util=Avg("current_util", filter=online),
        power=Sum("current_power_w", filter=online),
    )
    statuses = dict(Node.objects.values_list("status").annotate(n=Count("id")))
    return FleetHeadline(
        gpus_total=gpu["total"],
        gpus_online=gpu["online"],
        util_now=gpu["util"],
        power_now_kw=gpu["power"] / 1000 if gpu["power"] is not None else None,
        nodes_by_status=statuses,
        open_alerts=Alert.objects.filter(resolved_at__isnull=True).count(),
    )


def fleet_grid(*, site_id: int | None = None, status: str | None = None, gpu_name: str | None = None) -> list[SiteGrid]:
    """Sites with their nodes, GPUs and MIG instances, in three queries whatever the fleet's size."""
    nodes: QuerySet[Node] = Node.objects.select_related("site").exclude(status=NodeStatus.DECOMMISSIONED)
    if site_id:
        nodes = nodes.filter(site_id=site_id)
    if status:
        nodes = nodes.filter(status=status)
    gpus = Gpu.objects.prefetch_related(Prefetch("mig_instances", queryset=MigInstance.objects.order_by("gi_id")))
    if gpu_name:
        nodes = nodes.filter(gpus__name=gpu_name).distinct()
        gpus = gpus.filter(name=gpu_name)
    grids: dict[int, SiteGrid] = {}
    for node in nodes.prefetch_related(Prefetch("gpus", queryset=gpus.order_by("index"))).order_by(
        "site__name", "hostname"
    ):
        grids.setdefault(node.site_id, SiteGrid(site=node.site)).nodes.append(node)
    return list(grids.values())


def node_detail(*, node_id: int) -> Node:
    return Node.objects.select_related("site").prefetch_related(
        Prefetch("gpus", queryset=Gpu.objects.order_by("index").prefetch_related("mig_instances")),
        "endpoints",
    ).get(pk=node_id)


def node_health_events(*, node: Node, since: timedelta = timedelta(days=7), limit: int = 50) -> QuerySet[HealthEvent]:
    return (
        HealthEvent.objects.filter(node=node, at__gte=timezone.now() - since)
        .select_related("gpu")
        .order_by("-at")[:limit]
    )


def gpu_models() -> list[str]:
    return list(Gpu.objects.order_by("name").values_list("name", flat=True).distinct())


def recent_enrollment_tokens(*, limit: int = 20) -> QuerySet[EnrollmentToken]:
    return EnrollmentToken.objects.select_related("site", "created_by", "node").order_by("-created_at")[:limit]
