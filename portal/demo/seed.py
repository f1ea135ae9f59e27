"""The demo factory: two sites, sixteen 8-GPU nodes, tenants and their people, and 30 days of history.

History is synthesised with the same daily load curve, GPU models, UUIDs and MIG layouts as the simulated agent
(agents.simulate), so the seeded past and the live simulated present join without a seam. Hourly tiers cover
30 days, minute tiers the last 24 hours; the simulated agents write everything from now on.
"""

import json
import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from django.db import transaction

from agents.simulate import GPU_MODELS, MIG_LAYOUTS, VERSIONS, daily_shape, gpu_uuid
from portal.accounts.models import OperatorRole, User
from portal.alerts.models import Severity
from portal.alerts.services import alert_acknowledge, alert_raise
from portal.capacity.models import Allocation
from portal.capacity.services import allocation_create, deployment_create, deployments_check_billable, quota_set
from portal.demo.billing_seed import seed_billing
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
from portal.hours import hour_floor, hours_between
from portal.standards.services import baseline_set
from portal.telemetry.bulk import insert_rows
from portal.telemetry.models import GpuHour, GpuMinute, RollupWatermark, UsageHour, UsageMinute
from portal.telemetry.rollups import hours_from_minutes, rollup_site_hours
from portal.telemetry.xid import XID_MEANINGS
from portal.tenants.models import MemberRole, Membership, Tenant, TenantStatus

DEMO_PASSWORD = "tokenmill-demo"  # noqa: S105 - the demo's published login, printed by `make demo`
SIM_SEED = 42
TTFT_LE = [0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
E2E_LE = [0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0]
ITL_LE = [0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.5]


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
# Engine settings as operators enter them with a deployment (what the engine does not expose itself).
ENGINE_SETTINGS = (
    {"precision": "bf16", "kv_cache_dtype": "auto"},
    {"precision": "fp8", "kv_cache_dtype": "fp8_e4m3"},
    {"precision": "fp8", "kv_cache_dtype": "fp8_e4m3", "speculative_decoding": "eagle3"},
    {"precision": "int4-awq", "kv_cache_dtype": "auto"},
)
LAGGING_NODES = ("iad1-h100-03", "fra1-a100-03")
LAGGING_DRIVER = "550.127.05"


def mig_layout(index: int) -> tuple[tuple[str, int], ...]:
    """The layout the simulated agent gives GPU `index` on a MIG node (see agents.simulate)."""
    if index % 4 != 3:
        return ()
    return MIG_LAYOUTS[(index // 4 + SIM_SEED) % len(MIG_LAYOUTS)]


def load_at(t: datetime, rng_value: float, now: datetime) -> float:
    """Fleet utilization at time t: the simulated agents' daily curve at the demo's load level, scaled by a month
    of growth (tenants onboarding: 55% of today's load 30 days ago), so the economics pages show the factory
    moving along its own cost curve."""
    hour = t.hour + t.minute / 60
    growth = 0.55 + 0.45 * max(0.0, 1 - (now - t) / timedelta(days=30))
    return max(0.02, min(0.99, 0.78 * growth * daily_shape(hour) * (1 + 0.12 * rng_value)))


def _histogram(le: list[float], median: float, n: int, rng: random.Random) -> dict:
    """Cumulative bucket counts of n lognormal observations around `median`."""
    sigma = 0.55
    counts, total_sum = [], 0.0
    for bound in le:
        z = (math.log(bound) - math.log(median)) / sigma
        counts.append(round(n * 0.5 * (1 + math.erf(z / math.sqrt(2)))))
    counts.append(n)
    for i in range(1, len(counts)):
        counts[i] = max(counts[i], counts[i - 1])
    total_sum = n * median * math.exp(sigma**2 / 2) * rng.uniform(0.97, 1.03)
    return {"le": le, "counts": counts, "sum": round(total_sum, 3)}


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
        nodes = []
        for spec in SITES:
            site = Site.objects.create(
                name=spec.name, slug=spec.slug, location=spec.location, currency=spec.currency,
                gpu_capex=spec.capex, depreciation_months=48, energy_price_kwh=spec.kwh, pue=spec.pue,
                other_opex_gpu_hour=spec.opex,
            )
            for hostname, model_key, mig in spec.nodes:
                nodes.append(_node(site, hostname, model_key, mig, now, installed=history_start(now, days)))
        endpoints = _endpoints(nodes, tenants, people[0], now, days)
        _unbillable_pilot(nodes, tenants["initech"], people[0], now)
        _history(nodes, endpoints, now, days, minute_hours, rng)  # attributes every hour: after all allocations
        _health(nodes, people[0], now, rng)
        for slug, tokens_per_minute, gpus in (("acme", 6_000_000, 48), ("globex", 1_500_000, 40),
                                              ("initech", 2_000_000, 24), ("umbrella", 3_000_000, 24)):
            quota_set(tenant=tenants[slug], tokens_per_minute=tokens_per_minute, gpus=gpus)
        seed_tenants(tenants=tenants, now=now)
        seed_billing(now=now)
        baseline_set(by=people[0], driver_version="590.48.01", cuda_driver_version="13.1",
                     note="Q4 fleet standard", now=now - timedelta(days=20), **{
                         f"{engine}_version": version for engine, version in VERSIONS.items()})
        for name in ("minute", "hour"):
            RollupWatermark.objects.update_or_create(name=name, defaults={"stored_until": now})
        RollupWatermark.objects.update_or_create(name="attribution", defaults={"stored_until": now})
        credentials = {node.hostname: node_credential_issue(node=node) for node in nodes}
    if agents_dir is not None:
        write_agent_configs(nodes, credentials, agents_dir, portal_url)
    return {"nodes": len(nodes), "gpus": len(nodes) * 8, "tenants": len(tenants), "users": len(people)}


def _people() -> list[User]:
    operator = User.objects.create_user(username="operator", email="operator@tokenmill.example",
                                        password=DEMO_PASSWORD, operator_role=OperatorRole.ADMIN,
                                        first_name="Olivia", is_staff=True, is_superuser=True)
    viewer = User.objects.create_user(username="viewer", email="viewer@tokenmill.example",
                                      password=DEMO_PASSWORD, operator_role=OperatorRole.VIEWER, first_name="Victor")
    return [operator, viewer]


def _node(site: Site, hostname: str, model_key: str, mig: bool, now: datetime, installed: datetime) -> Node:
    model = GPU_MODELS[model_key]
    node = Node.objects.create(
        site=site, hostname=hostname, status=NodeStatus.ONLINE, last_seen=now, simulated=True, installed_at=installed,
        os="Ubuntu 22.04.5 LTS", kernel="5.15.0-126-generic", driver_version="590.48.01",
        cuda_driver_version="13.1", nvml_version="13.590.48.01", agent_version="0.1.0",
    )
    if hostname in LAGGING_NODES:
        # Two nodes lag the baseline, as real fleets do; the version-drift view shows them.
        node.driver_version, node.nvml_version, node.cuda_driver_version = LAGGING_DRIVER, "12.550.127.05", "12.4"
        node.save()
    gpus = Gpu.objects.bulk_create(
        Gpu(node=node, uuid=gpu_uuid(hostname, i), index=i, name=model.name, memory_total_mib=model.memory_mib,
            installed_at=installed,
            power_limit_w=model.power_limit_w, mig_mode=bool(mig and mig_layout(i)),
            pci_bus_id=f"00000000:{0x18 + 0x11 * i:02X}:00.0")
        for i in range(8)
    )
    MigInstance.objects.bulk_create(
        MigInstance(gpu=gpu, gi_id=gi, profile=profile, memory_total_mib=model.mig_memory_mib[profile])
        for gpu in gpus if mig for profile, gi in mig_layout(gpu.index)
    )
    node.model_key = model_key
    return node


def history_start(now: datetime, days: int) -> datetime:
    """The hour the demo factory's history begins: its nodes are installed, allocated and deployed then, so the
    books count every GPU-hour from its first."""
    return hour_floor(now - timedelta(days=days))


def _endpoints(nodes: list[Node], tenants: dict[str, Tenant], operator: User,
               now: datetime, days: int) -> list[tuple[ServingEndpoint, int, int]]:
    """Each node serves one or two tenants' models on GPUs allocated to them (some nodes keep free capacity);
    returns (endpoint, GPUs it runs on, tokens/s per GPU)."""
    out = []
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
            endpoint = ServingEndpoint.objects.create(
                node=node, url=target["url"], model=model, engine=engine, up=True, probe_latency_ms=2.5,
                version=VERSIONS[engine],
            )
            held = gpus[k * gpus_each:(k + 1) * gpus_each]
            if n % 5 == 4:
                held = held[: len(held) // 2]  # a tenant that has not grown into its node yet: free capacity
            allocations = []
            for gpu in held:
                units = list(gpu.mig_instances.all()) if gpu.mig_mode else [None]
                allocations += [allocation_create(tenant=tenants[tenant_slug], gpu=gpu, mig_instance=mig,
                                                  starts_at=since, by=operator) for mig in units]
            deployment_create(
                tenant=tenants[tenant_slug], name=f"{model.split('/')[-1]} on {node.hostname}", model_name=model,
                engine=engine, node=node, metrics_url=target["url"], allocations=allocations,
                settings=ENGINE_SETTINGS[(n + k) % len(ENGINE_SETTINGS)], active_from=since,
            )
            out.append((endpoint, gpus_each, tps))
    return out


def _unbillable_pilot(nodes: list[Node], tenant: Tenant, operator: User, now: datetime) -> None:
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
    deployments_check_billable(now=now)


def _health(nodes: list[Node], operator: User, now: datetime, rng: random.Random) -> None:
    """A week of the health events a real fleet sees, and the alerts they opened (one already acknowledged)."""
    gpus = list(Gpu.objects.filter(node__in=nodes).select_related("node"))
    for _ in range(40):
        gpu = rng.choice(gpus)
        code = rng.choice((13, 13, 31, 43, 94))
        HealthEvent.objects.create(node=gpu.node, gpu=gpu, kind=HealthEventKind.XID, code=code,
                                   detail=XID_MEANINGS[code][0], at=now - timedelta(minutes=rng.randrange(7 * 1440)))
    for kind, code, severity, title, minutes_ago, acknowledge in (
        (HealthEventKind.XID, 63, Severity.WARNING, f"XID 63: {XID_MEANINGS[63][0]}", 2900, True),
        (HealthEventKind.XID, 94, Severity.WARNING, f"XID 94: {XID_MEANINGS[94][0]}", 400, False),
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


def _history(nodes, endpoints, now: datetime, days: int, minute_hours: int, rng: random.Random) -> None:
    gpus = list(Gpu.objects.filter(node__in=nodes).select_related("node"))
    start_hour = history_start(now, days)
    hours = hours_between(start_hour, now)
    # The minute tier covers whole hours up to now, and the hour tier of those hours is rolled up from it as the
    # rollup would; older hours are synthesised directly.
    minute_start = max(start_hour, hour_floor(now - timedelta(hours=minute_hours)))
    minutes = [minute_start + timedelta(minutes=m) for m in range(int((now - minute_start).total_seconds()) // 60)]
    day_noise = {d: rng.uniform(-1, 1) for d in range(days + 2)}
    noise = {h: 0.6 * day_noise[(now - h).days] + 0.4 * rng.uniform(-1, 1) for h in hours}
    hour_rows, minute_rows = [], []
    for gpu in gpus:
        model = GPU_MODELS["H100" if "H100" in gpu.name else "A100"]
        bias = rng.uniform(0.8, 1.1)
        for ts in hours[:hours.index(minute_start)]:
            hour_rows.append(_gpu_row(gpu, model, ts, 3600.0, load_at(ts, noise[ts], now) * bias, rng))
        for ts in minutes:
            hour_key = ts.replace(minute=0)
            minute_rows.append(_gpu_row(gpu, model, ts, 60.0,
                                        load_at(ts, noise.get(hour_key, 0.0), now) * bias, rng))
    insert_rows(GpuHour, hour_rows)
    insert_rows(GpuMinute, minute_rows)
    # The grid shows current readings before the first agent batch: take each GPU's last seeded minute.
    latest = {row["gpu_id"]: row for row in minute_rows}
    for gpu in gpus:
        row = latest[gpu.pk]
        gpu.current_util, gpu.current_power_w, gpu.current_temp_c = row["util_mean"], row["power_mean_w"], row[
            "temp_max_c"]
        gpu.current_memory_used_mib, gpu.current_at = row["memory_used_mib_max"], row["ts"]
    Gpu.objects.bulk_update(gpus, ["current_util", "current_power_w", "current_temp_c", "current_memory_used_mib",
                                   "current_at"])
    usage_hours, usage_minutes = [], []
    for endpoint, gpu_count, tps in endpoints:
        for ts in hours[:hours.index(minute_start)]:
            usage_hours.append(_usage_row(endpoint, ts, 3600, load_at(ts, noise[ts], now), gpu_count, tps, rng))
        for ts in minutes:
            load = load_at(ts, noise.get(ts.replace(minute=0), 0.0), now)
            usage_minutes.append(_usage_row(endpoint, ts, 60, load, gpu_count, tps, rng))
    insert_rows(UsageHour, usage_hours)
    insert_rows(UsageMinute, usage_minutes)
    hours_from_minutes(node_ids=[n.pk for n in nodes], start=minute_start, end=now)
    rollup_site_hours(hours=hours)
    cost_hours_attribute(hours=hours, now=now)
    # Every hour is attributed from the whole seeded history: what the seeding's allocations queued is done.
    PendingAttribution.objects.all().delete()


def _gpu_row(gpu: Gpu, model, ts: datetime, seconds: float, util: float, rng: random.Random):
    util = max(0.0, min(1.0, util))
    power = model.idle_w + (model.power_limit_w - model.idle_w) * util**0.9
    return {
        "gpu_id": gpu.pk, "ts": ts, "seconds": seconds, "util_mean": round(util * 100, 2),
        "util_max": round(min(100.0, util * 100 + rng.uniform(3, 12)), 2), "mem_util_mean": round(util * 55, 2),
        "memory_used_mib_max": int(model.memory_mib * 0.88), "power_mean_w": round(power, 1),
        "energy_mj": int(power * seconds * 1000), "temp_max_c": round(34 + 40 * util + rng.uniform(0, 4), 1),
    }


def _usage_row(endpoint: ServingEndpoint, ts: datetime, seconds: int, util: float, gpus: int, tps: int,
               rng: random.Random):
    generation = int(util * tps * gpus * seconds * rng.uniform(0.95, 1.05))
    requests = max(1, generation // 320)
    failed = int(requests * 0.002 * rng.random())
    ttft_median = 0.08 + 0.5 * util**3
    return {
        "endpoint_id": endpoint.pk, "ts": ts, "prompt_tokens": generation * 3 + rng.randrange(1000),
        "generation_tokens": generation, "requests_ok": requests - failed, "requests_failed": failed,
        "probes": seconds // 10, "probes_up": seconds // 10,
        "ttft": _histogram(TTFT_LE, ttft_median, requests, rng),
        "itl": _histogram(ITL_LE, 0.018 + 0.03 * util**2, generation, rng),
        "e2e": _histogram(E2E_LE, 4 + 6 * util**2, requests, rng),
    }


def write_agent_configs(nodes: list[Node], credentials: dict[str, str], agents_dir: Path, portal_url: str) -> None:
    """One simulated agent per node: its TOML config and credential (0600) under agents_dir/<hostname>/."""
    unbillable: dict[int, list[str]] = {}
    for node_id, url in ServingEndpoint.objects.filter(unbillable_since__isnull=False).values_list("node_id", "url"):
        unbillable.setdefault(node_id, []).append(url)
    for node in nodes:
        state = agents_dir / node.hostname
        state.mkdir(parents=True, exist_ok=True)
        credential = state / "credential"
        credential.write_text(credentials[node.hostname] + "\n")
        credential.chmod(0o600)
        mig = Gpu.objects.filter(node=node, mig_mode=True).exists()
        model_key = "H100" if "h100" in node.hostname else "A100"
        (state / "agent.toml").write_text(
            f'# Simulated agent for demo node {node.hostname} (no GPU: readings are simulated)\n'
            f'portal_url = "{portal_url}"\n'
            f'state_dir = "{state}"\n'
            f'hostname = "{node.hostname}"\n'
            "interval_s = 10\n"
            "sample_s = 1.0\n\n"
            "[simulate]\n"
            "gpus = 8\n"
            f'gpu_model = "{model_key}"\n'
            f"mig = {'true' if mig else 'false'}\n"
            f"seed = {SIM_SEED}\n"
            "load = 0.78\n"
            f'driver_version = "{node.driver_version}"\n'
            f"unbillable = {json.dumps(unbillable.get(node.pk, []))}\n"
            + "".join(
                f'\n[[targets]]\nurl = "{t.url}"\nengine = "{t.engine}"\nmodel = "{t.model}"\n'
                for t in ScrapeTarget.objects.filter(node=node).order_by("url")
            )
        )
