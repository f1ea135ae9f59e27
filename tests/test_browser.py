"""End to end in real Chromium: the operator's login, the fleet page, logout; a tenant refused operator pages."""

import pytest
from playwright.sync_api import Page, expect

from tests.factories import PASSWORD, GpuFactory, MembershipFactory, NodeFactory, OperatorFactory, gpu_uuid

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def login(page: Page, live_server, username: str) -> None:
    page.goto(f"{live_server.url}/accounts/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()


def test_it_logs_an_operator_in_to_the_fleet_and_out(page: Page, live_server, artifacts_dir):
    OperatorFactory(username="olivia")
    node = NodeFactory(hostname="iad1-h100-01")
    GpuFactory(node=node, uuid=gpu_uuid(), index=0, name="NVIDIA H100 80GB HBM3", current_util=42.0)
    login(page, live_server, "olivia")
    expect(page).to_have_url(f"{live_server.url}/fleet/")
    expect(page.get_by_role("heading", name="Fleet")).to_be_visible()
    expect(page.locator("[data-node='iad1-h100-01']")).to_be_visible()
    expect(page.get_by_test_id("util-now")).to_have_text("42.0%")
    page.screenshot(path=artifacts_dir / "fleet.png", full_page=True)
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    page.goto(f"{live_server.url}/fleet/")
    expect(page).to_have_url(f"{live_server.url}/accounts/login/?next=/fleet/")


def test_it_refuses_a_tenant_user_the_operator_pages(page: Page, live_server):
    membership = MembershipFactory(user__username="acme-admin", tenant__name="Acme AI")
    login(page, live_server, membership.user.username)
    expect(page).to_have_url(f"{live_server.url}/tenant/")
    expect(page.get_by_role("heading", name="Acme AI")).to_be_visible()
    expect(page.get_by_role("link", name="Fleet")).to_have_count(0)
    response = page.goto(f"{live_server.url}/fleet/")
    assert response.status == 403
