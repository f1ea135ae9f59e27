"""Provisioning: SSH credentials, pinned host keys, and the jobs that install (or remove) the agent on a node.

A job is an ordered list of steps. Each run of a job is an attempt with its own step rows; a retry skips the steps
an earlier attempt completed. Status changes are conditional updates, so a cancel is never overwritten by a runner
finishing, and a task delivered twice runs the job once.
"""

import base64
import hashlib
import json
import logging
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import paramiko
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from portal.accounts.models import User
from portal.audit.services import audit_record
from portal.capacity.services import allocations_release_node
from portal.fleet.models import Node, NodeStatus, Site
from portal.fleet.services import (
    credential_revoke,
    enrollment_token_create,
    enrollment_token_revoke,
    node_mark_status,
)
from portal.provisioning import crypto, ssh
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
    QUERY_GPU_FIELDS,
    HostSpec,
    fingerprint,
    known_hosts_lookup,
    parse_df_available_mib,
    parse_os_release,
    parse_python_version,
    parse_query_gpu_csv,
)
from portal.provisioning.wheels import WheelSet, ensure_wheels
from portal.standards.selectors import current_baseline
from portal.standards.versions import compare

log = logging.getLogger(__name__)

MIN_FREE_MIB = 256
MIN_PYTHON = (3, 11)  # the agent reads its TOML with tomllib
CLOCK_WARN_S = 5.0
CLOCK_FAIL_S = 300.0  # the portal refuses batches stamped more than 5 minutes in the future
ENROLL_TOKEN_TTL = timedelta(hours=1)
FIRST_BATCH_TIMEOUT_S = 120.0
FIRST_BATCH_POLL_S = 1.0
STALE_AFTER = timedelta(minutes=15)
SYSTEMD_STATE_DIR = "/var/lib/tokenmill-agent"
UNIT_PATH = "/etc/systemd/system/tokenmill-agent.service"
# systemd's ProtectHome= and PrivateTmp= hide these from the hardened unit.
HIDDEN_FROM_UNIT = ("/home/", "/root/", "/tmp/", "/var/tmp/", "/run/user/")  # noqa: S108 -- paths refused, not used

INSTALL_STEPS = [
    ("connect", "Connect (pinned host key)"),
    ("preflight", "Preflight checks"),
    ("upload", "Upload agent wheels (SFTP)"),
    ("install", "Install into a virtualenv (offline)"),
    ("configure", "Write the agent configuration"),
    ("enroll", "Enroll with a one-time token"),
    ("start", "Start the agent"),
    ("first_batch", "Wait for the first batch"),
]
DECOMMISSION_STEPS = [
    ("connect", "Connect (pinned host key)"),
    ("stop", "Stop and remove the agent"),
    ("revoke", "Revoke the node's credential"),
    ("release", "Release allocations"),
    ("mark", "Mark the node decommissioned"),
]
SSH_STEPS = {"preflight", "upload", "install", "configure", "enroll", "start", "stop"}


class ProvisioningError(Exception):
    """An operator action that cannot be done now; the message is safe to show."""


class StepFailed(Exception):
    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


class Cancelled(Exception):
    pass


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


def credential_pkey(credential: SshCredential) -> paramiko.PKey:
    if credential.key_path:
        return ssh.load_pkey_file(credential.key_path)
    return ssh.load_pkey(crypto.decrypt(credential.private_key_encrypted))


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
        _expire_unused_token(job)
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


def _expire_unused_token(job: ProvisioningJob) -> None:
    if job.enrollment_token_id:
        enrollment_token_revoke(token_id=job.enrollment_token_id)


# ---------------------------------------------------------------------------------------------------------------
# Running a job


@dataclass
class Outcome:
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def ok(self, line: str) -> None:
        self.lines.append(line)

    def warn(self, line: str) -> None:
        self.warnings.append(line)
        self.lines.append(f"warning: {line}")

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class Runner:
    """The state of one attempt: the job, the SSH connection (opened by the connect step), the wheels."""

    def __init__(self, job: ProvisioningJob) -> None:
        self.job = job
        self.conn: ssh.Connection | None = None
        self._wheels: WheelSet | None = None

    @property
    def remote(self) -> ssh.Connection:
        if self.conn is None:
            raise StepFailed("no SSH connection (the connect step did not run)")
        return self.conn

    @property
    def dir(self) -> str:
        return self.job.install_dir.rstrip("/")

    @property
    def q_dir(self) -> str:
        return shlex.quote(self.dir)

    @property
    def state_dir(self) -> str:
        return SYSTEMD_STATE_DIR if self.job.init_system == "systemd" else f"{self.dir}/state"

    def run(self, command: str, what: str, *, timeout: float = ssh.COMMAND_TIMEOUT_S) -> ssh.Result:
        result = self.remote.run(command, timeout=timeout)
        if not result.ok:
            raise StepFailed(f"{what} failed (exit status {result.exit_status})", result.text())
        return result

    def put_file(self, remote: str, data: bytes, *, mode: int) -> None:
        """Write a file on the node; through a private staging file and `install` when not logged in as root."""
        if self.remote.username == "root":
            self.remote.write(remote, data, mode=mode)
            return
        staging = self.remote.run("mktemp /tmp/tokenmill.XXXXXXXX", privileged=False).stdout.strip()
        self.remote.write(staging, data, mode=0o600)
        self.run(f"install -m {mode:o} {shlex.quote(staging)} {shlex.quote(remote)}", f"installing {remote}")
        self.remote.run(f"rm -f {shlex.quote(staging)}", privileged=False)

    def wheels(self) -> WheelSet:
        if self._wheels is None:
            self._wheels = ensure_wheels()
        return self._wheels

    def heartbeat(self) -> None:
        ProvisioningJob.objects.filter(pk=self.job.pk).update(heartbeat_at=timezone.now())

    def check_cancelled(self) -> None:
        if ProvisioningJob.objects.filter(pk=self.job.pk, status=JobStatus.CANCELLED).exists():
            raise Cancelled

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


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
        _expire_unused_token(job)
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
            _expire_unused_token(job)
            return
        except (StepFailed, ssh.SshError, ssh.KeyFormatError, crypto.DecryptionError) as exc:
            detail = getattr(exc, "output", "")
            _step_end(step, StepStatus.FAILED, "\n".join(filter(None, [detail, f"error: {exc}"])))
            _expire_unused_token(job)
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


# ---------------------------------------------------------------------------------------------------------------
# Steps


def step_connect(r: Runner) -> Outcome:
    job = r.job
    known = KnownHost.objects.filter(host=job.host, port=job.port).first()
    if known is None:
        raise StepFailed(f"no host key is pinned for {job.host}:{job.port}: confirm its fingerprint first")
    if job.credential is None:
        raise StepFailed("the job has no SSH credential")
    r.conn = ssh.connect(host=job.host, port=job.port, username=job.username, pkey=credential_pkey(job.credential),
                         key_type=known.key_type, key_base64=known.key_base64, pinned_fingerprint=known.fingerprint)
    out = Outcome()
    out.ok(f"connected to {job.target} with key {job.credential.fingerprint} ({job.credential.name})")
    out.ok(f"host key {known.fingerprint} ({known.key_type}) matches the key pinned on "
           f"{known.added_at:%Y-%m-%d %H:%M} UTC ({known.get_source_display().lower()})")
    if job.username != "root":
        check = r.remote.run("sudo -n true", privileged=False)
        if not check.ok:
            raise StepFailed(f"{job.username} cannot run sudo without a password (needed to install as root)",
                             check.text())
        out.ok(f"{job.username} may use sudo without a password")
    return out


def step_preflight(r: Runner) -> Outcome:
    job, out = r.job, Outcome()
    facts: dict = {}
    uname = r.run("uname -sr", "uname").stdout.strip()
    if not uname.startswith("Linux"):
        raise StepFailed(f"the agent runs on Linux only, not {uname}")
    release = r.remote.run("cat /etc/os-release")
    facts["os"] = parse_os_release(release.stdout) if release.ok else "unknown"
    facts["kernel"] = uname
    out.ok(f"OS: {facts['os']} ({uname})")

    python = r.remote.run("python3 --version 2>&1")
    version = parse_python_version(python.stdout)
    if version is None:
        raise StepFailed("python3 is not installed (the agent needs Python 3.11 or newer)", python.text())
    facts["python"] = ".".join(map(str, version))
    if version[:2] < MIN_PYTHON:
        raise StepFailed(f"python3 is {facts['python']}; the agent needs 3.11 or newer")
    venv = r.remote.run("python3 -c 'import venv'")
    if not venv.ok:
        raise StepFailed("python3 has no venv module (install python3-venv)", venv.text())
    out.ok(f"Python {facts['python']} with venv")

    smi = r.remote.run(f"nvidia-smi --query-gpu={','.join(QUERY_GPU_FIELDS)} --format=csv", timeout=60)
    gpus = []
    if smi.ok:
        try:
            gpus = parse_query_gpu_csv(smi.stdout)
        except ValueError as exc:
            raise StepFailed(f"cannot read nvidia-smi's output: {exc}", smi.text()) from None
    elif job.simulate_gpus:
        out.warn(f"nvidia-smi is not usable ({smi.text().splitlines()[-1] if smi.text() else 'no output'}); "
                 f"the agent will simulate {job.simulate_gpus} GPU(s)")
    else:
        raise StepFailed("nvidia-smi is missing or failing: install the NVIDIA driver first (or simulate GPUs)",
                         smi.text())
    facts["gpus"] = [g.as_dict() for g in gpus]
    if gpus:
        driver = gpus[0].driver_version
        facts["driver_version"] = driver
        out.ok(f"NVIDIA driver {driver}, {len(gpus)} GPU(s):")
        for g in gpus:
            mig = {True: "enabled", False: "disabled", None: "not supported"}[g.mig_current]
            memory = f"{g.memory_total_mib} MiB" if g.memory_total_mib is not None else "memory unknown"
            out.ok(f"  GPU {g.index}: {g.name}, {memory}, {g.pci_bus_id}, MIG {mig}")
            if g.mig_pending is not None and g.mig_pending != g.mig_current:
                out.warn(f"GPU {g.index}: a MIG mode change is pending (takes effect after a GPU reset)")
        _compare_driver(driver, out, facts)

    df = r.run(f"d={r.q_dir}; while [ ! -d \"$d\" ]; do d=$(dirname \"$d\"); done; df -Pk \"$d\"", "df")
    try:
        free = parse_df_available_mib(df.stdout)
    except ValueError as exc:
        raise StepFailed(f"cannot read df's output: {exc}", df.text()) from None
    facts["free_mib"] = free
    if free < MIN_FREE_MIB:
        raise StepFailed(f"only {free} MiB free for {r.dir}; the agent needs at least {MIN_FREE_MIB} MiB", df.text())
    out.ok(f"disk: {free} MiB free for {r.dir}")

    before = time.time()
    remote = r.run("date +%s", "date").stdout.strip()
    after = time.time()
    if not remote.isdigit():
        raise StepFailed(f"date +%s printed {remote!r}")
    skew = int(remote) - (before + after) / 2
    facts["clock_skew_s"] = round(skew, 1)
    if abs(skew) > CLOCK_FAIL_S:
        raise StepFailed(f"the node's clock is {skew:+.0f} s off the portal's: fix time sync (chrony/NTP) first; "
                         "the portal refuses batches from the future and mis-times the others")
    if abs(skew) > CLOCK_WARN_S:
        out.warn(f"the node's clock is {skew:+.1f} s off the portal's (is NTP running?)")
    else:
        out.ok(f"clock: within {CLOCK_WARN_S:.0f} s of the portal ({skew:+.1f} s)")

    init = r.remote.run("[ -d /run/systemd/system ] && command -v systemctl >/dev/null && echo systemd || echo none")
    job.init_system = "systemd" if init.stdout.strip() == "systemd" else "none"
    if job.init_system == "systemd":
        if r.dir.startswith(HIDDEN_FROM_UNIT):
            raise StepFailed(f"{r.dir} is hidden from the hardened systemd unit (ProtectHome/PrivateTmp): "
                             "choose an install dir such as /opt/tokenmill-agent")
        out.ok("init: systemd (the agent runs as a hardened unit)")
    else:
        out.warn("no systemd on this host: the agent will run as a detached process (setsid) with a pid file, "
                 "and will not be restarted after a crash or reboot")
    facts["init_system"] = job.init_system
    job.facts = facts
    job.save(update_fields=["facts", "init_system"])
    return out


def _compare_driver(driver: str, out: Outcome, facts: dict) -> None:
    baseline = current_baseline()
    if baseline is None or not baseline.driver_version:
        out.ok("no fleet baseline for the driver: version recorded only")
        return
    facts["baseline_driver"] = baseline.driver_version
    try:
        order = compare(driver, baseline.driver_version)
    except ValueError:
        out.warn(f"driver version {driver!r} cannot be compared with the baseline {baseline.driver_version}")
        return
    if order == 0:
        out.ok(f"driver matches the fleet baseline {baseline.driver_version}")
    else:
        side = "behind" if order < 0 else "ahead of"
        out.warn(f"driver {driver} is {side} the fleet baseline {baseline.driver_version}")


def step_upload(r: Runner) -> Outcome:
    wheels = r.wheels()
    out = Outcome()
    staging = r.remote.run("mktemp -d /tmp/tokenmill-upload.XXXXXXXX", privileged=False)
    if not staging.ok:
        raise StepFailed("cannot create an upload directory in /tmp", staging.text())
    stage = staging.stdout.strip()
    try:
        for wheel in wheels.all:
            r.remote.put(wheel, f"{stage}/{wheel.name}")
            out.ok(f"uploaded {wheel.name} ({wheel.stat().st_size // 1024} KiB)")
        sums = r.run(f"cd {shlex.quote(stage)} && sha256sum *.whl", "sha256sum").stdout
        remote = {line.split()[1].lstrip("*"): line.split()[0] for line in sums.splitlines() if line.strip()}
        for wheel in wheels.all:
            if remote.get(wheel.name) != _sha256(wheel):
                raise StepFailed(f"{wheel.name} arrived corrupted (SHA-256 differs)")
        out.ok("SHA-256 of every wheel verified on the node")
        r.run(f"rm -rf {r.q_dir}/wheels && install -d -m 0755 {r.q_dir} {r.q_dir}/wheels && "
              f"install -m 0644 {shlex.quote(stage)}/*.whl {r.q_dir}/wheels/", "installing the wheels")
        out.ok(f"wheels in {r.dir}/wheels")
    finally:
        r.remote.run(f"rm -rf {shlex.quote(stage)}", privileged=False)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def step_install(r: Runner) -> Outcome:
    wheels, out, venv = r.wheels(), Outcome(), f"{r.q_dir}/venv"
    result = r.run(f"python3 -m venv --clear --without-pip {venv}", "creating the virtualenv")
    out.ok(f"virtualenv {r.dir}/venv created" + (f"\n{result.text()}" if result.text() else ""))
    version = wheels.agent.name.split("-")[1]
    pip = f"{r.q_dir}/wheels/{shlex.quote(wheels.pip.name)}/pip"
    result = r.run(f"{venv}/bin/python {pip} install --disable-pip-version-check --no-input --no-cache-dir "
                   f"--no-index --find-links {r.q_dir}/wheels 'tokenmill-agent=={version}'",
                   "pip install (offline)", timeout=600)
    out.ok(result.text())
    check = r.run(f"{venv}/bin/tokenmill-agent --version", "running the installed agent")
    out.ok(f"installed: {check.text()}")
    return out


def agent_toml(*, portal_url: str, state_dir: str, hostname: str, simulate_gpus: int) -> str:
    # JSON strings are valid TOML basic strings (same escapes), so values cannot break out of their quotes.
    lines = [
        "# Written by Tokenmill provisioning. See agent.example.toml in the agent package for every key.",
        f"portal_url = {json.dumps(portal_url)}",
        f"state_dir = {json.dumps(state_dir)}",
        f"hostname = {json.dumps(hostname)}",
    ]
    if simulate_gpus:
        lines += ["", "[simulate]", f"gpus = {int(simulate_gpus)}"]
    return "\n".join(lines) + "\n"


def step_configure(r: Runner) -> Outcome:
    job = r.job
    text = agent_toml(portal_url=job.portal_url, state_dir=r.state_dir, hostname=job.node_name,
                      simulate_gpus=job.simulate_gpus)
    r.put_file(f"{r.dir}/agent.toml", text.encode(), mode=0o644)
    check = r.run(f"{r.q_dir}/venv/bin/tokenmill-agent --config {r.q_dir}/agent.toml status", "agent status")
    out = Outcome()
    out.ok(f"{r.dir}/agent.toml:\n{text}")
    out.ok(check.text())
    return out


def step_enroll(r: Runner) -> Outcome:
    job = r.job
    token, value = enrollment_token_create(site=job.site, created_by=job.created_by, ttl=ENROLL_TOKEN_TTL,
                                           note=f"provisioning job {job.pk} ({job.node_name})")
    job.enrollment_token = token
    job.save(update_fields=["enrollment_token"])
    # The token is on the command line of a short-lived process only; it is one-time and expires within the hour.
    result = r.remote.run(f"{r.q_dir}/venv/bin/tokenmill-agent --config {r.q_dir}/agent.toml enroll "
                       f"--token {shlex.quote(value)}", timeout=60)
    token.refresh_from_db()
    if not result.ok or token.node_id is None:
        _expire_unused_token(job)
        raise StepFailed(f"enrollment failed (exit status {result.exit_status}): can the node reach "
                         f"{job.portal_url}?", result.text())
    job.node_id = token.node_id
    job.save(update_fields=["node"])
    out = Outcome()
    out.ok(result.text())
    out.ok(f"node {job.node_name} (id {token.node_id}) enrolled at site {job.site.name}; "
           f"token tme_{token.prefix}_… used")
    return out


def unit_text(*, install_dir: str) -> str:
    """The packaged hardened unit, pointed at the provisioned virtualenv and config."""
    packaged = (settings.BASE_DIR / "agents" / "systemd" / "tokenmill-agent.service").read_text()
    exec_start = f"ExecStart={install_dir}/venv/bin/tokenmill-agent run --config {install_dir}/agent.toml"
    lines = [exec_start if line.startswith("ExecStart=") else line for line in packaged.splitlines()]
    return "\n".join(lines) + "\n"


def step_start(r: Runner) -> Outcome:
    out = Outcome()
    if r.job.init_system == "systemd":
        r.put_file(UNIT_PATH, unit_text(install_dir=r.dir).encode(), mode=0o644)
        r.run("systemctl daemon-reload && systemctl enable tokenmill-agent.service && "
              "systemctl restart tokenmill-agent.service", "starting the unit")
        time.sleep(2)
        status = r.remote.run("systemctl is-active tokenmill-agent.service")
        if status.stdout.strip() != "active":
            logs = r.remote.run("journalctl -u tokenmill-agent.service -n 30 --no-pager")
            raise StepFailed("the unit is not active", logs.text())
        out.ok(f"{UNIT_PATH} installed, enabled and active")
        return out
    pid, logf = f"{r.q_dir}/agent.pid", f"{r.q_dir}/agent.log"
    r.run(_stop_detached(pid), "stopping a previous agent")
    # One simple command in the background (not a list), so $! is the agent itself (setsid and nohup exec it) and
    # no shell keeps the SSH channel's output open.
    r.run(f"setsid nohup {r.q_dir}/venv/bin/tokenmill-agent --config {r.q_dir}/agent.toml run "
          f">> {logf} 2>&1 < /dev/null & echo $! > {pid}", "starting the agent")
    time.sleep(1.5)
    alive = r.remote.run(f"kill -0 \"$(cat {pid})\"")
    if not alive.ok:
        logs = r.remote.run(f"tail -n 30 {logf}")
        raise StepFailed("the agent exited right after starting", logs.text())
    out.ok(f"agent running detached (pid {r.remote.run(f'cat {pid}').stdout.strip()}), log {r.dir}/agent.log")
    out.warn("no systemd: the agent is not restarted after a crash or reboot (see docs/provisioning.md)")
    return out


def _stop_detached(pid: str) -> str:
    """Shell that stops the process in a pid file (TERM, then KILL after 10 s) and removes the file."""
    return (f"if [ -f {pid} ]; then p=$(cat {pid}); if kill -0 \"$p\" 2>/dev/null; then kill -TERM \"$p\"; "
            "i=0; while kill -0 \"$p\" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; "
            f"kill -KILL \"$p\" 2>/dev/null; fi; rm -f {pid}; fi; true")


def step_first_batch(r: Runner) -> Outcome:
    from portal.telemetry.models import IngestedBatch

    job = r.job
    if job.node_id is None:
        raise StepFailed("the node did not enroll")
    started = time.monotonic()
    while True:
        batch = IngestedBatch.objects.filter(node_id=job.node_id).order_by("received_at").first()
        if batch is not None:
            out = Outcome()
            out.ok(f"first batch (seq {batch.seq}, {batch.gpu_count} GPU(s)) received "
                   f"{batch.received_at:%Y-%m-%d %H:%M:%S} UTC, {time.monotonic() - started:.1f} s after the start")
            return out
        if time.monotonic() - started > FIRST_BATCH_TIMEOUT_S:
            where = "journalctl -u tokenmill-agent" if job.init_system == "systemd" else f"{r.dir}/agent.log"
            tail = ""
            if r.conn is not None:
                cmd = ("journalctl -u tokenmill-agent -n 30 --no-pager" if job.init_system == "systemd"
                       else f"tail -n 30 {r.q_dir}/agent.log")
                tail = r.remote.run(cmd).text()
            raise StepFailed(f"no batch from {job.node_name} within {FIRST_BATCH_TIMEOUT_S:.0f} s: see {where} and "
                             f"check that the node reaches {job.portal_url}", tail)
        r.check_cancelled()
        r.heartbeat()
        time.sleep(FIRST_BATCH_POLL_S)


def step_stop(r: Runner) -> Outcome:
    out = Outcome()
    if r.job.init_system == "systemd":
        r.run(f"systemctl disable --now tokenmill-agent.service 2>/dev/null; rm -f {UNIT_PATH}; "
              f"systemctl daemon-reload; rm -rf {SYSTEMD_STATE_DIR} /var/lib/private/tokenmill-agent",
              "removing the unit")
        out.ok(f"unit stopped, disabled and removed; {SYSTEMD_STATE_DIR} removed")
    else:
        r.run(_stop_detached(f"{r.q_dir}/agent.pid"), "stopping the agent")
        out.ok("detached agent stopped")
    r.run(f"rm -rf {r.q_dir}", f"removing {r.dir}")
    out.ok(f"{r.dir} removed (agent, virtualenv, wheels, configuration, credential)")
    return out


def step_revoke(r: Runner) -> Outcome:
    count = credential_revoke(node=r.job.node)
    out = Outcome()
    out.ok(f"{count} credential(s) revoked: the node's agent can no longer send")
    return out


def step_release(r: Runner) -> Outcome:
    count = allocations_release_node(node=r.job.node, at=timezone.now())
    out = Outcome()
    out.ok(f"{count} allocation(s) ended")
    return out


def step_mark(r: Runner) -> Outcome:
    job = r.job
    who = job.created_by.get_username() if job.created_by else "an operator"
    node_mark_status(node=job.node, status=NodeStatus.DECOMMISSIONED, at=timezone.now(),
                     reason=f"decommissioned by {who} (provisioning job {job.pk})")
    out = Outcome()
    out.ok(f"{job.node.hostname} is decommissioned")
    return out


STEP_FUNCTIONS: dict[str, Callable[[Runner], Outcome]] = {
    "connect": step_connect,
    "preflight": step_preflight,
    "upload": step_upload,
    "install": step_install,
    "configure": step_configure,
    "enroll": step_enroll,
    "start": step_start,
    "first_batch": step_first_batch,
    "stop": step_stop,
    "revoke": step_revoke,
    "release": step_release,
    "mark": step_mark,
}
