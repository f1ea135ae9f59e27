"""Provisioning: SSH credentials, pinned host keys, and the jobs that install (or remove) the agent on a node.

A job is an ordered list of steps. Each run of a job is an attempt with its own step rows; a retry skips the steps
an earlier attempt completed. Status changes are conditional updates, so a cancel is never overwritten by a runner
finishing, and a task delivered twice runs the job once.
"""

import base64
import logging
from datetime import timedelta

import paramiko
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from portal.accounts.models import User
from portal.audit.services import audit_record
from portal.fleet.models import Node, NodeStatus, Site
from portal.provisioning import crypto, ssh
from portal.provisioning.attempt import Cancelled, Runner, StepFailed
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
from portal.provisioning.parsing import (
    HostSpec,
    fingerprint,
    known_hosts_lookup,
)
from portal.provisioning.steps import (
    DECOMMISSION_STEPS,
    INSTALL_STEPS,
    SSH_STEPS,
    STEP_FUNCTIONS,
    unused_token_expire,
)

log = logging.getLogger(__name__)

STALE_AFTER = timedelta(minutes=15)


class ProvisioningError(Exception):
    """An operator action that cannot be done now; the message is safe to show."""


# ---------------------------------------------------------------------------------------------------------------
# Credentials and host keys


def credential_create_upload(*, name: str, key_data: bytes, passphrase: str = "", by: User | None) -> SshCredential:
    """Store an uploaded private key encrypted (unencrypted OpenSSH format inside the Fernet token, so jobs need no
    passphrase). ssh.KeyFormatError when it is not a usable key."""
    key = ssh.normalize_private_key(key_data, passphrase=passphrase)
    with transaction.atomic():
        credential = SshCredential.objects.create(
            name=name, private_key_encrypted=crypto.encrypt(key.private_openssh), public_key=key.public_line,
            fingerprint=key.fingerprint, created_by=by,
        )
        audit_record(actor=by, action="provisioning.credential_upload", target=credential,
                     after={"fingerprint": key.fingerprint})
    return credential


def credential_create_path(*, name: str, path: str, by: User | None) -> SshCredential:
    """Refer to a key file on the portal host (read at each connection; it must be unencrypted)."""
    pkey = ssh.load_pkey_file(path)
    with transaction.atomic():
        credential = SshCredential.objects.create(
            name=name, key_path=path, public_key=f"{pkey.get_name()} {pkey.get_base64()} tokenmill-portal",
            fingerprint=fingerprint(pkey), created_by=by,
        )
        audit_record(actor=by, action="provisioning.credential_path", target=credential, after={"path": path})
    return credential


def known_host_pin(*, host: str, port: int, key: paramiko.PKey, source: str, by: User | None) -> KnownHost:
    """Pin `key` for host:port. ProvisioningError if another key is already pinned there."""
    existing = KnownHost.objects.filter(host=host, port=port).first()
    if existing is not None:
        if existing.key_base64 == key.get_base64() and existing.key_type == key.get_name():
            return existing
        raise ProvisioningError(
            f"{host}:{port} already has the pinned key {existing.fingerprint}; remove it first if the node's key "
            "really changed"
        )
    known = KnownHost.objects.create(
        host=host, port=port, key_type=key.get_name(), key_base64=key.get_base64(), fingerprint=fingerprint(key),
        source=source, added_by=by, added_at=timezone.now(),
    )
    audit_record(actor=by, action="provisioning.host_key_pin", target=known,
                 after={"fingerprint": known.fingerprint, "source": source})
    return known


def known_host_remove(*, known_host: KnownHost, by: User | None) -> None:
    with transaction.atomic():
        audit_record(actor=by, action="provisioning.host_key_remove", target=known_host,
                     before={"fingerprint": known_host.fingerprint})
        known_host.delete()


# ---------------------------------------------------------------------------------------------------------------
# Jobs: creation and operator actions


def _enqueue(job_id: int, *, fetch: bool) -> None:
    from portal.provisioning import tasks

    task = tasks.fetch_host_key if fetch else tasks.run_job
    transaction.on_commit(lambda: task.delay(job_id))


def jobs_create(
    *, site: Site, hosts: list[HostSpec], credential: SshCredential, install_dir: str, simulate_gpus: int,
    portal_url: str, known_hosts: str = "", by: User | None,
) -> list[ProvisioningJob]:
    """One install job per host. Hosts whose key is pinned (or listed in `known_hosts`) are queued at once; the
    others first fetch the host key for an operator to confirm. All or nothing."""
    busy = [f"{h.host}:{h.port}" for h in hosts
            if ProvisioningJob.objects.filter(host=h.host, port=h.port, status__in=ACTIVE_STATUSES).exists()]
    if busy:
        raise ProvisioningError(f"a job is already active for {', '.join(busy)}")
    jobs = []
    now = timezone.now()
    with transaction.atomic():
        for spec in hosts:
            if known_hosts:
                for key in known_hosts_lookup(known_hosts, host=spec.host, port=spec.port)[:1]:
                    known_host_pin(host=spec.host, port=spec.port, key=key, source=KnownHost.Source.KNOWN_HOSTS,
                                   by=by)
            pinned = KnownHost.objects.filter(host=spec.host, port=spec.port).exists()
            job = ProvisioningJob.objects.create(
                kind=JobKind.INSTALL, status=JobStatus.QUEUED if pinned else JobStatus.HOST_KEY, site=site,
                host=spec.host, port=spec.port, username=spec.user, node_name=spec.name, credential=credential,
                install_dir=install_dir, simulate_gpus=simulate_gpus, portal_url=portal_url.rstrip("/"),
                created_by=by, created_at=now,
            )
            audit_record(actor=by, action="provisioning.job_create", target=job,
                         after={"site": site.slug, "node_name": spec.name, "install_dir": install_dir})
            _enqueue(job.pk, fetch=not pinned)
            jobs.append(job)
    return jobs


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
    with transaction.atomic():
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


def last_install(*, node: Node) -> ProvisioningJob | None:
    return (ProvisioningJob.objects.filter(node=node, kind=JobKind.INSTALL, status=JobStatus.DONE)
            .select_related("credential").order_by("-finished_at", "-pk").first())


# ---------------------------------------------------------------------------------------------------------------
# Running a job


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
        _run_steps(runner, _plan(job))
    except Exception as exc:
        # A bug must not leave the job "running" for ever: fail it visibly, with the step it was in.
        log.exception("provisioning job %s crashed", job_id)
        ProvisioningStep.objects.filter(job=job, attempt=job.attempt, status=StepStatus.RUNNING).update(
            status=StepStatus.FAILED, finished_at=timezone.now(), output=f"internal error: {exc}"
        )
        unused_token_expire(job)
        _finish(job, JobStatus.FAILED, f"internal error: {exc}")
    finally:
        runner.close()


def _plan(job: ProvisioningJob) -> list[ProvisioningStep]:
    """This attempt's steps: those an earlier attempt completed are marked skipped."""
    plan = INSTALL_STEPS if job.kind == JobKind.INSTALL else DECOMMISSION_STEPS
    done_before = set(
        ProvisioningStep.objects.filter(job=job, attempt__lt=job.attempt, status__in=COMPLETED_STEP_STATUSES)
        .exclude(key="connect").values_list("key", flat=True)
    )
    pending_ssh = [key for key, _ in plan if key in SSH_STEPS and key not in done_before]
    steps = []
    for position, (key, title) in enumerate(plan):
        status, output = StepStatus.PENDING, ""
        if key in done_before:
            status, output = StepStatus.SKIPPED, "completed in an earlier attempt"
        elif key == "connect" and job.skip_ssh:
            status, output = StepStatus.SKIPPED, "not connecting: the node is not reachable from the portal"
        elif key == "connect" and not pending_ssh:
            status, output = StepStatus.SKIPPED, "no step left that needs the node"
        elif key in SSH_STEPS and job.skip_ssh:
            status, output = StepStatus.SKIPPED, "skipped: not connecting to the node"
        steps.append(ProvisioningStep(job=job, attempt=job.attempt, position=position, key=key, title=title,
                                      status=status, output=output))
    return ProvisioningStep.objects.bulk_create(steps)


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
            outcome = STEP_FUNCTIONS[step.key](runner)
        except Cancelled:
            _step_end(step, StepStatus.CANCELLED, "cancelled while waiting")
            _cancel_rest(steps[index + 1:])
            unused_token_expire(job)
            return
        except (StepFailed, ssh.SshError, ssh.KeyFormatError, crypto.DecryptionError) as exc:
            detail = getattr(exc, "output", "")
            _step_end(step, StepStatus.FAILED, "\n".join(filter(None, [detail, f"error: {exc}"])))
            unused_token_expire(job)
            _finish(job, JobStatus.FAILED, f"{step.title}: {exc}")
            return
        _step_end(step, StepStatus.WARNING if outcome.warnings else StepStatus.DONE, outcome.text)
    _finish(job, JobStatus.DONE, "")


def _step_end(step: ProvisioningStep, status: str, output: str) -> None:
    step.status, step.output, step.finished_at = status, output[-60000:], timezone.now()
    step.save(update_fields=["status", "output", "finished_at"])


def _cancel_rest(steps: list[ProvisioningStep]) -> None:
    pending = [s.pk for s in steps if s.status == StepStatus.PENDING]
    ProvisioningStep.objects.filter(pk__in=pending).update(status=StepStatus.CANCELLED)


def _finish(job: ProvisioningJob, status: str, error: str) -> None:
    ProvisioningJob.objects.filter(pk=job.pk, status=JobStatus.RUNNING).update(
        status=status, error=error, finished_at=timezone.now()
    )
