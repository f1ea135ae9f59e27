"""The demo factory: two sites, sixteen 8-GPU nodes, tenants and their people, and 30 days of history.

History is synthesised with the same daily load curve, GPU models, UUIDs and MIG layouts as the simulated agent
(agents.simulate), so the seeded past and the live simulated present join without a seam. Hourly tiers cover
30 days, minute tiers the last 24 hours; the simulated agents write everything from now on.
"""

import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from django.db import transaction

from agents.simulate import GPU_MODELS, MIG_LAYOUTS, VERSIONS, gpu_uuid
from portal.accounts.models import OperatorRole, User
from portal.alerts.models import Severity
from portal.alerts.services import alert_acknowledge, alert_raise
from portal.capacity.models import Allocation
from portal.capacity.services import allocation_create, deployment_create, deployments_check_billable, quota_set
from portal.demo.billing_seed import seed_billing
from portal.demo.bringup_seed import seed_bringup, seed_cordoned_gpu
from portal.demo.history import SIM_SEED, NodePlan, plan_nodes, write_history
from portal.demo.isolation_seed import seed_isolation
from portal.demo.stack_seed import seed_stack
from portal.demo.tenants_seed import seed_tenants
from portal.economics.models import PendingAttribution
from portal.economics.services import cost_hours_attribute
from portal.fleet.models import (
    Gpu,
    HealthEvent,
    HealthEventKind,
    MigInstance,
    Node,
    NodeStatus,
    ScrapeTarget,
    ServingEndpoint,
    Site,
)
from portal.fleet.services import node_credential_issue
from portal.health.catalog import CATALOG
from portal.hours import hour_floor
from portal.telemetry.models import RollupWatermark
from portal.telemetry.rollups import rollup_site_hours
from portal.tenants.models import MemberRole, Membership, Tenant, TenantStatus

DEMO_PASSWORD = "tokenmill-demo"  # noqa: S105 - the demo's published login, printed by `make demo`


@dataclass(frozen=True)
class SiteSpec:
    slug: str
    name: str
    location: str
    currency: str
    capex: Decimal
    kwh: Decimal
    pue: Decimal
    opex: Decimal
    nodes: tuple[tuple[str, str, bool], ...]  # hostname, gpu model key, MIG on


SITES = (
    SiteSpec("iad-1", "Ashburn IAD-1", "Ashburn, VA, US", "USD", Decimal("31000.00"), Decimal("0.0850"),
             Decimal("1.25"), Decimal("0.3200"),
             tuple((f"iad1-h100-{i:02d}", "H100", i in (9, 10)) for i in range(1, 11))),
    # Reported in USD, like the price books, so the P&L can set revenue against cost (no FX in Tokenmill).
    SiteSpec("fra-1", "Frankfurt FRA-1", "Frankfurt, DE", "USD", Decimal("19000.00"), Decimal("0.2100"),
             Decimal("1.35"), Decimal("0.3000"),
             tuple((f"fra1-a100-{i:02d}", "A100", i == 6) for i in range(1, 7))),
)

TENANTS = (
    ("Acme AI", "acme", TenantStatus.ACTIVE),
    ("Globex Research", "globex", TenantStatus.ACTIVE),
    ("Initech Labs", "initech", TenantStatus.ACTIVE),
    ("Umbrella Health", "umbrella", TenantStatus.ACTIVE),
    ("Hooli Cloud", "hooli", TenantStatus.PENDING),
)

# Served models: (model, engine, output tokens/s per GPU at full load, tenant slug)
MODELS = (
    ("meta-llama/Llama-3.1-8B-Instruct", "vllm", 2400, "acme"),
    ("meta-llama/Llama-3.1-70B-Instruct", "vllm", 420, "globex"),
    ("Qwen/Qwen2.5-32B-Instruct", "sglang", 800, "initech"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "tgi", 2100, "umbrella"),
    ("nvidia/Llama-3.1-Nemotron-70B-Instruct", "triton", 450, "acme"),
)
ENGINE_PORTS = {"vllm": 8000, "sglang": 30000, "tgi": 8080, "triton": 8002}
# Engine settings as operators enter them with a deployment (what the engine does not expose itself), each with
# the throughput it gives over the first: the simulated engines and the seeded past serve that much more (an FP8
# KV cache holds twice the sequences, which pays once the batch limit lets them in; FP8 weights add their
# published gain), so the tokens-per-dollar advisor has real differences to find. Neighbours differ in one setting.
ENGINE_SETTINGS = (
    ({"precision": "bf16", "kv_cache_dtype": "auto", "max_batch_size": "128"}, 1.0),
    ({"precision": "bf16", "kv_cache_dtype": "fp8_e4m3", "max_batch_size": "128"}, 1.12),
    ({"precision": "bf16", "kv_cache_dtype": "fp8_e4m3", "max_batch_size": "256"}, 1.38),
    ({"precision": "fp8", "kv_cache_dtype": "fp8_e4m3", "max_batch_size": "256"}, 1.62),
)
LAGGING_NODES = ("iad1-h100-03", "fra1-a100-03")
LAGGING_DRIVER = "550.127.05"


def mig_layout(index: int) -> tuple[tuple[str, int], ...]:
    """The layout the simulated agent gives GPU `index` on a MIG node (see agents.simulate)."""
    if index % 4 != 3:
        return ()
    return MIG_LAYOUTS[(index // 4 + SIM_SEED) % len(MIG_LAYOUTS)]


def seed_demo(*, now: datetime | None = None, days: int = 30, minute_hours: int = 24,
              agents_dir: Path | None = None, portal_url: str = "http://127.0.0.1:8000") -> dict:
    now = (now or datetime.now(tz=UTC)).replace(second=0, microsecond=0)
    rng = random.Random(7)
    with transaction.atomic():
        people = _people()
        tenants = {slug: Tenant.objects.create(name=name, slug=slug, status=status)
                   for name, slug, status in TENANTS}
        for slug, tenant in tenants.items():
            user = User.objects.create_user(username=f"{slug}-admin", email=f"admin@{slug}.example",
                                            password=DEMO_PASSWORD, first_name=tenant.name.split()[0])
            Membership.objects.create(user=user, tenant=tenant, role=MemberRole.ADMIN)
            people.append(user)
        nodes, sites = [], {}
        for spec in SITES:
            site = sites[spec.slug] = Site.objects.create(
                name=spec.name, slug=spec.slug, location=spec.location, currency=spec.currency,
                gpu_capex=spec.capex, depreciation_months=48, energy_price_kwh=spec.kwh, pue=spec.pue,
                other_opex_gpu_hour=spec.opex,
            )
            for hostname, model_key, mig in spec.nodes:
                nodes.append(_node(site, hostname, model_key, mig, now, installed=history_start(now, days)))
        capacity = _endpoints(nodes, tenants, people[0], now, days)
        _unbillable_pilot(nodes, tenants["initech"], people[0], now, capacity)
        seed_isolation(nodes=nodes, tenants=tenants, by=people[0], since=history_start(now, days), capacity=capacity)
        plans = plan_nodes(nodes=nodes, capacity=capacity)  # after every allocation and deployment
        hours = write_history(plans=plans, now=now, start=history_start(now, days), minute_hours=minute_hours)
        rollup_site_hours(hours=hours)
        cost_hours_attribute(hours=hours, now=now)
        # Every hour is attributed from the whole seeded history: what the seeding's allocations queued is done.
        PendingAttribution.objects.all().delete()
        _health(nodes, people[0], now, rng)
        for slug, tokens_per_minute, gpus in (("acme", 6_000_000, 48), ("globex", 1_500_000, 40),
                                              ("initech", 2_000_000, 24), ("umbrella", 3_000_000, 24)):
            quota_set(tenant=tenants[slug], tokens_per_minute=tokens_per_minute, gpus=gpus)
        seed_tenants(tenants=tenants, now=now)
        seed_billing(now=now, history_since=history_start(now, days))
        seed_stack(operator=people[0], now=now)
        seed_cordoned_gpu(now=now)
        fra = sites["fra-1"]
        arrived = seed_bringup(
            site=fra, accepted=[n for n in nodes if n.site_id == fra.pk], operator=people[0], now=now,
            history_since=history_start(now, days),
            make_node=lambda hostname, gpus: _node(fra, hostname, "A100", False, now, installed=now, gpus=gpus))
        for plan in plan_nodes(nodes=arrived, capacity={}):
            plan.gpus = plan.node.gpus.count()
            plans.append(plan)
        nodes += arrived
        for name in ("minute", "hour"):
            RollupWatermark.objects.update_or_create(name=name, defaults={"stored_until": now})
        RollupWatermark.objects.update_or_create(name="attribution", defaults={"stored_until": now})
        credentials = {node.hostname: node_credential_issue(node=node) for node in nodes}
    if agents_dir is not None:
        write_agent_configs(plans, credentials, agents_dir, portal_url, now)
    return {"nodes": len(nodes), "gpus": Gpu.objects.filter(node__in=nodes).count(), "tenants": len(tenants),
            "users": len(people)}


def _people() -> list[User]:
    operator = User.objects.create_user(username="operator", email="operator@tokenmill.example",
                                        password=DEMO_PASSWORD, operator_role=OperatorRole.ADMIN,
                                        first_name="Olivia", is_staff=True, is_superuser=True)
    viewer = User.objects.create_user(username="viewer", email="viewer@tokenmill.example",
                                      password=DEMO_PASSWORD, operator_role=OperatorRole.VIEWER, first_name="Victor")
    return [operator, viewer]


def _node(site: Site, hostname: str, model_key: str, mig: bool, now: datetime, installed: datetime,
          gpus: int = 8) -> Node:
    model = GPU_MODELS[model_key]
    # A node of the bring-up plan exists (planned) before it is enrolled; the others are created here.
    node = Node.objects.filter(site=site, hostname=hostname).first() or Node(site=site, hostname=hostname)
    facts = {"status": NodeStatus.ONLINE, "last_seen": now, "simulated": True, "installed_at": installed,
             "os": "Ubuntu 22.04.5 LTS", "kernel": "5.15.0-126-generic", "driver_version": "590.48.01",
             "cuda_driver_version": "13.1", "nvml_version": "13.590.48.01", "agent_version": "0.1.0"}
    if hostname in LAGGING_NODES:
        # Two nodes lag the baseline, as real fleets do; the version-drift view shows them.
        facts |= {"driver_version": LAGGING_DRIVER, "nvml_version": "12.550.127.05", "cuda_driver_version": "12.4"}
    for name, value in facts.items():
        setattr(node, name, value)
    node.save()
    made = Gpu.objects.bulk_create(
        Gpu(node=node, uuid=gpu_uuid(hostname, i), index=i, name=model.name, memory_total_mib=model.memory_mib,
            installed_at=installed,
            power_limit_w=model.power_limit_w, mig_mode=bool(mig and mig_layout(i)),
            pci_bus_id=f"00000000:{0x18 + 0x11 * i:02X}:00.0")
        for i in range(gpus)
    )
    MigInstance.objects.bulk_create(
        MigInstance(gpu=gpu, gi_id=gi, profile=profile, memory_total_mib=model.mig_memory_mib[profile])
        for gpu in made if mig for profile, gi in mig_layout(gpu.index)
    )
    node.model_key = model_key
    return node


def history_start(now: datetime, days: int) -> datetime:
    """The hour the demo factory's history begins: its nodes are installed, allocated and deployed then, so the
    books count every GPU-hour from its first."""
    return hour_floor(now - timedelta(days=days))


def _endpoints(nodes: list[Node], tenants: dict[str, Tenant], operator: User,
               now: datetime, days: int) -> dict[tuple[int, str], float]:
    """Each node serves one or two tenants' models on GPUs allocated to them (some nodes keep free capacity);
    returns each endpoint's generation tokens/s at full load: its model's rate per GPU x the GPUs it holds."""
    capacity = {}
    since = history_start(now, days)
    for n, node in enumerate(nodes):
        picks = [MODELS[n % len(MODELS)]] if n % 3 else [MODELS[n % len(MODELS)], MODELS[(n + 2) % len(MODELS)]]
        gpus_each = 8 // len(picks)
        gpus = list(node.gpus.order_by("index").prefetch_related("mig_instances"))
        targets = [
            {"url": f"http://127.0.0.1:{ENGINE_PORTS[engine] + k}/metrics", "engine": engine, "model": model}
            for k, (model, engine, _tps, _tenant) in enumerate(picks)
        ]
        ScrapeTarget.objects.bulk_create(ScrapeTarget(node=node, **t) for t in targets)
        for k, ((model, engine, tps, tenant_slug), target) in enumerate(zip(picks, targets, strict=True)):
            ServingEndpoint.objects.create(node=node, url=target["url"], model=model, engine=engine, up=True,
                                           probe_latency_ms=2.5, version=VERSIONS[engine])
            held = gpus[k * gpus_each:(k + 1) * gpus_each]
            if n % 5 == 4:
                held = held[: len(held) // 2]  # a tenant that has not grown into its node yet: free capacity
            allocations = []
            for gpu in held:
                units = list(gpu.mig_instances.all()) if gpu.mig_mode else [None]
                allocations += [allocation_create(tenant=tenants[tenant_slug], gpu=gpu, mig_instance=mig,
                                                  starts_at=since, by=operator) for mig in units]
            settings, speedup = ENGINE_SETTINGS[(n + k) % len(ENGINE_SETTINGS)]
            deployment_create(
                tenant=tenants[tenant_slug], name=f"{model.split('/')[-1]} on {node.hostname}", model_name=model,
                engine=engine, node=node, metrics_url=target["url"], allocations=allocations,
                settings=settings, active_from=since,
            )
            capacity[(node.pk, target["url"])] = tps * speedup * sum(a.gpu_share for a in allocations)
    return capacity


PILOT_TPS = 3000  # Qwen3-0.6B on one H100: a small model runs fast


def _unbillable_pilot(nodes: list[Node], tenant: Tenant, operator: User, now: datetime,
                      capacity: dict[tuple[int, str], float]) -> None:
    """A pilot started three hours ago on a free GPU, served by Dynamo's TensorRT-LLM worker, which (as of January
    2026) exports requests and latency but no token counter: it answers, and nothing of it can be billed. Its
    simulated agent reports it so (simulate.unbillable), the endpoint is marked and the deployment alerted."""
    since = now - timedelta(hours=3)
    held = {a.gpu_id for a in Allocation.objects.filter(ends_at__isnull=True)}
    gpu = Gpu.objects.filter(node__in=nodes, mig_mode=False).exclude(pk__in=held).order_by("node__hostname",
                                                                                            "index").first()
    url, model = "http://127.0.0.1:8600/metrics", "Qwen/Qwen3-0.6B"
    ServingEndpoint.objects.create(node=gpu.node, url=url, model=model, engine="triton", up=True,
                                   probe_latency_ms=3.1, version="dynamo 0.8 (trtllm-serve)", token_families=[],
                                   unbillable_since=since, last_seen=now)
    allocation = allocation_create(tenant=tenant, gpu=gpu, starts_at=since, by=operator)
    deployment_create(tenant=tenant, name=f"Qwen3-0.6B pilot on {gpu.node.hostname}", model_name=model,
                      engine="triton", node=gpu.node, metrics_url=url, allocations=[allocation],
                      settings={"precision": "fp8", "server": "dynamo"}, active_from=since)
    capacity[(gpu.node_id, url)] = PILOT_TPS
    deployments_check_billable(now=now)


def _health(nodes: list[Node], operator: User, now: datetime, rng: random.Random) -> None:
    """A week of the health events a real fleet sees, and the alerts they opened (one already acknowledged)."""
    gpus = list(Gpu.objects.filter(node__in=nodes).select_related("node"))
    for _ in range(40):
        gpu = rng.choice(gpus)
        code = rng.choice((13, 13, 31, 43, 94))
        HealthEvent.objects.create(node=gpu.node, gpu=gpu, kind=HealthEventKind.XID, code=code,
                                   detail=CATALOG[code].title, at=now - timedelta(minutes=rng.randrange(7 * 1440)))
    for kind, code, severity, title, minutes_ago, acknowledge in (
        (HealthEventKind.XID, 63, Severity.WARNING, f"XID 63: {CATALOG[63].title}", 2900, True),
        (HealthEventKind.XID, 94, Severity.WARNING, f"XID 94: {CATALOG[94].title}", 400, False),
        (HealthEventKind.THERMAL_THROTTLE, None, Severity.WARNING, "Thermal throttling", 95, False),
    ):
        gpu = rng.choice(gpus)
        at = now - timedelta(minutes=minutes_ago)
        HealthEvent.objects.create(node=gpu.node, gpu=gpu, kind=kind, code=code, detail=title, at=at)
        alert = alert_raise(key=f"{kind}:{code or ''}:{gpu.pk}", kind=kind, severity=severity, at=at,
                            title=f"{title} on {gpu.node.hostname}", detail=f"GPU {gpu.index}",
                            node_id=gpu.node_id, gpu_id=gpu.pk)
        if acknowledge:
            alert_acknowledge(alert_id=alert.pk, by=operator, now=at + timedelta(minutes=12))


def write_agent_configs(plans: list[NodePlan], credentials: dict[str, str], agents_dir: Path, portal_url: str,
                        now: datetime) -> None:
    """One simulated agent per node: its TOML config and credential (0600) under agents_dir/<hostname>/, running
    the load model its history was integrated from (portal.demo.history)."""
    unbillable: dict[int, list[str]] = {}
    for node_id, url in ServingEndpoint.objects.filter(unbillable_since__isnull=False).values_list("node_id", "url"):
        unbillable.setdefault(node_id, []).append(url)
    for plan in plans:
        node = plan.node
        sim = plan.sim(now=now, unbillable=tuple(unbillable.get(node.pk, [])))
        state = agents_dir / node.hostname
        state.mkdir(parents=True, exist_ok=True)
        credential = state / "credential"
        credential.write_text(credentials[node.hostname] + "\n")
        credential.chmod(0o600)
        (state / "agent.toml").write_text(
            f'# Simulated agent for demo node {node.hostname} (no GPU: readings are simulated)\n'
            f'portal_url = "{portal_url}"\n'
            f'state_dir = "{state}"\n'
            f'hostname = "{node.hostname}"\n'
            "interval_s = 10\n"
            "sample_s = 1.0\n\n"
            "[simulate]\n"
            f"gpus = {sim.gpus}\n"
            f'gpu_model = "{sim.gpu_model}"\n'
            f"mig = {'true' if sim.mig else 'false'}\n"
            f"seed = {sim.seed}\n"
            f"load = {sim.load}\n"
            f'driver_version = "{sim.driver_version}"\n'
            f"unbillable = {json.dumps(list(sim.unbillable))}\n"
            f"serving_gpus = {json.dumps(list(sim.serving_gpus or ()))}\n\n"
            "[simulate.capacity]  # generation tokens/s at full load\n"
            + "".join(f'"{url}" = {tps}\n' for url, tps in sim.capacity)
            + "".join(
                f'\n[[targets]]\nurl = "{t.url}"\nengine = "{t.engine}"\nmodel = "{t.model}"\n'
                for t in ScrapeTarget.objects.filter(node=node).order_by("url")
            )
        )
