"""Token economics in real Chromium: an operator reads goodput on the fleet and SLA pages, switches the input vs
output rule and reads the advisor's difference; the tenant reads its own goodput and no one else's."""

from datetime import timedelta

import pytest
from django.utils import timezone
from playwright.sync_api import Browser, Page, expect

from portal.capacity.models import Deployment
from portal.telemetry.models import UsageMinute
from tests import test_goodput
from tests.factories import OperatorFactory, admin_of
from tests.test_advisor import pair  # noqa: F401 (the advisor's seeded pair, a fixture)
from tests.test_browser import login

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]
served = test_goodput.served


def test_an_operator_reads_goodput_the_split_and_the_advice(page: Page, browser: Browser, live_server, served,
                                                            pair, artifacts_dir):  # noqa: F811
    tenant, _deployment, endpoint = served
    minute = timezone.now().replace(second=0, microsecond=0) - timedelta(minutes=2)
    UsageMinute.objects.create(endpoint=endpoint, ts=minute, prompt_tokens=4_800, generation_tokens=1_200,
                               requests_ok=10, ttft=test_goodput.hist([5, 9, 10, 10]),
                               e2e=test_goodput.hist([1, 5, 8, 10]))
    OperatorFactory(username="capital")
    login(page, live_server, "capital")
    page.goto(f"{live_server.url}/fleet/")
    # Acme's minute: 6,000 tokens, 8 of 10 requests within its E2E target (the lower share): 80 of 100 tokens/s.
    expect(page.get_by_test_id("goodput-per-s")).to_have_text("80")
    expect(page.get_by_test_id("goodput-share")).to_have_text("80.0% of measured")

    page.goto(f"{live_server.url}/sla/tenants/{tenant.slug}/?days=30")
    # The two hours and the minute: TTFT 139 of 160 within 0.5 s, E2E 143 of 160 within 1 s; 158 of 160 succeeded.
    row = page.locator("[data-testid='goodput-table'] tr[data-deployment='llama on n1']")
    expect(row.get_by_test_id("goodput-ttft_p95")).to_have_text("85.8%")
    expect(page.locator("#fig-goodput .main-svg").first).to_be_visible()

    page.goto(f"{live_server.url}/economics/token-types/")
    expect(page.get_by_test_id("split-rule")).to_contain_text("Measured time")
    page.get_by_label("Split by").select_option("weighted")
    page.get_by_role("spinbutton", name="Output weight").fill("4")
    page.get_by_role("button", name="Apply").click()
    expect(page.get_by_test_id("split-rule")).to_contain_text("one output token weighs 4")
    expect(page.locator("[data-testid='token-type-models'] tr[data-model='llama']")).to_be_visible()

    page.goto(f"{live_server.url}/economics/advisor/")
    expect(page.get_by_test_id("finding").first).to_contain_text(
        "KV cache auto → fp8_e4m3: +38.0% output tokens per USD at equal goodput")
    page.screenshot(path=artifacts_dir / "advisor.png", full_page=True)

    tenant_context = browser.new_context()
    own = tenant_context.new_page()
    admin = admin_of(tenant)
    login(own, live_server, admin.username)
    own.goto(f"{live_server.url}/tenant/{tenant.slug}/sla/?days=30")
    expect(own.locator("tr[data-deployment='llama on n1']").get_by_test_id("goodput-e2e_p99")).to_have_text("88.3%")
    names = [d.name for d in Deployment.objects.exclude(tenant=tenant)]
    text = own.locator("body").inner_text()
    # The advisor's deployments are another tenant's (Globex): their names and traffic stay out.
    assert names and not any(name in text for name in names) and "Globex" not in text
    own.screenshot(path=artifacts_dir / "tenant-goodput.png", full_page=True)
    tenant_context.close()
