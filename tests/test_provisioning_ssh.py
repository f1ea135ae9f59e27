"""Provisioning against a real OpenSSH server (tests/sshd.py): the agent is installed into a temporary directory,
runs detached (no systemd here) with simulated GPUs and sends its first batch to the live test portal."""

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
from django.db import transaction
from django.utils import timezone

from portal.celery import app as celery_app
from portal.fleet.models import EnrollmentToken, Node, NodeCredential, NodeLifecycle, NodeStatus
from portal.fleet.services import EnrollmentError, node_enroll
from portal.provisioning import services
from portal.provisioning.models import JobKind, JobStatus, KnownHost, ProvisioningJob, StepStatus
from portal.provisioning.parsing import HostSpec
from portal.telemetry.models import IngestedBatch
from tests.factories import OperatorFactory, SiteFactory
from tests.sshd import free_port, keygen, sshd  # noqa: F401 -- the sshd fixture
from tests.worker import celery_worker, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """Logins and user factories here are incidental; PBKDF2's deliberate slowness would dominate these tests."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _short_soak(settings):
    """The acceptance test's soak is half an hour in production; a few seconds exercise the same loop."""
    settings.ACCEPTANCE_SOAK_S = 2

FAIL_VENV = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  echo "Error: [Errno 28] No space left on device: 'venv'" >&2
  exit 1
fi
exec /usr/bin/python3 "$@"
"""
FULL_DISK_DF = """#!/bin/sh
echo "Filesystem     1024-blocks     Used Available Capacity Mounted on"
echo "/dev/nvme0n1p2   102687672 102585272    102400     100% /"
"""


@contextlib.contextmanager
def provisioning_tasks_to(queue: str):
    """Send the provisioning tasks to the test worker's own queue. Celery builds its router once per app (at the
    first task sent by any test), so it is rebuilt after the routes change, and again when they are restored."""
    def apply(routes):
        celery_app.conf.task_routes = routes
        celery_app.amqp.flush_routes()
        celery_app.amqp.router = celery_app.amqp.Router()

    configured = celery_app.conf.task_routes
    apply({**(configured or {}), "portal.provisioning.tasks.*": {"queue": queue}})
    try:
        yield
    finally:
        apply(configured)


def kill_agent(install_dir: Path) -> None:
    pid_file = install_dir / "agent.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)


@pytest.fixture
def install_dir(tmp_path):
    path = tmp_path / "opt" / "tokenmill-agent"
    yield path
    kill_agent(path)


@pytest.fixture
def operator():
    return OperatorFactory(username="olivia")


def credential_for(server, operator, name="test key"):
    return services.credential_create_upload(name=name, key_data=server.client_key.read_bytes(), by=operator)


def create_job(server, operator, install_dir, *, portal_url="http://127.0.0.1:9", confirm=True, name="sim-node-01",
               credential=None):
    credential = credential or credential_for(server, operator)
    [job] = services.jobs_create(
        site=SiteFactory(), hosts=[HostSpec(user="root", host=server.host, port=server.port, name=name)],
        credential=credential, install_dir=str(install_dir), simulate_gpus=2, portal_url=portal_url, by=operator,
    )
    job.refresh_from_db()
    if confirm:
        assert job.status == JobStatus.HOST_KEY
        services.host_key_confirm(job=job, fingerprint_shown=job.offered_fingerprint, by=operator)
        job.refresh_from_db()
    return job


def steps(job):
    return {s.key: s for s in job.steps.filter(attempt=job.attempt)}


def test_it_fails_a_step_retries_past_it_provisions_the_node_and_decommissions_it(
    sshd, operator, install_dir, live_server  # noqa: F811
):
    sshd.stub("python3", FAIL_VENV)
    [job] = services.jobs_create(
        site=SiteFactory(), hosts=[HostSpec(user="root", host=sshd.host, port=sshd.port, name="sim-node-01")],
        credential=credential_for(sshd, operator), install_dir=str(install_dir), simulate_gpus=2,
        portal_url=live_server.url, by=operator,
    )
    job.refresh_from_db()
    # First contact only fetched the host key: the operator sees the fingerprint ssh-keygen -l prints on the node.
    assert job.status == JobStatus.HOST_KEY
    assert job.offered_fingerprint == sshd.host_fingerprint
    assert job.steps.count() == 0

    services.host_key_confirm(job=job, fingerprint_shown=job.offered_fingerprint, by=operator)
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert job.error.startswith("Install into a virtualenv (offline): creating the virtualenv failed")
    by_key = steps(job)
    assert [by_key[k].status for k in ("connect", "preflight", "upload")] == [
        StepStatus.DONE, StepStatus.WARNING, StepStatus.DONE]
    assert by_key["install"].status == StepStatus.FAILED
    assert "No space left on device" in by_key["install"].output
    assert {by_key[k].status for k in ("configure", "enroll", "start", "first_batch")} == {StepStatus.PENDING}
    assert all(by_key[k].duration_s is not None for k in ("connect", "preflight", "upload", "install"))
    assert "GPU 0: NVIDIA H100 80GB HBM3, 81559 MiB, 00000000:00:09.0, MIG enabled" in by_key["preflight"].output
    assert job.facts["driver_version"] == "590.48.01"
    assert job.facts["init_system"] == "none"
    # The job drives its node from the start: provisioning, with no credential until it enrolls.
    assert Node.objects.get().lifecycle == NodeLifecycle.PROVISIONING
    assert NodeCredential.objects.count() == 0 and EnrollmentToken.objects.count() == 0

    (sshd.stub_dir / "python3").unlink()
    services.job_retry(job=job, by=operator)
    job.refresh_from_db()
    assert job.status == JobStatus.DONE, job.error
    assert job.attempt == 2
    by_key = steps(job)
    assert by_key["connect"].status == StepStatus.DONE
    assert by_key["preflight"].status == by_key["upload"].status == StepStatus.SKIPPED
    assert {by_key[k].status for k in ("install", "configure", "enroll", "first_batch")} == {StepStatus.DONE}
    assert by_key["start"].status == StepStatus.WARNING  # no systemd: detached process
    node = Node.objects.get()
    assert (node.hostname, node.simulated, node.site_id) == ("sim-node-01", True, job.site_id)
    assert job.node == node
    assert IngestedBatch.objects.filter(node=node).exists()
    token = EnrollmentToken.objects.get()
    assert token.node == node and token.used_at is not None
    assert (install_dir / "agent.toml").read_text().count('hostname = "sim-node-01"') == 1
    pid = int((install_dir / "agent.pid").read_text())
    os.kill(pid, 0)

    # The install ended in the acceptance test, run at once over the same connection details: it passed on the
    # captured nvidia-smi and the agent's self-test, so the node is sellable.
    burn_in = ProvisioningJob.objects.get(kind=JobKind.BURN_IN)
    assert burn_in.status == JobStatus.DONE, burn_in.error
    by_key = steps(burn_in)
    assert [by_key[k].status for k in ("connect", "inventory", "memory", "diagnostics", "soak", "accept")] == [
        StepStatus.DONE, StepStatus.WARNING, StepStatus.DONE, StepStatus.DONE, StepStatus.DONE, StepStatus.DONE]
    assert "1 GPU(s) found by nvidia-smi: 0: NVIDIA H100 80GB HBM3" in by_key["inventory"].output
    assert "GPU 0: uncorrected ECC 0, row remaps not reported" in by_key["memory"].output
    assert "DCGM is not installed: the agent's NVML self-test ran on simulated GPUs" in by_key["diagnostics"].output
    assert "2 s without a health event" in by_key["soak"].output
    node.refresh_from_db()
    assert node.lifecycle == NodeLifecycle.SELLABLE
    assert [c.lifecycle for c in node.lifecycle_changes.all()] == [
        NodeLifecycle.PROVISIONING, NodeLifecycle.BURN_IN, NodeLifecycle.SELLABLE]

    decommission = services.decommission_create(node=node, skip_ssh=False, by=operator)
    decommission.refresh_from_db()
    assert decommission.status == JobStatus.DONE, decommission.error
    assert [s.status for s in decommission.steps.order_by("position")] == [StepStatus.DONE] * 5
    node.refresh_from_db()
    assert node.status == NodeStatus.DECOMMISSIONED and node.lifecycle == NodeLifecycle.RETIRED
    assert not NodeCredential.objects.filter(node=node, revoked_at__isnull=True).exists()
    assert not install_dir.exists()
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)


def test_it_stops_on_a_changed_host_key(sshd, operator, install_dir, tmp_path):  # noqa: F811
    keygen(tmp_path / "other", "another host")
    other_type, other_b64 = (tmp_path / "other.pub").read_text().split()[:2]
    KnownHost.objects.create(host=sshd.host, port=sshd.port, key_type=other_type, key_base64=other_b64,
                             fingerprint="SHA256:pinned-before", source=KnownHost.Source.CONFIRMED,
                             added_at=timezone.now())
    job = create_job(sshd, operator, install_dir, confirm=False)
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert "the host key of 127.0.0.1" in job.error and "changed" in job.error
    assert sshd.host_fingerprint in job.error and "SHA256:pinned-before" in job.error
    assert steps(job)["connect"].status == StepStatus.FAILED
    assert KnownHost.objects.get().key_base64 == other_b64  # the pinned key is never replaced silently
    assert Node.objects.get().lifecycle == NodeLifecycle.PROVISIONING and EnrollmentToken.objects.count() == 0


def test_it_reports_a_key_the_node_does_not_authorize(sshd, operator, install_dir, tmp_path):  # noqa: F811
    keygen(tmp_path / "stranger", "not authorized")
    stranger = services.credential_create_upload(name="stranger", key_data=(tmp_path / "stranger").read_bytes(),
                                                  by=operator)
    job = create_job(sshd, operator, install_dir, credential=stranger)
    assert job.status == JobStatus.FAILED
    assert job.error == (f"Connect (pinned host key): 127.0.0.1:{sshd.port} refused the key for user 'root' (is "
                         "the credential's public key in that user's authorized_keys?)")
    assert not install_dir.exists()


def test_it_fails_preflight_on_a_full_disk(sshd, operator, install_dir):  # noqa: F811
    sshd.stub("df", FULL_DISK_DF)
    job = create_job(sshd, operator, install_dir)
    assert job.status == JobStatus.FAILED
    assert job.error == f"Preflight checks: only 100 MiB free for {install_dir}; the agent needs at least 256 MiB"
    assert steps(job)["upload"].status == StepStatus.PENDING
    assert not install_dir.exists()


def test_it_expires_the_token_when_enrollment_fails(sshd, operator, install_dir):  # noqa: F811
    job = create_job(sshd, operator, install_dir, portal_url=f"http://127.0.0.1:{free_port()}")
    assert job.status == JobStatus.FAILED
    assert job.error.startswith("Enroll with a one-time token: enrollment failed (exit status 1)")
    assert "Connection refused" in steps(job)["enroll"].output
    token = EnrollmentToken.objects.get()
    assert token.used_at is None and token.expires_at <= timezone.now()
    assert not NodeCredential.objects.exists()
    # The token (whose value only the node saw) can no longer enroll anything: expired, refused by node_enroll.
    with pytest.raises(EnrollmentError):
        node_enroll(token_value=f"tme_{token.prefix}_x", host={"hostname": "intruder"})


@pytest.mark.worker
def test_it_runs_a_job_in_a_real_celery_worker(sshd, operator, install_dir, live_server):  # noqa: F811
    with celery_worker() as (queue, proc), provisioning_tasks_to(queue):
        with transaction.atomic():
            job = create_job(sshd, operator, install_dir, portal_url=live_server.url, confirm=False)

        def settled():
            job.refresh_from_db()
            return job.offered_fingerprint or job.status != JobStatus.HOST_KEY or proc.poll() is not None

        wait_until(settled, timeout=30, what="the host key fetch")
        assert job.offered_fingerprint == sshd.host_fingerprint
        services.host_key_confirm(job=job, fingerprint_shown=job.offered_fingerprint, by=operator)

        def finished():
            job.refresh_from_db()
            return job.status in (JobStatus.DONE, JobStatus.FAILED) or proc.poll() is not None

        wait_until(finished, timeout=90, what="the provisioning job")
        assert proc.poll() is None, "worker died"
    assert job.status == JobStatus.DONE, job.error
    assert IngestedBatch.objects.filter(node__hostname="sim-node-01").exists()
    assert job.steps.filter(status=StepStatus.FAILED).count() == 0

