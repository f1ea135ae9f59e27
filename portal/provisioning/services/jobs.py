"""Provisioning jobs, from creation to their end: install the agent on a node, test it before sale (burn-in), or
take it out (decommission), and the operator's actions on a job.

A job is an ordered list of steps. Each run of a job is an attempt with its own step rows; a retry skips the steps
an earlier attempt completed. Status changes are conditional updates, so a cancel is never overwritten by a runner
finishing, and a task delivered twice runs the job once.
"""

import base64
from contextlib import contextmanager
from datetime import datetime, timedelta

import paramiko
from django.db import IntegrityError, transaction
from django.utils import timezone

from portal.accounts.models import User
from portal.audit.services import audit_record
from portal.fleet.models import Node, NodeLifecycle, NodeStatus, Site
from portal.fleet.services import node_expect, node_lifecycle_set
from portal.provisioning import ssh
from portal.provisioning.models import (
    ACTIVE_STATUSES,
    JobKind,
    JobStatus,
    KnownHost,
    ProvisioningJob,
    ProvisioningStep,
    SshCredential,
    StepStatus,
)
from portal.provisioning.parsing import HostSpec, fingerprint, known_hosts_lookup
from portal.provisioning.services.credentials import ProvisioningError, known_host_pin
from portal.provisioning.steps.install import unused_token_expire

STALE_AFTER = timedelta(minutes=15)



def _enqueue(job_id: int, *, fetch: bool) -> None:
    from portal.provisioning import tasks

    task = tasks.fetch_host_key if fetch else tasks.run_job
    transaction.on_commit(lambda: task.delay(job_id))


def jobs_create(
    *, site: Site, hosts: list[HostSpec], credential: SshCredential, install_dir: str, simulate_gpus: int,
    portal_url: str, known_hosts: str = "", by: User | None,
) -> list[ProvisioningJob]:
    """One install job per host. Hosts whose key is pinned (or listed in `known_hosts`) are queued at once; the
    others first fetch the host key for an operator to confirm. Each job drives one node of the site: the planned
    node of that hostname, or a new one, which is provisioning from now on. All or nothing."""
    busy = [f"{h.host}:{h.port}" for h in hosts
            if ProvisioningJob.objects.filter(host=h.host, port=h.port, status__in=ACTIVE_STATUSES).exists()]
    if busy:
        raise ProvisioningError(f"a job is already active for {', '.join(busy)}")
    jobs = []
    now = timezone.now()
    with _one_active_job(), transaction.atomic():
        for spec in hosts:
            if known_hosts:
                for key in known_hosts_lookup(known_hosts, host=spec.host, port=spec.port)[:1]:
                    known_host_pin(host=spec.host, port=spec.port, key=key, source=KnownHost.Source.KNOWN_HOSTS,
                                   by=by)
            pinned = KnownHost.objects.filter(host=spec.host, port=spec.port).exists()
            node = _node_to_provision(site=site, hostname=spec.name, at=now, by=by)
            job = ProvisioningJob.objects.create(
                kind=JobKind.INSTALL, status=JobStatus.QUEUED if pinned else JobStatus.HOST_KEY, site=site,
                host=spec.host, port=spec.port, username=spec.user, node_name=spec.name, credential=credential,
                install_dir=install_dir, simulate_gpus=simulate_gpus, portal_url=portal_url.rstrip("/"),
                node=node, created_by=by, created_at=now,
            )
            audit_record(actor=by, action="provisioning.job_create", target=job,
                         after={"site": site.slug, "node_name": spec.name, "install_dir": install_dir})
            _enqueue(job.pk, fetch=not pinned)
            jobs.append(job)
    return jobs


def _node_to_provision(*, site: Site, hostname: str, at: datetime, by: User | None) -> Node:
    node = Node.objects.filter(site=site, hostname=hostname).first()
    if node is None:
        return node_expect(site=site, hostname=hostname, lifecycle=NodeLifecycle.PROVISIONING, at=at, by=by,
                           reason="provisioning job created")
    if node.lifecycle == NodeLifecycle.RETIRED:
        raise ProvisioningError(f"{hostname} was decommissioned; provision the machine under a new hostname")
    node_lifecycle_set(node=node, lifecycle=NodeLifecycle.PROVISIONING, at=at, by=by,
                       reason="provisioning job created")
    return node


@contextmanager
def _one_active_job():
    """The database allows one active job per node and per host; a race past the friendly checks lands here."""
    try:
        yield
    except IntegrityError as exc:
        # PostgreSQL names the constraint; SQLite names the columns of the partial unique index.
        if not any(m in str(exc) for m in ("provisioningjob_one_active", "provisioningjob.node_id",
                                            "provisioningjob.host")):
            raise
        raise ProvisioningError(
            "another job for this node or host became active meanwhile; see the job list") from None


def host_key_fetch(*, job_id: int) -> None:
    """First contact: record the key the server offers, for the operator to confirm (task body; idempotent)."""
    job = ProvisioningJob.objects.filter(pk=job_id, status=JobStatus.HOST_KEY).first()
    if job is None or job.offered_fingerprint:
        return
    if KnownHost.objects.filter(host=job.host, port=job.port).exists():
        if ProvisioningJob.objects.filter(pk=job.pk, status=JobStatus.HOST_KEY).update(status=JobStatus.QUEUED):
            _enqueue(job.pk, fetch=False)
        return
    try:
        key = ssh.fetch_host_key(host=job.host, port=job.port)
    except ssh.SshError as exc:
        ProvisioningJob.objects.filter(pk=job.pk, status=JobStatus.HOST_KEY).update(
            status=JobStatus.FAILED, error=str(exc), finished_at=timezone.now()
        )
        return
    ProvisioningJob.objects.filter(pk=job.pk, status=JobStatus.HOST_KEY).update(
        offered_key_type=key.get_name(), offered_key_base64=key.get_base64(), offered_fingerprint=fingerprint(key)
    )


def host_key_confirm(*, job: ProvisioningJob, fingerprint_shown: str, by: User | None) -> None:
    """Pin the key the operator saw (the form carries its fingerprint, so a key that changed after the page was
    rendered is not confirmed) and queue the job."""
    with transaction.atomic():
        job = ProvisioningJob.objects.select_for_update().get(pk=job.pk)
        if job.status != JobStatus.HOST_KEY or not job.offered_fingerprint:
            raise ProvisioningError("this job is not waiting for a host key confirmation")
        if fingerprint_shown != job.offered_fingerprint:
            raise ProvisioningError("the fingerprint confirmed is not the one the server offered; reload the page")
        key = paramiko.PKey.from_type_string(job.offered_key_type, base64.b64decode(job.offered_key_base64))
        known_host_pin(host=job.host, port=job.port, key=key, source=KnownHost.Source.CONFIRMED, by=by)
        job.status = JobStatus.QUEUED
        job.save(update_fields=["status"])
        _enqueue(job.pk, fetch=False)


def host_key_reject(*, job: ProvisioningJob, by: User | None) -> None:
    with transaction.atomic():
        updated = ProvisioningJob.objects.filter(pk=job.pk, status=JobStatus.HOST_KEY).update(
            status=JobStatus.CANCELLED, finished_at=timezone.now(),
            error=f"host key {job.offered_fingerprint or '(not fetched)'} rejected by {by or 'an operator'}",
        )
        if not updated:
            raise ProvisioningError("this job is not waiting for a host key confirmation")
        audit_record(actor=by, action="provisioning.host_key_reject", target=job,
                     after={"fingerprint": job.offered_fingerprint})


def job_cancel(*, job: ProvisioningJob, by: User | None) -> None:
    """Stop a job. A running job stops at its next step boundary (a command already running on the node
    finishes); an unused enrollment token is expired at once."""
    now = timezone.now()
    with transaction.atomic():
        updated = ProvisioningJob.objects.filter(pk=job.pk, status__in=ACTIVE_STATUSES).update(
            status=JobStatus.CANCELLED, finished_at=now, error=f"cancelled by {by or 'an operator'}"
        )
        if not updated:
            raise ProvisioningError("only a job that is waiting or running can be cancelled")
        job.refresh_from_db()
        unused_token_expire(job)
        ProvisioningStep.objects.filter(job=job, attempt=job.attempt, status=StepStatus.PENDING).update(
            status=StepStatus.CANCELLED
        )
        audit_record(actor=by, action="provisioning.job_cancel", target=job)


def job_retry(*, job: ProvisioningJob, by: User | None) -> None:
    """Run a failed or cancelled job again (completed steps are skipped); a job whose worker died (no heartbeat for
    STALE_AFTER) can be retried too."""
    now = timezone.now()
    with transaction.atomic():
        job = ProvisioningJob.objects.select_for_update().get(pk=job.pk)
        stale = job.status == JobStatus.RUNNING and (job.heartbeat_at or job.created_at) < now - STALE_AFTER
        if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED) and not stale:
            raise ProvisioningError("only a failed or cancelled job can be retried")
        if stale:
            ProvisioningStep.objects.filter(job=job, attempt=job.attempt, status=StepStatus.RUNNING).update(
                status=StepStatus.FAILED, finished_at=now, output="the worker running this step stopped responding"
            )
        pinned = KnownHost.objects.filter(host=job.host, port=job.port).exists() or job.skip_ssh
        job.status = JobStatus.QUEUED if pinned else JobStatus.HOST_KEY
        job.error = ""
        job.finished_at = None
        job.offered_key_type = job.offered_key_base64 = job.offered_fingerprint = ""
        job.save()
        audit_record(actor=by, action="provisioning.job_retry", target=job)
        _enqueue(job.pk, fetch=not pinned)


def decommission_create(*, node: Node, skip_ssh: bool, by: User | None) -> ProvisioningJob:
    """Stop and remove the node's agent over SSH (with the connection of its last successful install), revoke its
    credential, release its allocations and mark it decommissioned. Without such an install, or with skip_ssh, only
    the portal side is done."""
    if node.status == NodeStatus.DECOMMISSIONED:
        raise ProvisioningError(f"{node.hostname} is already decommissioned")
    if ProvisioningJob.objects.filter(node=node, status__in=ACTIVE_STATUSES).exists():
        raise ProvisioningError(f"a provisioning job for {node.hostname} is still active; cancel it first")
    install = last_install(node=node)
    with _one_active_job(), transaction.atomic():
        job = ProvisioningJob.objects.create(
            kind=JobKind.DECOMMISSION, status=JobStatus.QUEUED, site=node.site, node=node, node_name=node.hostname,
            host=install.host if install else "", port=install.port if install else 22,
            username=install.username if install else "", credential=install.credential if install else None,
            install_dir=install.install_dir if install else "", init_system=install.init_system if install else "",
            portal_url=install.portal_url if install else "", skip_ssh=skip_ssh or install is None,
            created_by=by, created_at=timezone.now(),
        )
        audit_record(actor=by, action="provisioning.decommission", target=node,
                     after={"job": job.pk, "skip_ssh": job.skip_ssh})
        _enqueue(job.pk, fetch=False)
    return job


def burn_in_create(*, node: Node, by: User | None) -> ProvisioningJob:
    """Queue the node's acceptance test over the connection of its last successful install: inventory against
    the plan, memory health, diagnostics, a soak without health events. Passing makes the node sellable and ends
    its cordons; failing keeps it (or puts it) out of placement."""
    if node.lifecycle in (NodeLifecycle.PLANNED, NodeLifecycle.RETIRED):
        raise ProvisioningError(f"{node.hostname} is {node.get_lifecycle_display().lower()}: nothing to test")
    if ProvisioningJob.objects.filter(node=node, status__in=ACTIVE_STATUSES).exists():
        raise ProvisioningError(f"a provisioning job for {node.hostname} is still active; wait for it to end")
    install = last_install(node=node)
    if install is None:
        raise ProvisioningError(f"{node.hostname} was not installed from the portal, so it cannot be reached over "
                                "SSH: provision it here first, or end its cordon by an audited override")
    with _one_active_job(), transaction.atomic():
        job = ProvisioningJob.objects.create(
            kind=JobKind.BURN_IN, status=JobStatus.QUEUED, site=node.site, node=node, node_name=node.hostname,
            host=install.host, port=install.port, username=install.username, credential=install.credential,
            install_dir=install.install_dir, init_system=install.init_system, portal_url=install.portal_url,
            simulate_gpus=install.simulate_gpus, created_by=by, created_at=timezone.now(),
        )
        audit_record(actor=by, action="provisioning.burn_in", target=node, after={"job": job.pk})
        _enqueue(job.pk, fetch=False)
    return job


def last_install(*, node: Node) -> ProvisioningJob | None:
    return (ProvisioningJob.objects.filter(node=node, kind=JobKind.INSTALL, status=JobStatus.DONE)
            .select_related("credential").order_by("-finished_at", "-pk").first())
