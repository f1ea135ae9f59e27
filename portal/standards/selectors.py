from collections import defaultdict
from dataclasses import dataclass, field

from django.db.models import Count, Prefetch, QuerySet

from portal.fleet.models import Node, NodeStatus, ScrapeTarget, ServingEndpoint
from portal.standards.models import ENGINE_FIELDS, Baseline
from portal.standards.versions import Drift, drift, parse_version


@dataclass(frozen=True)
class ComponentDrift:
    """One component of one node against the baseline."""

    component: str
    actual: str
    baseline: str
    drift: Drift | None  # None: the node reported no version, or one that is not dotted numbers

    @property
    def on_baseline(self) -> bool:
        return self.drift is not None and self.drift.direction == 0

    @property
    def label(self) -> str:
        if not self.actual:
            return "not reported"
        return str(self.drift) if self.drift is not None else "not a dotted version"

    @property
    def direction(self) -> str:
        if self.drift is None:
            return "unknown"
        return {-1: "behind", 0: "on", 1: "ahead"}[self.drift.direction]


@dataclass
class NodeDrift:
    node: Node
    components: list[ComponentDrift] = field(default_factory=list)

    @property
    def off(self) -> list[ComponentDrift]:
        return [c for c in self.components if not c.on_baseline]

    @property
    def compliant(self) -> bool:
        return not self.off


@dataclass
class FleetDrift:
    baseline: Baseline | None
    nodes_checked: int = 0
    nodes_compliant: int = 0
    off_baseline: list[NodeDrift] = field(default_factory=list)

    @property
    def compliance_pct(self) -> float | None:
        return 100 * self.nodes_compliant / self.nodes_checked if self.nodes_checked else None


def current_baseline() -> Baseline | None:
    return Baseline.objects.select_related("created_by").order_by("-created_at", "-pk").first()


def baseline_history(*, limit: int = 20) -> QuerySet[Baseline]:
    return Baseline.objects.select_related("created_by").order_by("-created_at", "-pk")[:limit]


def node_drift(*, node: Node, baseline: Baseline) -> NodeDrift:
    """Each pinned component the node runs, against the baseline. Uses node.endpoints.all(), so prefetch it."""
    result = NodeDrift(node=node)

    def check(component: str, actual: str, pinned: str) -> None:
        result.components.append(ComponentDrift(component, actual, pinned, drift(actual, pinned) if actual else None))

    if baseline.driver_version:
        check("Driver", node.driver_version, baseline.driver_version)
    if baseline.cuda_driver_version:
        check("CUDA (driver)", node.cuda_driver_version, baseline.cuda_driver_version)
    served: dict[str, set[str]] = defaultdict(set)
    for endpoint in node.endpoints.all():
        served[endpoint.engine].add(endpoint.version)
    for engine in ENGINE_FIELDS:
        pinned = baseline.engine_version(engine)
        if pinned and engine in served:
            for version in sorted(served[engine], key=_version_key):
                check(ScrapeTarget.Engine(engine).label, version, pinned)
    return result


def fleet_drift(*, site_id: int | None = None) -> FleetDrift:
    """Every node that is not decommissioned against the baseline in force, in three queries whatever the
    fleet's size: the baseline, the nodes with their sites, their serving endpoints."""
    baseline = current_baseline()
    result = FleetDrift(baseline=baseline)
    if baseline is None:
        return result
    nodes = (
        Node.objects.exclude(status=NodeStatus.DECOMMISSIONED)
        .select_related("site")
        .prefetch_related(Prefetch("endpoints", queryset=ServingEndpoint.objects.only("node_id", "engine", "version")))
        .order_by("site__name", "hostname")
    )
    if site_id:
        nodes = nodes.filter(site_id=site_id)
    for node in nodes:
        checked = node_drift(node=node, baseline=baseline)
        result.nodes_checked += 1
        if checked.compliant:
            result.nodes_compliant += 1
        else:
            result.off_baseline.append(checked)
    return result


def fleet_versions() -> list[tuple[str, list[tuple[str, int]]]]:
    """What the fleet runs now: per component, each version with how many nodes run it, newest first."""
    live = Node.objects.exclude(status=NodeStatus.DECOMMISSIONED).order_by()  # no default ordering in GROUP BY
    rows = [
        ("Driver", list(live.values_list("driver_version").annotate(n=Count("pk")))),
        ("CUDA (driver)", list(live.values_list("cuda_driver_version").annotate(n=Count("pk")))),
    ]
    by_engine: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for engine, version, n in (
        ServingEndpoint.objects.filter(node__in=live).order_by().values_list("engine", "version")
        .annotate(n=Count("node", distinct=True))
    ):
        by_engine[engine].append((version, n))
    rows += [(ScrapeTarget.Engine(engine).label, by_engine[engine]) for engine in ENGINE_FIELDS if engine in by_engine]
    return [
        (component, sorted(versions, key=lambda v: _version_key(v[0]), reverse=True)) for component, versions in rows
    ]


def _version_key(version: str) -> tuple[int, ...]:
    """Sort key: numeric parts; unreported or unparseable versions sort as oldest."""
    return parse_version(version) or ()

