"""The certified stack in real Chromium: an operator admin certifies stack 2026.12, reads a site's compliance,
turns the placement policy on, and sees the node off the stack excluded on the standards page and refused on the
capacity page."""

import pytest
from playwright.sync_api import Page, expect

from portal.capacity.models import Allocation
from portal.standards.models import PlacementPolicy
from tests.factories import GpuFactory, NodeFactory, OperatorFactory, SiteFactory, TenantFactory
from tests.test_browser import login

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """The login is incidental here; PBKDF2's deliberate slowness would dominate this test."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def test_an_operator_certifies_a_stack_and_excludes_the_node_off_it(page: Page, live_server, artifacts_dir):
    OperatorFactory(username="olivia")
    TenantFactory(name="Acme AI")
    site = SiteFactory(name="Ashburn IAD-1")
    for i in range(1, 4):
        NodeFactory(site=site, hostname=f"iad1-h100-{i:02d}", driver_version="590.48.01", cuda_driver_version="13.1")
    lagging = NodeFactory(site=site, hostname="iad1-h100-04", driver_version="550.127.05", cuda_driver_version="12.4")
    GpuFactory(node=lagging, index=0)
    login(page, live_server, "olivia")

    page.goto(f"{live_server.url}/standards/")
    expect(page.get_by_text("No certified stack yet")).to_be_visible()
    page.get_by_label("Stack version").fill("2026.12")
    page.get_by_label("NVIDIA driver").fill("590.48.01")
    page.get_by_label("CUDA (driver API)").fill("13.1")
    page.get_by_role("button", name="Put in force").click()
    expect(page.get_by_text("Certified stack 2026.12 in force.")).to_be_visible()
    iad = page.get_by_test_id("site-compliance").locator('tr[data-site="Ashburn IAD-1"]')
    expect(iad).to_contain_text("3 / 4")
    expect(iad.get_by_test_id("site-pct")).to_have_text("75.0 %")
    expect(page.locator('tr[data-node="iad1-h100-04"]').first).to_contain_text("major 40 behind")

    page.goto(f"{live_server.url}/standards/")
    expect(page.get_by_test_id("stack-name")).to_have_text("2026.12")
    expect(page.get_by_test_id("policy-state")).to_contain_text("Nodes off the certified stack may take new placements")
    policy = page.get_by_test_id("placement-policy")
    policy.get_by_label("Nodes off the certified stack").select_option(label="Exclude them from new placements")
    policy.get_by_label("Note").fill("CHG-2304")
    page.get_by_role("button", name="Save policy").click()
    expect(page.get_by_text("New placements now skip nodes off the certified stack.")).to_be_visible()
    expect(page.get_by_test_id("policy-state")).to_contain_text("New placements skip nodes off the certified stack")
    excluded = page.get_by_test_id("excluded-nodes")
    expect(excluded.locator("li")).to_have_count(1)
    expect(excluded.locator('li[data-node="iad1-h100-04"]')).to_contain_text(
        "Driver 550.127.05 (stack 590.48.01), CUDA (driver) 12.4 (stack 13.1)")
    page.screenshot(path=artifacts_dir / "certified-stack.png", full_page=True)
    assert list(PlacementPolicy.objects.values_list("exclude_off_stack", "note")) == [(True, "CHG-2304")]

    page.goto(f"{live_server.url}/capacity/?node=iad1-h100-04#units")
    unit = page.locator('table[data-node="iad1-h100-04"] tbody tr').first
    unit.get_by_role("combobox").select_option(label="Acme AI")
    unit.get_by_role("button", name="Allocate").click()
    expect(page.get_by_test_id("allocation-errors")).to_contain_text(
        "iad1-h100-04 is off the certified stack 2026.12")
    assert not Allocation.objects.exists()
