"""End to end in real Chromium: an operator admin uploads an SSH key, adds a node (the test sshd), confirms the host
key fingerprint shown, and watches the job's progress bar reach done when the node's first batch arrives. The job
runs in a real Celery worker; the agent posts to the live test portal."""

import os
import re
import signal

import pytest
from playwright.sync_api import Page, expect

from portal.fleet.models import Node
from portal.provisioning.models import JobStatus, ProvisioningJob
from tests.factories import OperatorFactory, SiteFactory
from tests.sshd import sshd  # noqa: F401 -- the sshd fixture
from tests.test_browser import login
from tests.test_provisioning_ssh import provisioning_tasks_to
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

        job = ProvisioningJob.objects.get()
        assert job.status == JobStatus.DONE
        assert Node.objects.get().hostname == "browser-node-01"
        page.goto(f"{live_server.url}/provisioning/")
        expect(page.locator(f"[data-job='{job.pk}'] [data-testid='progress']")).to_have_attribute(
            "data-status", "done")
    finally:
        pid_file = install_dir / "agent.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
