"""The demo's bring-up and health story.

Frankfurt FRA-1 is 45 days into a 90-day bring-up of ten 8 x A100 nodes: the first six were accepted together
when the demo's history begins and have served tenants since; two more arrived today and failed their acceptance
test (one GPU missing on one, persistence mode off for DCGM on the other), so they sit in burn-in, out of
placement; the last two are named but not provisioned yet. In Ashburn one GPU a tenant holds threw a burst of
XID 48 (double-bit ECC) and is cordoned by the health policy: its incident, the tenant's notice, the marked SLA
windows and a proposed replacement unit all come from the same services ingest uses.
"""

from datetime import datetime, timedelta

from portal.accounts.models import User
from portal.bringup.services import plan_line_set, plan_set, planned_nodes_name
from portal.capacity.models import Allocation
from portal.fleet.models import Gpu, HealthEvent, HealthEventKind, Node, NodeLifecycle, NodeLifecycleChange, Site
from portal.fleet.services import node_lifecycle_set
from portal.health.catalog import CATALOG
from portal.health.services import incidents_close_quiet
from portal.provisioning.models import JobKind, JobStatus, ProvisioningJob, ProvisioningStep, StepStatus
from portal.provisioning.steps import plan as steps_plan
from portal.telemetry.store import health_events_record

PLANNED_NODES = 10
PLAN_DAYS_BEFORE_HISTORY = 15
# Today's tranche: hostname, GPUs its agent finds, the step that failed, what that step printed, the error.
ARRIVED_TODAY = (
    ("fra1-a100-07", 7, "inventory",
     "7 GPU(s) found by nvidia-smi: 0-6: NVIDIA A100-SXM4-80GB",
     "7 GPU(s) found, the plan expects 8; the agent reports 7 GPU(s), nvidia-smi 7"),
    ("fra1-a100-08", 8, "diagnostics",
     "Denylist: pass\nNVML Library: pass\nCUDA Main Library: pass\nPermissions and OS Blocks: pass\n"
     "Persistence Mode: fail (Persistence mode for GPU 0 is currently disabled. The DCGM diagnostic requires "
     "peristence mode to be enabled. Enable persistence mode by running \"nvidia-smi -i <gpuId> -pm 1 \" as "
     "root.)\nEnvironment Variables: pass\nPage Retirement/Row Remap: pass\nGraphics Processes: pass\n"
     "Inforom: pass",
     "dcgmi diag -r 1: Persistence Mode failed: Persistence mode for GPU 0 is currently disabled"),
)
NOT_YET_PROVISIONED = ("fra1-a100-09", "fra1-a100-10")
CORDONED_NODE, CORDONED_GPU = "iad1-h100-01", 2  # held by Acme AI, the demo tenant


def seed_bringup(*, site: Site, accepted: list[Node], operator: User, now: datetime, history_since: datetime,
                 make_node) -> list[Node]:
    """The plan of `site` with its first tranche (`accepted`, on the books since `history_since`) and the nodes
    of today's tranche, made by `make_node(hostname, gpus)`. Returns today's nodes (their agents run too)."""
    started = history_since - timedelta(days=PLAN_DAYS_BEFORE_HISTORY)
    plan = plan_set(site=site, started_on=started.date(), target_days=90, soak_minutes=30, by=operator,
                    note="Phase 2 of the Frankfurt hall: ten HGX A100 nodes")
    gpu_model = accepted[0].gpus.first().name
    line = plan_line_set(plan=plan, gpu_model=gpu_model, nodes=PLANNED_NODES, gpus_per_node=8, by=operator)
    _accepted_history(accepted, gpu_model, started, history_since, operator)
    later = [h for h, *_ in ARRIVED_TODAY] + list(NOT_YET_PROVISIONED)
    planned_nodes_name(plan=plan, line=line, hostnames=later, by=operator)
    NodeLifecycleChange.objects.filter(node__hostname__in=later).update(at=started + timedelta(days=20))
    arrived = []
    for hostname, gpus, failed_step, output, error in ARRIVED_TODAY:
        node = make_node(hostname, gpus)
        node_lifecycle_set(node=node, lifecycle=NodeLifecycle.PROVISIONING, at=now - timedelta(minutes=35),
                           reason="provisioning job created", by=operator)
        node_lifecycle_set(node=node, lifecycle=NodeLifecycle.BURN_IN, at=now,
                           reason="enrolled: the acceptance test decides when it is sellable")
        _failed_acceptance(node, failed_step, output, error, operator, now)
        arrived.append(node)
    return arrived


def _accepted_history(nodes: list[Node], gpu_model: str, started: datetime, accepted_at: datetime,
                      operator: User) -> None:
    """The first tranche's life before the demo's history: planned on day 0, provisioned over the morning of
    day 15, enrolled into burn-in, and accepted when the history begins."""
    rows = []
    for i, node in enumerate(nodes):
        Node.objects.filter(pk=node.pk).update(planned_gpu_model=gpu_model, planned_gpus=8)
        provisioned = accepted_at - timedelta(hours=7) + timedelta(minutes=20 * i)
        rows += [
            NodeLifecycleChange(node=node, lifecycle=NodeLifecycle.PLANNED, at=started, by=operator,
                                reason=f"planned: 8 x {gpu_model}"),
            NodeLifecycleChange(node=node, lifecycle=NodeLifecycle.PROVISIONING, at=provisioned, by=operator,
                                reason="provisioning job created"),
            NodeLifecycleChange(node=node, lifecycle=NodeLifecycle.BURN_IN, at=provisioned + timedelta(minutes=25),
                                reason="enrolled: the acceptance test decides when it is sellable"),
            NodeLifecycleChange(node=node, lifecycle=NodeLifecycle.SELLABLE, at=accepted_at, by=operator,
                                reason="acceptance test passed"),
        ]
    NodeLifecycleChange.objects.bulk_create(rows)


def _failed_acceptance(node: Node, failed_step: str, output: str, error: str, operator: User,
                       now: datetime) -> None:
    """The acceptance job that kept `node` in burn-in: the steps before the failure done, the rest pending."""
    address = f"10.20.7.{node.hostname[-2:].lstrip('0')}"
    job = ProvisioningJob.objects.create(
        kind=JobKind.BURN_IN, status=JobStatus.FAILED, site=node.site, node=node, node_name=node.hostname,
        host=address, username="root", install_dir="/opt/tokenmill-agent", init_system="systemd",
        portal_url="https://tokenmill.fra1.example", attempt=1, created_by=operator, created_at=now,
        started_at=now, finished_at=now, error=f"{dict(_titles())[failed_step]}: {error}",
    )
    done_output = {
        "connect": f"connected to root@{address}:22 (host key pinned when the node was provisioned)",
        "inventory": f"8 GPU(s) found by nvidia-smi: 0-7: {node.planned_gpu_model}\n"
                     "driver 590.48.01 matches the certified baseline\nCUDA 13.1 matches the certified baseline",
        "memory": "GPU 0-7: uncorrected ECC 0, row remaps none pending",
    }
    status = StepStatus.DONE
    rows = []
    for position, (key, title) in enumerate(_titles()):
        if key == failed_step:
            rows.append(ProvisioningStep(job=job, attempt=1, position=position, key=key, title=title,
                                         status=StepStatus.FAILED, output=f"{output}\nerror: {error}",
                                         started_at=now, finished_at=now))
            status = StepStatus.PENDING
            continue
        done = status == StepStatus.DONE
        rows.append(ProvisioningStep(job=job, attempt=1, position=position, key=key, title=title, status=status,
                                     output=done_output.get(key, "") if done else "",
                                     started_at=now if done else None, finished_at=now if done else None))
    ProvisioningStep.objects.bulk_create(rows)


def _titles() -> list[tuple[str, str]]:
    return [(s.key, s.title) for s in steps_plan(JobKind.BURN_IN)]


def seed_cordoned_gpu(*, now: datetime) -> None:
    """A burst of XID 48 on a GPU a tenant holds, through the ingest path: incident, cordon, notice, SLA marks,
    alert. The burst ended 90 minutes ago, so its incident has closed; the cordon waits for an acceptance test or
    an operator admin's override."""
    gpu = Gpu.objects.select_related("node").get(node__hostname=CORDONED_NODE, index=CORDONED_GPU)
    assert Allocation.objects.filter(gpu=gpu, ends_at__isnull=True).exists(), "the demo's cordoned GPU is held"
    title = CATALOG[48].title
    health_events_record(events=[
        HealthEvent(node=gpu.node, gpu=gpu, kind=HealthEventKind.XID, code=48, detail=title,
                    at=now - timedelta(minutes=minutes))
        for minutes in (97, 94, 90)
    ])
    incidents_close_quiet(now=now)
