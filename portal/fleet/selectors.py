from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

from django.db.models import Avg, Count, Max, Prefetch, Q, QuerySet, Sum
from django.utils import timezone

from portal.alerts.models import Alert
from portal.alerts.selectors import alert_state_counts
from portal.capacity.selectors import allocations_at
from portal.fleet.models import EnrollmentToken, Gpu, HealthEvent, MigInstance, Node, NodeStatus, Site
from portal.telemetry.models import IngestedBatch
from portal.telemetry.selectors import StoreQueue, store_queue


@dataclass(frozen=True)
class GpuOnBooks:
    """A GPU's period on the books: from the later of its and its node's installation to the earlier of their
    retirements (None: still installed). The one rule for which GPU-hours exist."""

    gpu_id: int
    node_id: int
    site_id: int
    start: datetime
    end: datetime | None


def _on_books(start: datetime, end: datetime) -> QuerySet[Gpu]:
    """GPUs installed (they and their node) before `end` and retired (either) after `start`, if at all."""
    return (Gpu.objects.filter(installed_at__lt=end, node__installed_at__lt=end)
            .filter(Q(retired_at__isnull=True) | Q(retired_at__gt=start))
            .filter(Q(node__retired_at__isnull=True) | Q(node__retired_at__gt=start)))


def gpus_on_books_by_site(*, at: datetime) -> dict[int, int]:
    """How many GPUs each site has on the books at the moment `at` (gpus_on_books' rule), counted in SQL."""
    return dict(_on_books(at, at + timedelta(microseconds=1)).values("node__site_id").annotate(n=Count("pk"))
                .order_by().values_list("node__site_id", "n"))


def gpus_on_books(*, start: datetime, end: datetime, node_id: int | None = None) -> list[GpuOnBooks]:
    """Every GPU (of the node, if given) on the books at some moment of [start, end)."""
    gpus = _on_books(start, end)
    if node_id is not None:
        gpus = gpus.filter(node_id=node_id)
    out = []
    for pk, node, site, g_in, n_in, g_out, n_out in gpus.order_by("pk").values_list(
            "pk", "node_id", "node__site_id", "installed_at", "node__installed_at", "retired_at", "node__retired_at"):
        ends = [t for t in (g_out, n_out) if t is not None]
        on_books = GpuOnBooks(gpu_id=pk, node_id=node, site_id=site, start=max(g_in, n_in),
                              end=min(ends) if ends else None)
        if on_books.end is None or on_books.end > on_books.start:  # (a GPU first seen after its node retired: none)
            out.append(on_books)
    return out


@dataclass
class FleetHeadline:
    gpus_total: int
    gpus_online: int
    util_now: float | None
    power_now_kw: float | None
    nodes_by_status: dict[str, int]
    alerts: dict[str, int]  # per state, as the alerts page's tabs count them (alerts.selectors)
    store_queue: StoreQueue


@dataclass
class SiteGrid:
    site: Site
    nodes: list["GridNode"] = field(default_factory=list)


def fleet_headline(*, now: datetime | None = None) -> FleetHeadline:
    now = now or timezone.now()
    online = Q(node__status=NodeStatus.ONLINE)
    # The fleet in service: what the grid and the capacity page show (decommissioned nodes are history).
    gpu = Gpu.objects.exclude(node__status=NodeStatus.DECOMMISSIONED).filter(retired_at__isnull=True).aggregate(
        total=Count("id"),
        online=Count("id", filter=online),
        util=Avg("current_util", filter=online),
        power=Sum("current_power_w", filter=online),
    )
    statuses = dict(Node.objects.exclude(status=NodeStatus.DECOMMISSIONED).values_list("status")
                    .annotate(n=Count("id")))
    return FleetHeadline(
        gpus_total=gpu["total"],
        gpus_online=gpu["online"],
        util_now=gpu["util"],
        power_now_kw=gpu["power"] / 1000 if gpu["power"] is not None else None,
        nodes_by_status=statuses,
        alerts=alert_state_counts(),
        store_queue=store_queue(),
    )


class GridGpu(NamedTuple):
    """A tuple, not a dataclass: a 10,000-GPU grid builds ten thousand of these per refresh."""

    index: int
    name: str
    util: float | None
    temp: float | None
    mig_slices: list[tuple[str, int]]  # (profile, compute slices)


@dataclass
class GridNode:
    pk: int
    hostname: str
    status: str
    status_label: str
    simulated: bool
    gpus: list[GridGpu] = field(default_factory=list)


def fleet_grid(*, site_id: int | None = None, status: str | None = None, gpu_name: str | None = None,
               tenant_id: int | None = None) -> list[SiteGrid]:
    """Sites with their nodes, GPUs and MIG instances, in three flat queries whatever the fleet's size (plain
    rows, not model instances: the grid of a 10,000-GPU fleet renders in a fraction of a second). With a tenant,
    only the nodes where it holds capacity now, and only the GPUs it holds (whole or by MIG instance)."""
    nodes = Node.objects.exclude(status=NodeStatus.DECOMMISSIONED)
    gpus = Gpu.objects.exclude(node__status=NodeStatus.DECOMMISSIONED)
    if site_id:
        nodes, gpus = nodes.filter(site_id=site_id), gpus.filter(node__site_id=site_id)
    if status:
        nodes, gpus = nodes.filter(status=status), gpus.filter(node__status=status)
    if gpu_name:
        nodes, gpus = nodes.filter(gpus__name=gpu_name).distinct(), gpus.filter(name=gpu_name)
    if tenant_id:
        held = allocations_at(at=timezone.now()).filter(tenant_id=tenant_id).values("gpu_id")
        nodes, gpus = nodes.filter(gpus__in=held).distinct(), gpus.filter(pk__in=held)
    sites = {s.pk: s for s in Site.objects.all()}
    grid_nodes: dict[int, GridNode] = {}
    node_site: dict[int, int] = {}
    labels = dict(NodeStatus.choices)
    for pk, hostname, node_status, simulated, site in nodes.order_by("hostname").values_list(
            "pk", "hostname", "status", "simulated", "site_id"):
        grid_nodes[pk] = GridNode(pk=pk, hostname=hostname, status=node_status, status_label=labels[node_status],
                                  simulated=simulated)
        node_site[pk] = site
    grid_gpus: dict[int, GridGpu] = {}
    for pk, node_id, index, name, util, temp in gpus.order_by("node_id", "index").values_list(
            "pk", "node_id", "index", "name", "current_util", "current_temp_c"):
        if node_id in grid_nodes:
            gpu = grid_gpus[pk] = GridGpu(index, name, util, temp, [])
            grid_nodes[node_id].gpus.append(gpu)
    for gpu_id, profile in MigInstance.objects.filter(gpu__in=gpus).order_by("gpu_id", "gi_id").values_list(
            "gpu_id", "profile"):
        if gpu_id in grid_gpus:
            grid_gpus[gpu_id].mig_slices.append((profile, int(profile.split("g", 1)[0])))
    grids: dict[int, SiteGrid] = {}
    for site in sorted({node_site[pk] for pk in grid_nodes}, key=lambda pk: sites[pk].name):
        grids[site] = SiteGrid(site=sites[site])
    for pk, node in grid_nodes.items():
        grids[node_site[pk]].nodes.append(node)
    return list(grids.values())


def node_detail(*, node_id: int) -> Node:
    return Node.objects.select_related("site").prefetch_related(
        Prefetch("gpus", queryset=Gpu.objects.order_by("index").prefetch_related("mig_instances")),
        "endpoints",
    ).get(pk=node_id)


def node_last_batch(*, node_id: int) -> datetime | None:
    """When the node's newest batch arrived: what offline detection reads (Node.last_seen is written at most once
    a minute)."""
    return IngestedBatch.objects.filter(node_id=node_id).aggregate(last=Max("received_at"))["last"]


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


def fleet_version() -> str:
    """A cheap fingerprint of everything the fleet page shows: the newest stored batch (accepted ones change
    nothing shown until the store worker has written them), alert changes, node statuses."""
    from portal.telemetry.models import IngestedBatch

    stored = IngestedBatch.objects.aggregate(last=Max("stored_at"))["last"]
    batch = stored.timestamp() if stored else None
    alerts = Alert.objects.aggregate(n=Count("id"), acked=Count("acknowledged_at"), resolved=Count("resolved_at"))
    nodes = Node.objects.aggregate(n=Count("id"), online=Count("id", filter=Q(status=NodeStatus.ONLINE)))
    return f"{batch}-{alerts['n']}.{alerts['acked']}.{alerts['resolved']}-{nodes['n']}.{nodes['online']}"
