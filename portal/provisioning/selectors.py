from dataclasses import dataclass
from datetime import datetime

from django.db.models import QuerySet
from django.utils import timezone

from portal.capacity.models import Allocation
from portal.fleet.models import Node
from portal.provisioning.models import (
    ACTIVE_STATUSES,
    COMPLETED_STEP_STATUSES,
    JobKind,
    JobStatus,
    KnownHost,
    ProvisioningJob,
    ProvisioningStep,
    SshCredential,
    StepStatus,
)


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    current: ProvisioningStep | None

    @property
    def percent(self) -> int:
        return round(100 * self.done / self.total) if self.total else 0


def job_progress(job: ProvisioningJob, steps: list[ProvisioningStep]) -> Progress:
    """Steps of the job's current attempt that are complete, out of all of them; the step running (or failed)."""
    done = sum(1 for s in steps if s.status in COMPLETED_STEP_STATUSES)
    current = next((s for s in steps if s.status in (StepStatus.RUNNING, StepStatus.FAILED)), None)
    return Progress(done=done, total=len(steps), current=current)


def job_polls(job: ProvisioningJob) -> bool:
    """Whether a page showing the job should keep polling: while it can still change without the operator (a job
    waiting for a host key confirmation it has already fetched waits for a person, not for us)."""
    if job.status == JobStatus.HOST_KEY:
        return not job.offered_fingerprint
    return job.status in ACTIVE_STATUSES


@dataclass(frozen=True)
class JobView:
    job: ProvisioningJob
    steps: list[ProvisioningStep]
    earlier: list[tuple[int, list[ProvisioningStep]]]
    progress: Progress
    polls: bool
    known_host: KnownHost | None
    acceptance: ProvisioningJob | None  # the acceptance test an install ended in


def job_detail(*, job_id: int) -> JobView:
    job = ProvisioningJob.objects.select_related("site", "credential", "node", "created_by").get(pk=job_id)
    all_steps = list(ProvisioningStep.objects.filter(job=job).order_by("attempt", "position"))
    current = [s for s in all_steps if s.attempt == job.attempt]
    earlier: dict[int, list[ProvisioningStep]] = {}
    for step in all_steps:
        if step.attempt != job.attempt:
            earlier.setdefault(step.attempt, []).append(step)
    return JobView(
        job=job, steps=current, earlier=sorted(earlier.items(), reverse=True), progress=job_progress(job, current),
        polls=job_polls(job), known_host=KnownHost.objects.filter(host=job.host, port=job.port).first(),
        acceptance=ProvisioningJob.objects.filter(node_id=job.node_id, kind=JobKind.BURN_IN,
                                                  created_at__gte=job.created_at).order_by("pk").first()
        if job.kind == JobKind.INSTALL and job.node_id else None,
    )


@dataclass(frozen=True)
class JobRow:
    job: ProvisioningJob
    progress: Progress


def jobs_list(*, status: str | None = None, limit: int = 200) -> list[JobRow]:
    jobs = ProvisioningJob.objects.select_related("site", "node").order_by("-created_at", "-pk")
    if status:
        jobs = jobs.filter(status=status)
    rows = []
    jobs = list(jobs[:limit])
    steps: dict[int, list[ProvisioningStep]] = {}
    attempts = {j.pk: j.attempt for j in jobs}
    for step in ProvisioningStep.objects.filter(job_id__in=attempts).order_by("position"):
        if step.attempt == attempts[step.job_id]:
            steps.setdefault(step.job_id, []).append(step)
    for job in jobs:
        rows.append(JobRow(job=job, progress=job_progress(job, steps.get(job.pk, []))))
    return rows


def any_polling(rows: list[JobRow]) -> bool:
    return any(job_polls(row.job) for row in rows)


def credentials_list() -> QuerySet[SshCredential]:
    return SshCredential.objects.select_related("created_by").order_by("name")


def known_hosts_list() -> QuerySet[KnownHost]:
    return KnownHost.objects.select_related("added_by").order_by("host", "port")


def node_jobs(*, node_id: int) -> tuple[Node, QuerySet[ProvisioningJob]]:
    node = Node.objects.select_related("site").get(pk=node_id)
    jobs = ProvisioningJob.objects.filter(node=node).order_by("-created_at", "-pk")
    return node, jobs


def allocations_to_release(*, node: Node, at: datetime | None = None) -> QuerySet[Allocation]:
    """Current and future allocations on the node's GPUs: what decommissioning ends."""
    at = at or timezone.now()
    return (Allocation.objects.filter(gpu__node=node).exclude(ends_at__lte=at)
            .select_related("tenant", "gpu", "mig_instance").order_by("starts_at"))


def latest_jobs(*, node_ids: list[int]) -> dict[int, ProvisioningJob]:
    """Each node's newest job, for the site page's pipeline."""
    found: dict[int, ProvisioningJob] = {}
    for job in ProvisioningJob.objects.filter(node_id__in=node_ids).order_by("node_id", "-created_at", "-pk"):
        found.setdefault(job.node_id, job)
    return found
