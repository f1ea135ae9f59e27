"""End to end in real Chromium: an operator admin uploads an SSH key, adds a node (the test sshd), confirms the host
key fingerprint shown, and watches the job's progress bar reach done when the node's first batch arrives. The job
runs in a real Celery worker; the agent posts to the live test portal."""

import os
import re
import signal
from datetime import timedelta

import pytest
from django.utils import timezone
from playwright.sync_api import Page, expect

from portal.capacity.services import CapacityError, allocation_create
from portal.fleet.models import Node, NodeLifecycle
from portal.provisioning.models import JobKind, JobStatus, ProvisioningJob
from tests.factories import OperatorFactory, SiteFactory, TenantFactory
from tests.sshd import sshd  # noqa: F401 -- the sshd fixture
from tests.test_browser import login
from tests.test_provisioning_ssh import kill_agent, provisioning_tasks_to
from tests.worker import celery_worker

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """Logins and user factories here are incidental; PBKDF2's deliberate slowness would dominate these tests."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def worker_queue():
    with celery_worker() as (queue, proc), provisioning_tasks_to(queue):
        yield queue
        assert proc.poll() is None, "worker died"


def test_it_provisions_a_node_from_the_browser(page: Page, live_server, sshd, worker_queue, tmp_path,  # noqa: F811
                                               artifacts_dir):
    install_dir = tmp_path / "opt" / "tokenmill-agent"
    OperatorFactory(username="olivia")
    SiteFactory(name="IAD1")
    login(page, live_server, "olivia")
    try:
        page.get_by_role("link", name="Provisioning").click()
        expect(page.get_by_role("heading", name="Provisioning")).to_be_visible()
        page.get_by_role("link", name="SSH keys & host keys").click()
        page.get_by_label("Name").fill("lab key")
        page.get_by_label("Private key file").set_input_files(str(sshd.client_key))
        page.get_by_role("button", name="Store key").click()
        expect(page.get_by_text("SSH key lab key (SHA256:")).to_be_visible()

        page.goto(f"{live_server.url}/provisioning/new/")
        page.get_by_label(re.compile(r"^Hosts")).fill(f"root@{sshd.host}:{sshd.port} browser-node-01")
        page.get_by_label("Install dir").fill(str(install_dir))
        page.get_by_label("Simulate GPUs").fill("2")
        page.get_by_label("Portal URL").fill(live_server.url)
        page.get_by_role("button", name="Add and provision").click()

        fingerprint = page.get_by_test_id("fingerprint")
        # The first contact runs in the worker, which may still be starting on a busy machine.
        expect(fingerprint).to_have_text(sshd.host_fingerprint, timeout=45_000)
        page.get_by_role("button", name="Confirm and start").click()
        expect(page.get_by_text("Host key confirmed and pinned.")).to_be_visible()

        progress = page.get_by_test_id("progress")
        expect(progress).to_have_attribute("data-status", "running", timeout=20_000)
        expect(progress).to_have_attribute("data-status", "done", timeout=60_000)
        expect(progress).to_have_attribute("aria-valuenow", "8")
        expect(page.get_by_test_id("job-status")).to_have_text("Done")
        expect(page.locator("[data-step='first_batch']")).to_contain_text("first batch (seq 1")
        page.screenshot(path=artifacts_dir / "provisioning-job.png", full_page=True)

        job = ProvisioningJob.objects.get(kind=JobKind.INSTALL)
        assert job.status == JobStatus.DONE
        assert Node.objects.get().hostname == "browser-node-01"
        page.goto(f"{live_server.url}/provisioning/")
        expect(page.locator(f"[data-job='{job.pk}'] [data-testid='progress']")).to_have_attribute(
            "data-status", "done")
    finally:
        pid_file = install_dir / "agent.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_a_planned_node_goes_through_burn_in_to_sale_and_a_failing_one_stays_out(
        page: Page, live_server, sshd, worker_queue, tmp_path, artifacts_dir):  # noqa: F811
    """The site's bring-up from the browser: plan two nodes, provision both on the test sshd; the one matching its
    plan passes its acceptance test and is sellable, the other (planned as an H200, nvidia-smi finds an H100)
    fails it and stays out of placement."""
    dirs = [tmp_path / "opt" / name for name in ("a", "b")]
    OperatorFactory(username="olivia")
    SiteFactory(name="IAD1", slug="iad1")
    login(page, live_server, "olivia")
    try:
        page.goto(f"{live_server.url}/sites/iad1/")
        page.get_by_label("Clock started on").fill((timezone.now() - timedelta(days=10)).date().isoformat())
        page.get_by_label("Target days").fill("90")
        page.get_by_label("Soak minutes").fill("0")  # the worker's soak loop is tested with seconds elsewhere
        page.get_by_role("button", name="Save plan").click()
        expect(page.get_by_text("Bring-up plan of IAD1 saved.")).to_be_visible()
        for model in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
            page.get_by_label("GPU model").fill(model)
            page.get_by_label(re.compile(r"^Nodes")).fill("1")
            page.get_by_label("GPUs per node").fill("1")
            page.get_by_role("button", name="Save line").click()
            expect(page.get_by_text(f"Planned 1 x 1 {model}.")).to_be_visible()
        for model, hostname in (("NVIDIA H100 80GB HBM3", "iad1-node-01"), ("NVIDIA H200", "iad1-node-02")):
            page.get_by_label("Plan line").select_option(label=f"1 x 1 {model}")
            page.get_by_label("Hostnames").fill(hostname)
            page.get_by_role("button", name="Name nodes").click()
            expect(page.locator(f"[data-node='{hostname}'] [data-testid='stage']")).to_have_text("Planned")
        expect(page.get_by_test_id("gpus-sellable")).to_have_text("0 / 2")

        page.goto(f"{live_server.url}/provisioning/keys/")
        page.get_by_label("Name").fill("lab key")
        page.get_by_label("Private key file").set_input_files(str(sshd.client_key))
        page.get_by_role("button", name="Store key").click()
        for n, (hostname, install_dir) in enumerate(zip(("iad1-node-01", "iad1-node-02"), dirs, strict=True)):
            page.goto(f"{live_server.url}/provisioning/new/")
            page.get_by_label(re.compile(r"^Hosts")).fill(f"root@{sshd.host}:{sshd.port} {hostname}")
            page.get_by_label("Install dir").fill(str(install_dir))
            page.get_by_label("Simulate GPUs").fill("1")
            page.get_by_label("Portal URL").fill(live_server.url)
            page.get_by_role("button", name="Add and provision").click()
            if n == 0:  # the second job finds the host key pinned by the first
                expect(page.get_by_test_id("fingerprint")).to_have_text(sshd.host_fingerprint, timeout=45_000)
                page.get_by_role("button", name="Confirm and start").click()
            expect(page.get_by_test_id("progress")).to_have_attribute("data-status", "done", timeout=90_000)
            page.get_by_test_id("acceptance").get_by_role("link").click()
            progress = page.get_by_test_id("progress")
            expect(progress).to_have_attribute("data-status", re.compile("done|failed"), timeout=60_000)

        # The second node's acceptance test is the page open now: it failed at the inventory, out of sale.
        expect(page.get_by_test_id("job-error")).to_have_text(
            "GPUs against the plan and the baseline: GPU 0 is NVIDIA H100 80GB HBM3, the plan expects NVIDIA H200")
        expect(page.locator("[data-step='inventory']")).to_have_attribute("data-status", "failed")
        page.screenshot(path=artifacts_dir / "acceptance-failed.png", full_page=True)

        page.goto(f"{live_server.url}/sites/iad1/")
        expect(page.locator("[data-node='iad1-node-01'] [data-testid='stage']")).to_have_text("Sellable")
        expect(page.locator("[data-node='iad1-node-02'] [data-testid='stage']")).to_have_text("Burn-in")
        expect(page.get_by_test_id("gpus-sellable")).to_have_text("1 / 2")
        expect(page.locator("[data-testid='pipeline'] [data-stage='burn_in']")).to_have_text("1")
        page.screenshot(path=artifacts_dir / "site-bringup.png", full_page=True)

        page.goto(f"{live_server.url}/capacity/?node=iad1-node-02")
        expect(page.locator("[data-node='iad1-node-02'] [data-testid='out-of-sale']")).to_have_text("burn-in")
        expect(page.locator("[data-node='iad1-node-02']").get_by_role("button", name="Allocate")).to_have_count(0)
        failed = Node.objects.get(hostname="iad1-node-02")
        assert failed.lifecycle == NodeLifecycle.BURN_IN
        with pytest.raises(CapacityError, match="burn-in, not sellable"):
            allocation_create(tenant=TenantFactory(), gpu=failed.gpus.get(), starts_at=timezone.now())
    finally:
        for install_dir in dirs:
            kill_agent(install_dir)
