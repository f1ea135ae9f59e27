"""End to end in real Chromium: a tenant member reads its SLA compliance and downloads an invoice as CSV."""

import csv
import io
from datetime import timedelta

import pytest
from django.utils import timezone
from playwright.sync_api import Page, expect

from portal.billing.services import invoice_month
from portal.sla.models import SlaObjective, SlaPolicy, Sli, Window
from portal.sla.services import sla_evaluate_tenant
from tests.factories import MembershipFactory
from tests.test_billing import LLAMA_8B, OCT, T0, add_usage, served_tenant
from tests.test_browser import login

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_a_member_opens_its_sla_page_and_downloads_an_invoice(page: Page, live_server, artifacts_dir):
    tenant, eps = served_tenant(name="Acme AI", slug="acme", since=T0 - timedelta(days=400))
    policy = SlaPolicy.objects.create(name="Standard", plan=tenant.plan)
    SlaObjective.objects.create(policy=policy, sli=Sli.TTFT_P95, target="0.5", window=Window.HOUR)
    now = timezone.now().replace(minute=0, second=0, microsecond=0)
    for h in range(6, 0, -1):
        counts = [20, 90, 99, 100, 100] if h != 3 else [5, 40, 70, 90, 100]
        add_usage(eps[LLAMA_8B], now - timedelta(hours=h), 1000, 100, requests_ok=100,
                  ttft={"le": [0.1, 0.25, 0.5, 1.0], "counts": counts, "sum": 20.0})
        sla_evaluate_tenant(tenant=tenant, window_end=now - timedelta(hours=h - 1))
    add_usage(eps[LLAMA_8B], T0 + timedelta(days=3), 12_345_678, 2_345_678)
    invoice = invoice_month(tenant=tenant, period_start=OCT, now=T0 + timedelta(days=40))
    member = MembershipFactory(tenant=tenant, user__username="acme-member", role="member").user

    login(page, live_server, member.username)
    page.goto(f"{live_server.url}/tenant/acme/sla/")
    expect(page.get_by_role("heading", name="Service levels")).to_be_visible()
    expect(page.get_by_test_id("sli-latest-ttft_p95")).to_have_text("0.3889 s")  # 0.25 + 0.25 x (95 - 90) / 9
    expect(page.locator("#fig-sla-ttft_p95 .main-svg").first).to_be_visible()
    expect(page.locator("[data-breach='ttft_p95']")).to_have_count(1)
    page.screenshot(path=artifacts_dir / "tenant-sla.png", full_page=True)

    page.get_by_role("link", name="Invoices").first.click()
    page.get_by_role("link", name=invoice.number).click()
    expect(page.get_by_test_id("invoice-total")).to_have_text("0.80")
    expect(page.get_by_test_id("invoice-input-tokens")).to_have_text("12,345,678")
    page.screenshot(path=artifacts_dir / "tenant-invoice.png", full_page=True)
    with page.expect_download() as download_info:
        page.get_by_test_id("download-csv").click()
    download = download_info.value
    assert download.suggested_filename == f"{invoice.number}.csv"
    rows = list(csv.reader(io.StringIO(download.path().read_text(encoding="utf-8"))))
    assert rows[0] == ["invoice", invoice.number] and rows[1] == ["tenant", "Acme AI"]
    assert rows[8][1] == "usage" and rows[8][3:6] == [LLAMA_8B, "12345678", "2345678"]
    assert rows[-1] == ["total", "0.80"]
