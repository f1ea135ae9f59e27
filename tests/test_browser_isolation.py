"""End to end in real Chromium: an operator reads a tenant's isolation report with its co-tenants' names; the
tenant reads its own and sees no other tenant's name."""

import pytest
from django.utils import timezone
from playwright.sync_api import Browser, Page, expect

from portal.tenants.models import MemberRole
from tests.factories import PASSWORD, MembershipFactory, OperatorFactory
from tests.test_isolation_report import World

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def log_in(page: Page, live_server, username: str, password: str) -> None:
    page.goto(f"{live_server.url}/accounts/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def test_it_names_co_tenants_to_the_operator_and_never_to_the_tenant(page: Page, browser: Browser, live_server,
                                                                     artifacts_dir):
    world = World(now=timezone.now())
    OperatorFactory(username="olivia")
    member = MembershipFactory(tenant=world.acme, role=MemberRole.MEMBER).user

    log_in(page, live_server, "olivia", PASSWORD)
    page.goto(f"{live_server.url}/tenants/{world.acme.pk}/")
    page.get_by_role("link", name="Isolation report").click()
    expect(page.get_by_role("heading", name="Acme AI: isolation report")).to_be_visible()
    shared = page.locator(f"[data-allocation='{world.acme_mig.pk}']")
    expect(shared.get_by_test_id("shared-with")).to_contain_text(
        "Globex Research (3 slices), Umbrella Health (1 slice)")
    expect(shared.get_by_test_id("cc-mode")).to_have_text("off")
    expect(page.locator(f"[data-allocation='{world.acme_whole.pk}'] [data-testid='cc-mode']")).to_have_text(
        "not reported")
    expect(page.get_by_test_id("noisy-summary")).to_contain_text("(Globex Research, Umbrella Health)")
    expect(page.locator("#fig-noisy-neighbours .main-svg").first).to_be_visible()  # plotly drew the chart
    page.screenshot(path=artifacts_dir / "isolation-operator.png", full_page=True)

    tenant_context = browser.new_context()
    tenant = tenant_context.new_page()
    log_in(tenant, live_server, member.username, PASSWORD)
    tenant.goto(f"{live_server.url}/tenant/acme/")
    tenant.get_by_role("navigation", name="Organization").get_by_role("link", name="Isolation").click()
    expect(tenant).to_have_url(f"{live_server.url}/tenant/acme/isolation/")
    own = tenant.locator(f"[data-allocation='{world.acme_mig.pk}']")
    expect(own.get_by_test_id("shared-with")).to_contain_text("2 other tenants, 4 of 7 slices")
    expect(tenant.locator(f"[data-hour='{world.h0.isoformat()}'] td").nth(1)).to_have_text("0.375 s")
    expect(tenant.locator("#fig-noisy-neighbours .main-svg").first).to_be_visible()
    text = tenant.locator("body").inner_text()
    assert "Globex" not in text and "Umbrella" not in text and "secret" not in text
    tenant.screenshot(path=artifacts_dir / "isolation-tenant.png", full_page=True)
    tenant_context.close()
