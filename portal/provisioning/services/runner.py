"""Running a job (the Celery task's body): claim it, lay out this attempt's steps from the registry, run them in
order until one fails or the job is cancelled. An install that completes queues the node's acceptance test."""

import logging

from django.db.models import F
from django.utils import timezone

from portal.fleet.models import NodeLifecycle
from portal.fleet.services import node_lifecycle_set
from portal.provisioning import crypto, ssh
from portal.provisioning.attempt import Cancelled, Runner, StepFailed
from portal.provisioning.models import (
    COMPLETED_STEP_STATUSES,
    JobKind,
    JobStatus,
    ProvisioningJob,
    ProvisioningStep,
    StepStatus,
)
from portal.provisioning.services.jobs import burn_in_create
from portal.provisioning.steps import REGISTRY, plan
from portal.provisioning.steps.install import unused_token_expire

log = logging.getLogger(__name__)


def job_run(*, job_id: int) -> None:
    """Run a queued job (task body). Does nothing unless the job is queued, so a redelivered task is harmless."""
    now = timezone.now()
    claimed = ProvisioningJob.objects.filter(pk=job_id, status=JobStatus.QUEUED).update(
        status=JobStatus.RUNNING, started_at=now, heartbeat_at=now, finished_at=None, error="",
        attempt=F("attempt") + 1,
    )
    if not claimed:
        return
    job = ProvisioningJob.objects.select_related("site", "credential", "node").get(pk=job_id)
    runner = Runner(job)
    try:
        _run_steps(runner, _attempt_steps(job))
    except Exception as exc:
        # A bug must not leave the job "running" for ever: fail it visibly, with the step it was in.
        log.exception("provisioning job %s crashed", job_id)
        ProvisioningStep.objects.filter(job=job, attempt=job.attempt, status=StepStatus.RUNNING).update(
            status=StepStatus.FAILED, finished_at=timezone.now(), output=f"internal error: {exc}"
        )
        unused_token_expire(job)
        if _finish(job, JobStatus.FAILED, f"internal error: {exc}"):
            _failed_acceptance(job)
    finally:
        runner.close()


def _attempt_steps(job: ProvisioningJob) -> list[ProvisioningStep]:
    """This attempt's steps: those an earlier attempt completed are marked skipped. An acceptance test is never
    resumed: each attempt tests the node afresh."""
    steps_of_kind = plan(job.kind)
    done_before = set() if job.kind == JobKind.BURN_IN else set(
        ProvisioningStep.objects.filter(job=job, attempt__lt=job.attempt, status__in=COMPLETED_STEP_STATUSES)
        .exclude(key="connect").values_list("key", flat=True)
    )
    pending_ssh = [s.key for s in steps_of_kind if s.needs_ssh and s.key not in done_before]
    rows = []
    for position, step in enumerate(steps_of_kind):
        status, output = StepStatus.PENDING, ""
        if step.key in done_before:
            status, output = StepStatus.SKIPPED, "completed in an earlier attempt"
        elif step.key == "connect" and job.skip_ssh:
            status, output = StepStatus.SKIPPED, "not connecting: the node is not reachable from the portal"
        elif step.key == "connect" and not pending_ssh:
            status, output = StepStatus.SKIPPED, "no step left that needs the node"
        elif step.needs_ssh and job.skip_ssh:
            status, output = StepStatus.SKIPPED, "skipped: not connecting to the node"
        rows.append(ProvisioningStep(job=job, attempt=job.attempt, position=position, key=step.key,
                                     title=step.title, status=status, output=output))
    return ProvisioningStep.objects.bulk_create(rows)


def _run_steps(runner: Runner, steps: list[ProvisioningStep]) -> None:
    job = runner.job
    for index, step in enumerate(steps):
        if step.status != StepStatus.PENDING:
            continue
        try:
            runner.check_cancelled()
        except Cancelled:
            _cancel_rest(steps[index:])
            return
        step.status, step.started_at = StepStatus.RUNNING, timezone.now()
        step.save(update_fields=["status", "started_at"])
        runner.heartbeat()
        try:
            outcome = REGISTRY[step.key].run(runner)
        except Cancelled:
            _step_end(step, StepStatus.CANCELLED, "cancelled while waiting")
            _cancel_rest(steps[index + 1:])
            unused_token_expire(job)
            return
        except (StepFailed, ssh.SshError, ssh.KeyFormatError, crypto.DecryptionError) as exc:
            detail = getattr(exc, "output", "")
            _step_end(step, StepStatus.FAILED, "\n".join(filter(None, [detail, f"error: {exc}"])))
            unused_token_expire(job)
            if _finish(job, JobStatus.FAILED, f"{step.title}: {exc}"):
                _failed_acceptance(job)
            return
        _step_end(step, StepStatus.WARNING if outcome.warnings else StepStatus.DONE, outcome.text)
    if _finish(job, JobStatus.DONE, "") and job.kind == JobKind.INSTALL:
        burn_in_create(node=job.node, by=job.created_by)


def _step_end(step: ProvisioningStep, status: str, output: str) -> None:
    step.status, step.output, step.finished_at = status, output[-60000:], timezone.now()
    step.save(update_fields=["status", "output", "finished_at"])


def _cancel_rest(steps: list[ProvisioningStep]) -> None:
    pending = [s.pk for s in steps if s.status == StepStatus.PENDING]
    ProvisioningStep.objects.filter(pk__in=pending).update(status=StepStatus.CANCELLED)


def _failed_acceptance(job: ProvisioningJob) -> None:
    """A sellable node that fails a new acceptance test leaves placement until it passes one."""
    if job.kind == JobKind.BURN_IN and job.node.lifecycle == NodeLifecycle.SELLABLE:
        node_lifecycle_set(node=job.node, lifecycle=NodeLifecycle.BURN_IN, at=timezone.now(), by=job.created_by,
                           reason=f"acceptance test failed (job {job.pk})")


def _finish(job: ProvisioningJob, status: str, error: str) -> bool:
    """End a running job; False when it had been cancelled meanwhile."""
    return bool(ProvisioningJob.objects.filter(pk=job.pk, status=JobStatus.RUNNING).update(
        status=status, error=error, finished_at=timezone.now()
    ))
