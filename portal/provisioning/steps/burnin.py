"""The acceptance test a node passes before its units are sold, and again before a cordon ends: inventory against
the plan and the certified baseline, memory health, diagnostics (DCGM where installed, else the agent's NVML
self-test), then a soak without health events. Each step's output is kept, so a failure shows what to fix."""

import json
import time

from django.conf import settings
from django.utils import timezone

from portal.fleet.models import Gpu, HealthEvent, HealthEventKind, Node, NodeLifecycle
from portal.fleet.services import node_lifecycle_set
from portal.health.services import cordons_end
from portal.provisioning.attempt import Outcome, Runner, StepFailed
from portal.provisioning.dcgm import parse_dcgmi_diag
from portal.provisioning.parsing import (
    MEMORY_HEALTH_FIELDS,
    QUERY_GPU_FIELDS,
    GpuInfo,
    parse_memory_health_csv,
    parse_query_gpu_csv,
)
from portal.provisioning.steps.registry import step
from portal.standards.selectors import current_baseline

SOAK_POLL_S = 1.0
# Events that say nothing against the hardware: a node coming back, corrected (and counted) ECC, a power cap.
SOAK_BENIGN = (HealthEventKind.NODE_ONLINE, HealthEventKind.ECC_CORRECTED, HealthEventKind.POWER_THROTTLE)


def soak_seconds(node: Node) -> int:
    """The site's bring-up plan says how long a node soaks; without a plan, settings.ACCEPTANCE_SOAK_S."""
    plan = getattr(node.site, "bringup_plan", None)
    return plan.soak_minutes * 60 if plan is not None else settings.ACCEPTANCE_SOAK_S


def _gpus(r: Runner, out: Outcome) -> tuple[list[GpuInfo], str]:
    smi = r.remote.run(f"nvidia-smi --query-gpu={','.join(QUERY_GPU_FIELDS)} --format=csv", timeout=60)
    if smi.ok:
        try:
            return parse_query_gpu_csv(smi.stdout), "nvidia-smi"
        except ValueError as exc:
            raise StepFailed(f"cannot read nvidia-smi's output: {exc}", smi.text()) from None
    if not r.job.node.simulated:
        raise StepFailed("nvidia-smi is missing or failing on a node with real GPUs", smi.text())
    out.warn("nvidia-smi is not usable on this simulated node: the GPUs its agent simulates are counted")
    reported = Gpu.objects.filter(node=r.job.node, retired_at__isnull=True).order_by("index")
    return [GpuInfo(index=g.index, name=g.name, uuid=g.uuid, pci_bus_id=g.pci_bus_id, driver_version="",
                    memory_total_mib=g.memory_total_mib, mig_current=g.mig_mode, mig_pending=None)
            for g in reported], "the simulated agent"


@step("inventory", "GPUs against the plan and the baseline", needs_ssh=True)
def step_inventory(r: Runner) -> Outcome:
    node, out, failures = r.job.node, Outcome(), []
    node.refresh_from_db()
    gpus, source = _gpus(r, out)
    out.ok(f"{len(gpus)} GPU(s) found by {source}: " + ", ".join(f"{g.index}: {g.name}" for g in gpus))
    if node.planned_gpus is not None and len(gpus) != node.planned_gpus:
        failures.append(f"{len(gpus)} GPU(s) found, the plan expects {node.planned_gpus}")
    if node.planned_gpu_model:
        failures += [f"GPU {g.index} is {g.name}, the plan expects {node.planned_gpu_model}"
                     for g in gpus if g.name != node.planned_gpu_model]
    reported = Gpu.objects.filter(node=node, retired_at__isnull=True).count()
    if node.simulated:
        out.warn(f"the agent simulates its GPUs ({reported}); they are not compared with {source}")
    elif reported != len(gpus):
        failures.append(f"the agent reports {reported} GPU(s), nvidia-smi {len(gpus)}: a GPU NVML cannot open?")
    baseline = current_baseline()
    driver = next((g.driver_version for g in gpus if g.driver_version), node.driver_version)
    for what, found, wanted in (("driver", driver, baseline and baseline.driver_version),
                                ("CUDA", node.cuda_driver_version, baseline and baseline.cuda_driver_version)):
        if not wanted:
            out.ok(f"{what} {found or 'unknown'}: no certified baseline to compare with")
        elif not found:
            failures.append(f"{what} version unknown, the certified baseline is {wanted}")
        elif found != wanted:
            failures.append(f"{what} {found} differs from the certified baseline {wanted}")
        else:
            out.ok(f"{what} {found} matches the certified baseline")
    if failures:
        raise StepFailed("; ".join(failures), out.text)
    return out


@step("memory", "ECC and row remapping clean", needs_ssh=True)
def step_memory(r: Runner) -> Outcome:
    out = Outcome()
    smi = r.remote.run(f"nvidia-smi --query-gpu={','.join(MEMORY_HEALTH_FIELDS)} --format=csv", timeout=60)
    if not smi.ok:
        if r.job.node.simulated:
            out.warn("simulated node without nvidia-smi: no memory counters to read")
            return out
        raise StepFailed("nvidia-smi cannot report memory errors", smi.text())
    try:
        rows = parse_memory_health_csv(smi.stdout)
    except ValueError as exc:
        raise StepFailed(f"cannot read nvidia-smi's output: {exc}", smi.text()) from None
    problems = [f"GPU {m.index}: {p}" for m in rows for p in m.problems]
    if problems:
        raise StepFailed("; ".join(problems), smi.text())
    for m in rows:
        remap = "not reported" if m.remap_pending is None else "none pending"
        ecc = "n/a" if m.uncorrected_volatile is None else m.uncorrected_volatile
        out.ok(f"GPU {m.index}: uncorrected ECC {ecc}, row remaps {remap}")
    return out


@step("diagnostics", "Diagnostics (DCGM, or the agent's self-test)", needs_ssh=True)
def step_diagnostics(r: Runner) -> Outcome:
    out = Outcome()
    if r.remote.run("command -v dcgmi").ok:
        level = settings.ACCEPTANCE_DCGM_LEVEL
        result = r.remote.run(f"dcgmi diag -r {int(level)}", timeout=3600)
        try:
            report = parse_dcgmi_diag(result.stdout)
        except ValueError as exc:
            raise StepFailed(f"dcgmi diag -r {level} gave no result: {exc}", result.text()) from None
        for test in report.tests:
            out.ok(f"{test.name}: {test.result}" + (f" ({test.detail})" if test.detail else ""))
        if not report.passed:
            raise StepFailed(f"dcgmi diag -r {level}: " + "; ".join(
                f"{t.name} failed" + (f": {t.detail}" if t.detail else "") for t in report.failures),
                f"{out.text}\n\n{result.text()}")
        return out
    agent = f"{r.q_dir}/venv/bin/tokenmill-agent --config {r.q_dir}/agent.toml selftest --json"
    result = r.remote.run(agent, timeout=120)
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise StepFailed(f"the agent's self-test printed no report (exit status {result.exit_status})",
                         result.text()) from None
    out.ok("DCGM is not installed: the agent's NVML self-test ran"
           + (" on simulated GPUs" if report.get("simulated") else ""))
    for gpu in report.get("gpus", []):
        checks = ", ".join(f"{c['name']} {c['result']}" for c in gpu.get("checks", []))
        out.ok(f"GPU {gpu.get('index')} {gpu.get('name') or ''}: {checks}")
    if not report.get("ok"):
        raise StepFailed("self-test: " + "; ".join(report.get("problems") or ["failed"]), out.text)
    return out


@step("soak", "Soak without health events", needs_ssh=False)
def step_soak(r: Runner) -> Outcome:
    node, out = r.job.node, Outcome()
    seconds = soak_seconds(node)
    started, clock = timezone.now(), time.monotonic()
    while True:
        event = (HealthEvent.objects.filter(node=node, at__gte=started).exclude(kind__in=SOAK_BENIGN)
                 .order_by("at").first())
        if event is not None:
            raise StepFailed(f"{event.get_kind_display()}{f' {event.code}' if event.code else ''} at "
                             f"{event.at:%H:%M:%S} UTC, {(event.at - started).total_seconds():.0f} s into the soak: "
                             f"{event.detail}")
        remaining = seconds - (time.monotonic() - clock)
        if remaining <= 0:
            break
        r.check_cancelled()
        r.heartbeat()
        time.sleep(min(SOAK_POLL_S, remaining))
    if seconds >= 3 * node.interval_s:
        node.refresh_from_db(fields=["last_seen"])
        if node.last_seen is None or node.last_seen < started:
            raise StepFailed(f"no batch from {node.hostname} during the {seconds} s soak: is its agent running?")
    out.ok(f"{seconds} s without a health event (from {started:%H:%M:%S} UTC)")
    return out


@step("accept", "Accept for sale", needs_ssh=False)
def step_accept(r: Runner) -> Outcome:
    job, out = r.job, Outcome()
    at = timezone.now()
    ended = cordons_end(node=job.node, at=at, by=job.created_by, override=False,
                        reason=f"acceptance test passed (job {job.pk})")
    node_lifecycle_set(node=job.node, lifecycle=NodeLifecycle.SELLABLE, at=at, by=job.created_by,
                       reason=f"acceptance test passed (job {job.pk})")
    out.ok(f"{job.node.hostname} is sellable: its units can be placed")
    if ended:
        out.ok(f"{ended} cordon(s) ended")
    return out
