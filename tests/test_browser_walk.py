"""Every page of the demo factory in real Chromium, as each role: no console error, no failed request, no error
page, and the headline tiles agree with the pages they summarise."""

import re

import pytest
from django.utils import timezone
from playwright.sync_api import Page, expect

from portal.billing.models import Invoice
from portal.capacity.models import Deployment
from portal.demo.seed import DEMO_PASSWORD, seed_demo
from portal.fleet.models import Node
from portal.provisioning.models import ProvisioningJob
from portal.sla.models import SlaPolicy
from portal.tenants.models import Tenant

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def _login(page: Page, live_server, username: str) -> None:
    page.goto(f"{live_server.url}/accounts/login/")
    page.get_by_label("E-mail or username").fill(username)
    page.get_by_label("Password").fill(DEMO_PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("button", name="Log out")).to_be_visible()


class Watch:
    """What went wrong while the page loaded and ran its scripts: console errors, failed or refused requests."""

    def __init__(self, page: Page):
        self.problems: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.problems.append(f"script: {e}"))
        # ERR_ABORTED is the browser cancelling what the page it left was still loading (the API docs' favicon
        # when the walk moves on), not a request that failed; refused, reset or timed out ones count.
        page.on("requestfailed", lambda r: r.failure != "net::ERR_ABORTED"
                and self.problems.append(f"failed: {r.url} {r.failure}"))
        page.on("response", lambda r: r.status >= 400 and self.problems.append(f"{r.status}: {r.url}"))

    def visit(self, page: Page, url: str) -> None:
        page.goto(url)
        page.wait_for_load_state("networkidle")
        assert not page.locator("[data-testid^=error-]").count(), url
        assert self.problems == [], (url, self.problems)


def _number(text: str) -> int:
    return int(re.sub(r"[^\d]", "", text) or 0)


@pytest.fixture
def demo(tmp_path):
    seed_demo(days=2, minute_hours=1, agents_dir=tmp_path / "agents", portal_url="http://127.0.0.1:8000")


def _operator_pages(base: str, admin: bool) -> list[str]:
    node = Node.objects.order_by("hostname").first()
    acme = Tenant.objects.get(slug="acme")
    invoice = Invoice.objects.filter(tenant=acme).order_by("period_start").first()
    pages = ["/fleet/", f"/fleet/nodes/{node.pk}/", "/capacity/", "/capacity/?state=free", "/capacity/deployments/",
             "/tenants/", f"/tenants/{acme.pk}/", f"/tenants/{acme.pk}/isolation/", "/tenants/plans/", "/audit/",
             "/economics/?period=7d", "/economics/pnl/", "/economics/what-if/", "/economics/books/",
             "/economics/token-types/", "/economics/token-types/?rule=weighted&weight=4", "/economics/advisor/",
             "/alerts/", "/sla/", "/sla/tenants/acme/", "/sla/policies/",
             f"/sla/policies/{SlaPolicy.objects.first().pk}/", "/billing/", "/billing/prices/",
             f"/billing/invoices/{invoice.pk}/", "/standards/", "/standards/drift/", "/api/v1/docs",
             "/sites/fra-1/", "/sites/iad-1/", "/health/"]
    if admin:
        burn_in = ProvisioningJob.objects.filter(kind="burn_in").first()
        pages += ["/fleet/enroll/", "/provisioning/", "/provisioning/keys/", f"/provisioning/nodes/{node.pk}/",
                  f"/provisioning/jobs/{burn_in.pk}/"]
    return [base + p for p in pages]


@pytest.mark.parametrize("username", ["operator", "viewer"])
def test_every_operator_page_loads_cleanly_and_the_tiles_agree(page: Page, live_server, demo, username):
    page.set_viewport_size({"width": 1440, "height": 900})
    _login(page, live_server, username)
    watch = Watch(page)
    for url in _operator_pages(live_server.url, admin=username == "operator"):
        watch.visit(page, url)
    watch.visit(page, f"{live_server.url}/fleet/")
    open_alerts = _number(page.get_by_test_id("open-alerts").inner_text())
    acknowledged = _number(page.get_by_test_id("acknowledged-alerts").inner_text())
    online, total = (int(n) for n in page.get_by_test_id("gpus-online").inner_text().split(" / "))
    assert total == page.locator(".node .gpus .gpu").count() == 143  # 16 x 8, and FRA-1's 8 + 7 of today
    watch.visit(page, f"{live_server.url}/alerts/")
    assert _number(page.get_by_test_id("tab-open").inner_text()) == open_alerts
    assert _number(page.get_by_test_id("tab-acknowledged").inner_text()) == acknowledged
    assert online <= total


def test_every_tenant_page_loads_cleanly_and_shows_only_its_own(page: Page, live_server, demo):
    page.set_viewport_size({"width": 1440, "height": 900})
    acme = Tenant.objects.get(slug="acme")
    deployment = Deployment.objects.filter(tenant=acme).first()
    invoice = Invoice.objects.filter(tenant=acme).order_by("period_start").first()
    _login(page, live_server, "acme-admin")
    watch = Watch(page)
    base = f"{live_server.url}/tenant/acme"
    for path in ("/", "/usage/", "/usage/?days=7", f"/deployments/{deployment.pk}/", "/members/", "/api-keys/",
                 "/capacity/", "/sla/", "/isolation/", "/billing/", f"/billing/{invoice.pk}/"):
        watch.visit(page, base + path)
    others = Tenant.objects.exclude(pk=acme.pk).values_list("name", flat=True)
    for path in ("/sla/", "/isolation/"):
        watch.visit(page, base + path)
        assert not any(name in page.content() for name in others), path
    watch.visit(page, base + "/")
    tokens_month = _number(page.get_by_test_id("tokens-month").inner_text())
    watch.visit(page, base + "/billing/")
    month = timezone.now().strftime("%B %Y")
    draft = page.locator("tr[data-invoice]", has_text=month)
    assert _number(draft.locator("td.num").first.inner_text()) == tokens_month > 0
    assert not any(name in page.content() for name in others)
    response = page.goto(f"{live_server.url}/tenant/globex/")
    assert response.status == 404 and page.get_by_test_id("error-404").is_visible()
