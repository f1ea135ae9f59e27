from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from django.db.models import Count, Prefetch, QuerySet

from portal.fleet.models import Node, NodeLifecycle, NodeStatus, ServingEndpoint, Site
from portal.standards.models import COMPONENTS, CertifiedStack, Component, PlacementPolicy
from portal.standards.versions import Drift, drift, parse_version


@dataclass(frozen=True)
class ComponentDrift:
    """One component of one node against the certified stack."""

    component: str
    actual: str
    pinned: str
    drift: Drift | None  # None: the node reported no version, or one that is not dotted numbers
    reportable: bool = True  # False: no agent reports this component today (TensorRT-LLM, NeMo)

    @property
    def on_stack(self) -> bool:
        return self.drift is not None and self.drift.direction == 0

    @property
    def unreported(self) -> bool:
        """Pinned but read by nothing yet: shown as such, never held against the node (nor invented)."""
        return not self.reportable and not self.actual

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
    stack: CertifiedStack
    components: list[ComponentDrift] = field(default_factory=list)

    @property
    def off(self) -> list[ComponentDrift]:
        return [c for c in self.components if not c.on_stack and not c.unreported]

    @property
    def unreported(self) -> list[ComponentDrift]:
        return [c for c in self.components if c.unreported]

    @property
    def compliant(self) -> bool:
        return not self.off

    @property
    def summary(self) -> str:
        """The off-stack components in a sentence: "Driver 550.127.05 (stack 590.48.01), vLLM not reported"."""
        return ", ".join(f"{c.component} {c.actual or 'not reported'} (stack {c.pinned})" for c in self.off)


@dataclass
class FleetDrift:
    stack: CertifiedStack | None
    nodes_checked: int = 0
    nodes_compliant: int = 0
    off_stack: list[NodeDrift] = field(default_factory=list)
    unreported: dict[str, int] = field(default_factory=dict)  # component -> nodes where it is pinned, not reported

    @property
    def compliance_pct(self) -> float | None:
        return 100 * self.nodes_compliant / self.nodes_checked if self.nodes_checked else None


@dataclass
class SiteCompliance:
    site: Site
    nodes_checked: int = 0
    nodes_compliant: int = 0

    @property
    def compliance_pct(self) -> float:
        return 100 * self.nodes_compliant / self.nodes_checked


def current_baseline() -> CertifiedStack | None:
    """The certified stack in force: the newest one set."""
    return CertifiedStack.objects.select_related("created_by").order_by("-created_at", "-pk").first()


def stack_history(*, limit: int = 20) -> QuerySet[CertifiedStack]:
    return CertifiedStack.objects.select_related("created_by").order_by("-created_at", "-pk")[:limit]


def placement_policy() -> PlacementPolicy | None:
    """The placement policy in force (None: never set, so nothing is excluded)."""
    return PlacementPolicy.objects.select_related("created_by").order_by("-created_at", "-pk").first()


def policy_history(*, limit: int = 10) -> QuerySet[PlacementPolicy]:
    return PlacementPolicy.objects.select_related("created_by").order_by("-created_at", "-pk")[:limit]


def _endpoint_values(component: Component, endpoints: list[ServingEndpoint]) -> set[str] | None:
    """The versions of `component` a node's endpoints report; None when the node serves no endpoint of its
    engine, so it is not checked."""
    mine = [e for e in endpoints if e.engine == component.engine]
    if not mine:
        return None
    if component.source == "engine":
        return {e.version for e in mine}
    return {str((e.settings or {}).get(component.attr, "")) for e in mine}


def node_drift(*, node: Node, stack: CertifiedStack) -> NodeDrift:
    """Each pinned component the node runs, against the stack. Uses node.endpoints.all(), so prefetch it."""
    result = NodeDrift(node=node, stack=stack)
    endpoints = list(node.endpoints.all())
    for component in COMPONENTS:
        pinned = getattr(stack, component.field)
        if not pinned:
            continue
        if component.source == "node":
            versions = {getattr(node, component.attr)}
        else:
            versions = _endpoint_values(component, endpoints)
            if versions is None:
                continue
        reportable = component.source != "setting"
        for version in sorted(versions, key=_version_key):
            result.components.append(ComponentDrift(component.label, version, pinned,
                                                    drift(version, pinned) if version else None, reportable))
    return result


def _live() -> QuerySet[Node]:
    """The nodes checked against the stack: those that run software, so neither a planned node (nothing installed
    yet) nor a retired or decommissioned one."""
    return Node.objects.exclude(status=NodeStatus.DECOMMISSIONED).exclude(
        lifecycle__in=[NodeLifecycle.PLANNED, NodeLifecycle.RETIRED])


def _nodes(*, site_id: int | None = None, node_ids: list[int] | None = None) -> QuerySet[Node]:
    """The nodes checked, with their sites and the endpoint fields drift reads: two queries."""
    nodes = (
        _live()
        .select_related("site")
        .prefetch_related(Prefetch("endpoints", queryset=ServingEndpoint.objects.only(
            "node_id", "engine", "version", "settings")))
        .order_by("site__name", "hostname")
    )
    if site_id:
        nodes = nodes.filter(site_id=site_id)
    if node_ids is not None:
        nodes = nodes.filter(pk__in=node_ids)
    return nodes


def _checked(stack: CertifiedStack, nodes: QuerySet[Node]) -> Iterator[NodeDrift]:
    for node in nodes:
        yield node_drift(node=node, stack=stack)


def fleet_drift(*, site_id: int | None = None) -> FleetDrift:
    """Every node checked (see _live) against the stack in force, in three queries whatever the fleet's size: the
    stack, the nodes with their sites, their serving endpoints."""
    stack = current_baseline()
    result = FleetDrift(stack=stack)
    if stack is None:
        return result
    unreported: dict[str, int] = defaultdict(int)
    for checked in _checked(stack, _nodes(site_id=site_id)):
        result.nodes_checked += 1
        for component in {c.component for c in checked.unreported}:
            unreported[component] += 1
        if checked.compliant:
            result.nodes_compliant += 1
        else:
            result.off_stack.append(checked)
    result.unreported = dict(sorted(unreported.items()))
    return result


def site_compliance() -> list[SiteCompliance]:
    """Per site: nodes compliant / nodes checked against the stack in force (sites with nodes, by name); empty
    when no stack is set. Three queries, as fleet_drift."""
    stack = current_baseline()
    if stack is None:
        return []
    sites: dict[int, SiteCompliance] = {}
    for checked in _checked(stack, _nodes()):
        row = sites.setdefault(checked.node.site_id, SiteCompliance(site=checked.node.site))
        row.nodes_checked += 1
        row.nodes_compliant += checked.compliant
    return list(sites.values())


def nodes_excluded(*, node_ids: list[int]) -> dict[int, NodeDrift]:
    """The one placement rule of the certified stack: of these nodes, those kept out of new placements, by id,
    with why. Empty unless the placement policy in force excludes nodes off the stack and a stack is set."""
    policy = placement_policy()
    if policy is None or not policy.exclude_off_stack or not node_ids:
        return {}
    stack = current_baseline()
    if stack is None:
        return {}
    return {checked.node.pk: checked for checked in _checked(stack, _nodes(node_ids=node_ids))
            if not checked.compliant}


def fleet_versions() -> list[tuple[str, list[tuple[str, int]]]]:
    """What the checked nodes run: per component, each version with how many nodes run it, newest first. A pinnable
    component nothing reports (TensorRT-LLM, NeMo today) has a single "" (not reported) entry where its engine
    is served."""
    live = _live().order_by()  # no default ordering in GROUP BY
    rows = [(c.label, list(live.values_list(c.attr).annotate(n=Count("pk"))))
            for c in COMPONENTS if c.source == "node"]
    served = ServingEndpoint.objects.filter(node__in=live).order_by()
    by_engine: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for engine, version, n in served.values_list("engine", "version").annotate(n=Count("node", distinct=True)):
        by_engine[engine].append((version, n))
    settings: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    setting_components = [c for c in COMPONENTS if c.source == "setting"]
    engines = {c.engine for c in setting_components}
    for engine, node_id, values in served.filter(engine__in=engines).values_list("engine", "node_id", "settings"):
        for c in setting_components:
            if c.engine == engine:
                settings[c.label][str((values or {}).get(c.attr, ""))].add(node_id)
    for c in COMPONENTS:
        if c.source == "engine" and c.engine in by_engine:
            rows.append((c.label, by_engine[c.engine]))
        elif c.source == "setting" and c.label in settings:
            rows.append((c.label, [(v, len(ids)) for v, ids in settings[c.label].items()]))
    return [
        (component, sorted(versions, key=lambda v: _version_key(v[0]), reverse=True)) for component, versions in rows
    ]


def _version_key(version: str) -> tuple[int, ...]:
    """Sort key: numeric parts; unreported or unparseable versions sort as oldest."""
    return parse_version(version) or ()
