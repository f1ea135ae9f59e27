"""Reads for capacity and tenant usage. Every tenant-facing read goes through tenant-scoped functions here or in
portal/tenants/selectors.py, keyed by the tenant the request resolved (never by an id from the URL alone)."""

from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import BooleanField, Case, Count, Q, QuerySet, Sum, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from portal.capacity.models import WHOLE_GPU_SLOTS, Allocation, CapacityRequest, Deployment, unit_share
from portal.fleet.models import Gpu, MigInstance, Node, NodeLifecycle, NodeStatus, ServingEndpoint
from portal.health.models import Cordon
from portal.health.selectors import Cordoned, cordoned, open_cordons
from portal.hours import day_floor, hour_ceil, hour_floor
from portal.standards.selectors import nodes_excluded
from portal.telemetry.models import UsageHour, UsageMinute
from portal.tenants.models import Tenant


def allocations_at(*, at: datetime) -> QuerySet[Allocation]:
    return Allocation.objects.filter(Q(ends_at__isnull=True) | Q(ends_at__gt=at), starts_at__lte=at)


def allocations_overlapping(*, start: datetime, end: datetime, tenant: Tenant | None = None) -> QuerySet[Allocation]:
    """Allocations (of the tenant, if given) held at some moment of [start, end)."""
    rows = Allocation.objects.filter(starts_at__lt=end).filter(Q(ends_at__isnull=True) | Q(ends_at__gt=start))
    return rows.filter(tenant=tenant) if tenant is not None else rows


def tenant_deployments(*, tenant: Tenant) -> QuerySet[Deployment]:
    return Deployment.objects.filter(tenant=tenant).select_related("node").order_by("ended_at", "name")


def tenant_capacity_requests(*, tenant: Tenant) -> QuerySet[CapacityRequest]:
    return CapacityRequest.objects.filter(tenant=tenant).order_by("-created_at")


def holders_by_unit(*, gpu_ids: list[int], at: datetime | None = None) -> dict[tuple[int, int | None], Tenant]:
    """Who holds each GPU (key (gpu_id, None)) or MIG instance (key (gpu_id, mig_id)) at `at`."""
    at = at or timezone.now()
    return {
        (a.gpu_id, a.mig_instance_id): a.tenant
        for a in allocations_at(at=at).filter(gpu_id__in=gpu_ids).select_related("tenant")
    }


@dataclass
class DeploymentWindow:
    deployment_id: int
    tenant_id: int
    site_id: int
    endpoint_ids: list[int]
    start: datetime
    end: datetime
    model: str


def deployment_windows(deployments: list[Deployment], start: datetime, end: datetime) -> list[DeploymentWindow]:
    """The one rule for who owns a usage minute: a deployment owns its endpoints' usage (its node and metrics URL)
    from active_from until ended_at, so at a handover on the same URL each minute has exactly one owner. Returns
    each deployment's endpoints and the part of [start, end) it owns. Billing, economics, SLAs and tenant usage
    all read usage through it."""
    by_node_url, site_of = defaultdict(list), {}
    for pk, node_id, url, site_id in ServingEndpoint.objects.filter(
            node_id__in={d.node_id for d in deployments}).values_list("pk", "node_id", "url", "node__site_id"):
        by_node_url[(node_id, url)].append(pk)
        site_of[node_id] = site_id
    windows = []
    for d in deployments:
        lo, hi = max(start, d.active_from), min(end, d.ended_at or end)
        ids = by_node_url.get((d.node_id, d.metrics_url), [])
        if lo < hi and ids:
            windows.append(DeploymentWindow(deployment_id=d.pk, tenant_id=d.tenant_id, site_id=site_of[d.node_id],
                                            endpoint_ids=ids, start=lo, end=hi, model=d.model_name))
    return windows


def usage_tiers(*, start: datetime, end: datetime, now: datetime) -> list[tuple[type, datetime, datetime]]:
    """Which usage tier answers which part of [start, end): whole past hours from the hour tier, the edges and the
    current hour from the minute tier. Empty parts are left out."""
    current_hour = hour_floor(now)
    hours_lo, hours_hi = hour_ceil(start), min(hour_floor(end), current_hour)
    if hours_lo < hours_hi:
        parts = [(UsageHour, hours_lo, hours_hi), (UsageMinute, start, hours_lo), (UsageMinute, hours_hi, end)]
    else:
        parts = [(UsageMinute, start, end)]
    return [(model, lo, hi) for model, lo, hi in parts if lo < hi]


USAGE_COUNTS = ("prompt_tokens", "generation_tokens", "requests_ok", "requests_failed")


def owned_usage(*, windows: list["DeploymentWindow"], now: datetime, fields: tuple[str, ...] = USAGE_COUNTS):
    """Every usage row the windows own, as (window, ts, *fields): one query per usage tier whatever the number
    of windows. A row goes to the window of its endpoint that contains its time; windows of one endpoint never
    overlap (deployment_windows), so each row has one owner."""
    where: dict[type, Q] = {}
    by_endpoint: dict[int, list[DeploymentWindow]] = defaultdict(list)
    for window in windows:
        for endpoint_id in window.endpoint_ids:
            by_endpoint[endpoint_id].append(window)
        for model, lo, hi in usage_tiers(start=window.start, end=window.end, now=now):
            part = Q(endpoint_id__in=window.endpoint_ids, ts__gte=lo, ts__lt=hi)
            where[model] = where[model] | part if model in where else part
    for model, condition in where.items():
        for endpoint_id, ts, *values in model.objects.filter(condition).values_list(
                "endpoint_id", "ts", *fields).iterator(chunk_size=5000):
            yield next(w for w in by_endpoint[endpoint_id] if w.start <= ts < w.end), ts, *values


@dataclass
class UsageLine:
    model: str
    day: datetime | None
    site_id: int | None = None
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_ok: int = 0
    requests_failed: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.generation_tokens


def usage_for_tenant(*, tenant: Tenant, start: datetime, end: datetime, by_day: bool = True,
                     now: datetime | None = None, by_site: bool = False) -> list[UsageLine]:
    """The tenant's token and request usage over [start, end), per model (and day, and site): usage of its
    deployments' endpoints while each deployment was live. Exact integers, as the agents reported them."""
    lines: dict[tuple[str, datetime | None, int | None], UsageLine] = {}
    windows = deployment_windows(list(Deployment.objects.filter(tenant=tenant)), start, end)
    for window, ts, p, g, ok, failed in owned_usage(windows=windows, now=now or timezone.now()):
        day = day_floor(ts) if by_day else None
        key = (window.model, day, window.site_id if by_site else None)
        line = lines.get(key)
        if line is None:
            line = lines[key] = UsageLine(model=window.model, day=day, site_id=key[2])
        line.prompt_tokens += p
        line.generation_tokens += g
        line.requests_ok += ok
        line.requests_failed += failed
    return sorted(lines.values(), key=lambda ln: (ln.day or start, ln.model, ln.site_id or 0))


@dataclass
class CapacityRow:
    site: str
    gpu_type: str
    total: float = 0.0
    allocated: float = 0.0
    busy: float = 0.0
    committed: float = 0.0
    allocated_idle: float = 0.0

    @property
    def free(self) -> float:
        return self.total - self.allocated

    @property
    def idle_share_of_allocated(self) -> float | None:
        return self.allocated_idle / self.allocated if self.allocated else None


def capacity_overview(*, now: datetime | None = None) -> list[CapacityRow]:
    """Per site and GPU model, in whole-GPU equivalents (MIG instances count slices/7): installed, allocated now,
    actually busy (latest utilization), committed to start later, and allocated-but-idle."""
    now = now or timezone.now()
    rows: dict[tuple[str, str], CapacityRow] = {}
    # Summed in the database per site, model and kind of unit: at 10,000 GPUs, rows in Python cost more than SQL.
    in_service = Gpu.objects.exclude(node__status=NodeStatus.DECOMMISSIONED)
    for r in (in_service.values("node__site__name", "name")
              .annotate(n=Count("pk"), util=Sum(Coalesce("current_util", 0.0))).order_by()):
        rows[(r["node__site__name"], r["name"])] = CapacityRow(site=r["node__site__name"], gpu_type=r["name"],
                                                               total=r["n"], busy=r["util"] / 100)
    held = (Allocation.objects.filter(Q(ends_at__isnull=True) | Q(ends_at__gt=now), gpu__in=in_service)
            .annotate(started=Case(When(starts_at__lte=now, then=True), default=False,
                                   output_field=BooleanField()))
            .values("gpu__node__site__name", "gpu__name", "mig_instance__profile", "started")
            .annotate(n=Count("pk"), util=Sum(Coalesce("gpu__current_util", 0.0))).order_by())
    for r in held:
        row = rows[(r["gpu__node__site__name"], r["gpu__name"])]
        profile = r["mig_instance__profile"]
        share = float(unit_share(MigInstance.profile_slices(profile) if profile else None))
        if r["started"]:
            row.allocated += share * r["n"]
            row.allocated_idle += share * (r["n"] - r["util"] / 100)
        else:
            row.committed += share * r["n"]
    return sorted(rows.values(), key=lambda r: (r.site, r.gpu_type))


@dataclass(frozen=True)
class Proposal:
    gpu: Gpu
    mig_instance: MigInstance | None


def placement_propose(*, gpu_type: str, count: int, mig_profile: str = "", starts_at: datetime,
                      ends_at: datetime | None = None) -> list[Proposal]:
    """Free units matching the request on sellable nodes, none of them cordoned nor kept out by the certified stack's
    placement policy (standards.selectors.nodes_excluded), preferring nodes that are already partly allocated (fill
    them before opening empty ones), then the fullest first. Fewer than `count` when the fleet cannot serve it."""
    busy = Allocation.objects.filter(starts_at__lt=ends_at or datetime.max.replace(tzinfo=starts_at.tzinfo)).filter(
        Q(ends_at__isnull=True) | Q(ends_at__gt=starts_at))
    taken: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for gpu_id, lo, hi in busy.values_list("gpu_id", "slot_lo", "slot_hi"):
        taken[gpu_id].append((lo, hi))
    gpus = list(Gpu.objects.filter(name=gpu_type, node__status=NodeStatus.ONLINE,
                                   node__lifecycle=NodeLifecycle.SELLABLE, retired_at__isnull=True)
                .select_related("node").prefetch_related("mig_instances").order_by("node__hostname", "index"))
    off_stack = nodes_excluded(node_ids=list({g.node_id for g in gpus}))
    gpus = [g for g in gpus if g.node_id not in off_stack]
    out = cordoned(node_ids=list({g.node_id for g in gpus}))
    used_per_node: dict[int, int] = defaultdict(int)
    for gpu in gpus:
        if taken.get(gpu.pk):
            used_per_node[gpu.node_id] += 1

    def free(gpu: Gpu, lo: int, hi: int) -> bool:
        return all(hi <= a or b <= lo for a, b in taken.get(gpu.pk, []))

    candidates = []
    for gpu in gpus:
        if mig_profile:
            candidates += [Proposal(gpu, m) for m in gpu.mig_instances.all()
                           if m.profile == mig_profile and free(gpu, m.gi_id, m.gi_id + 1)
                           and not out.blocks(node_id=gpu.node_id, gpu_id=gpu.pk, mig_id=m.pk)]
        elif not gpu.mig_mode and free(gpu, *WHOLE_GPU_SLOTS) and not out.blocks_gpu_anywhere(
                node_id=gpu.node_id, gpu_id=gpu.pk, mig_ids=[m.pk for m in gpu.mig_instances.all()]):
            candidates.append(Proposal(gpu, None))
    candidates.sort(key=lambda p: (used_per_node[p.gpu.node_id] == 0, -used_per_node[p.gpu.node_id],
                                   p.gpu.node.hostname, p.gpu.index))
    return candidates[:count]


@dataclass(frozen=True)
class Replacement:
    allocation: Allocation
    cordon: Cordon
    proposal: Proposal | None  # None: no free, sellable unit of that kind


def replacements_propose(*, now: datetime | None = None) -> list[Replacement]:
    """Each current allocation on a cordoned unit, with the free unit placement offers its tenant instead (each
    free unit offered once)."""
    now = now or timezone.now()
    hit: list[tuple[Allocation, Cordon]] = []
    for cordon in open_cordons():
        held = allocations_at(at=now).select_related("tenant", "gpu", "gpu__node", "mig_instance")
        if cordon.mig_instance_id:
            held = held.filter(gpu_id=cordon.gpu_id).filter(
                Q(mig_instance_id=cordon.mig_instance_id) | Q(mig_instance__isnull=True))
        elif cordon.gpu_id:
            held = held.filter(gpu_id=cordon.gpu_id)
        else:
            held = held.filter(gpu__node_id=cordon.node_id)
        hit += [(a, cordon) for a in held]

    def kind(a: Allocation) -> tuple[str, str]:
        return a.gpu.name, a.mig_instance.profile if a.mig_instance_id else ""

    needed = Counter(kind(a) for a, _ in hit)
    offers = {k: placement_propose(gpu_type=k[0], mig_profile=k[1], count=n, starts_at=now)
              for k, n in needed.items()}
    found = []
    for a, cordon in hit:
        free = offers[kind(a)]
        found.append(Replacement(allocation=a, cordon=cordon, proposal=free.pop(0) if free else None))
    return found


def tenant_gpus_held(*, tenant: Tenant, at: datetime | None = None) -> float:
    """Whole-GPU equivalents the tenant holds now (MIG instances count slices/7)."""
    held = allocations_at(at=at or timezone.now()).filter(tenant=tenant).select_related("mig_instance")
    return sum(a.gpu_share for a in held)


def last_complete_minute(*, now: datetime) -> datetime:
    """The start of the last complete, rolled-up minute: the one quotas are checked on and the tenant sees."""
    return now.replace(second=0, microsecond=0) - timedelta(minutes=2)


def tenant_usage_last_minute(*, tenant: Tenant, now: datetime | None = None) -> int:
    """Tokens (input + output) the tenant used in the last complete, rolled-up minute."""
    now = now or timezone.now()
    start = last_complete_minute(now=now)
    return sum(line.tokens for line in usage_for_tenant(tenant=tenant, start=start, end=start + timedelta(minutes=1),
                                                        by_day=False, now=now))


@dataclass(frozen=True)
class Unbillable:
    since: datetime
    model: str


def deployments_unbillable(*, deployments: list[Deployment]) -> dict[int, Unbillable]:
    """The deployments whose endpoint answers with none of the token counters its agent knows, by id: their
    tokens cannot be billed (one query)."""
    if not deployments:
        return {}
    endpoints = ServingEndpoint.objects.filter(unbillable_since__isnull=False,
                                               node_id__in={d.node_id for d in deployments})
    found = {(node_id, url): Unbillable(since=since, model=model) for node_id, url, model, since in
             endpoints.values_list("node_id", "url", "model", "unbillable_since")}
    return {d.pk: found[(d.node_id, d.metrics_url)] for d in deployments if (d.node_id, d.metrics_url) in found}


@dataclass
class HourUsage:
    """What a deployment's endpoint served in an hour: tokens, and the time its requests spent in each phase."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


def deployment_usage_by_hour(*, start: datetime, end: datetime, now: datetime | None = None) -> dict[
        tuple[int, datetime], HourUsage]:
    """What each deployment owned in each hour of [start, end) (deployment_windows): tokens, and the sums of the
    prefill and decode histograms (read as their `sum` key, not whole)."""
    deployments = list(Deployment.objects.filter(active_from__lt=end).filter(
        Q(ended_at__isnull=True) | Q(ended_at__gt=start)))
    out: dict[tuple[int, datetime], HourUsage] = defaultdict(HourUsage)
    windows = deployment_windows(deployments, start, end)
    fields = ("prompt_tokens", "generation_tokens", "prefill__sum", "decode__sum")
    for window, ts, p, g, prefill, decode in owned_usage(windows=windows, now=now or timezone.now(), fields=fields):
        usage = out[(window.deployment_id, hour_floor(ts))]
        usage.prompt_tokens += p
        usage.generation_tokens += g
        usage.prefill_seconds += prefill or 0.0
        usage.decode_seconds += decode or 0.0
    return dict(out)


def unit_name(gpu: Gpu, mig: MigInstance | None) -> str:
    """A unit as operators say it: "GPU 3 (whole)" or "GPU 3 · MIG 3g.40gb (GI 2)"."""
    return f"GPU {gpu.index} · MIG {mig.profile} (GI {mig.gi_id})" if mig else f"GPU {gpu.index} (whole)"


def allocation_summary(allocation: Allocation) -> str:
    """"Acme AI holds GPU 3 (whole) on iad1-h100-03 from 2026-12-01 23:00 UTC, open-ended": for messages."""
    until = f"until {allocation.ends_at:%Y-%m-%d %H:%M} UTC" if allocation.ends_at else "open-ended"
    return (f"{allocation.tenant.name} holds {unit_name(allocation.gpu, allocation.mig_instance)} on "
            f"{allocation.gpu.node.hostname} from {allocation.starts_at:%Y-%m-%d %H:%M} UTC, {until}")


@dataclass
class Unit:
    gpu: Gpu
    mig: MigInstance | None
    holder: Allocation | None  # the allocation holding it now
    out_of_sale: str = ""  # why it cannot be allocated now: its node's stage, or a cordon

    @property
    def label(self) -> str:
        return unit_name(self.gpu, self.mig)

    @property
    def key(self) -> str:
        return f"{self.gpu.pk}:{self.mig.pk}" if self.mig else str(self.gpu.pk)


@dataclass
class NodeUnits:
    node: Node
    units: list[Unit]

    @property
    def free(self) -> int:
        return sum(1 for u in self.units if u.holder is None)


def capacity_units(*, now: datetime, site_id: int | None = None, hostname: str = "", gpu_name: str = "",
                   tenant_id: int | None = None, state: str = "") -> QuerySet[Node]:
    """The nodes in service that have a unit matching the filters (state "free" or "held", the tenant holding
    it now), by hostname; units_of() lists a page of them."""
    nodes = Node.objects.exclude(status=NodeStatus.DECOMMISSIONED).select_related("site").order_by("hostname")
    if site_id:
        nodes = nodes.filter(site_id=site_id)
    if hostname:
        nodes = nodes.filter(hostname__icontains=hostname)
    if gpu_name:
        nodes = nodes.filter(gpus__name=gpu_name)
    held = allocations_at(at=now)
    if tenant_id:
        nodes = nodes.filter(gpus__allocations__in=held.filter(tenant_id=tenant_id))
    if state == "held":
        nodes = nodes.filter(gpus__allocations__in=held)
    elif state == "free":
        busy_gpus = held.filter(mig_instance__isnull=True).values("gpu_id")
        busy_migs = held.filter(mig_instance__isnull=False).values("mig_instance_id")
        nodes = nodes.filter(Q(gpus__mig_mode=False) & ~Q(gpus__pk__in=busy_gpus)
                             | Q(gpus__mig_instances__isnull=False) & ~Q(gpus__mig_instances__pk__in=busy_migs))
    return nodes.distinct()


def _out_of_sale(gpu: Gpu, mig: MigInstance | None, out: Cordoned) -> str:
    if out.blocks(node_id=gpu.node_id, gpu_id=gpu.pk, mig_id=mig.pk if mig else None):
        return "cordoned"
    if gpu.node.lifecycle != NodeLifecycle.SELLABLE:
        return gpu.node.get_lifecycle_display().lower()
    return ""


def units_of(*, nodes: list[Node], now: datetime, gpu_name: str = "", tenant_id: int | None = None,
             state: str = "") -> list[NodeUnits]:
    """Each node's units (whole GPUs, or the MIG instances of a GPU in MIG mode) with who holds them now, in three
    queries for the page, narrowed by the same filters as capacity_units."""
    holders = {(a.gpu_id, a.mig_instance_id): a for a in allocations_at(at=now).filter(gpu__node__in=nodes)
               .select_related("tenant")}
    gpus = (Gpu.objects.filter(node__in=nodes, retired_at__isnull=True).select_related("node")
            .prefetch_related("mig_instances").order_by("index"))
    out = cordoned(node_ids=[n.pk for n in nodes])
    by_node: dict[int, list[Unit]] = defaultdict(list)
    for gpu in gpus:
        if gpu_name and gpu.name != gpu_name:
            continue
        migs = sorted(gpu.mig_instances.all(), key=lambda m: m.gi_id) if gpu.mig_mode else [None]
        for mig in migs:
            holder = holders.get((gpu.pk, mig.pk if mig else None))
            if (state == "free" and holder) or (state == "held" and not holder):
                continue
            if tenant_id and (holder is None or holder.tenant_id != tenant_id):
                continue
            by_node[gpu.node_id].append(Unit(gpu=gpu, mig=mig, holder=holder,
                                             out_of_sale=_out_of_sale(gpu, mig, out)))
    return [NodeUnits(node=n, units=by_node.get(n.pk, [])) for n in nodes]
