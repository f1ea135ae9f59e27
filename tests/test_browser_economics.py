"""The capital partner's views in real Chromium: the factory P&L, the what-if model answering its sliders, and
the books an auditor opens first."""

from datetime import UTC, datetime, timedelta

import pytest
from playwright.sync_api import Page, expect

from portal.economics.models import CostHour
from portal.economics.services import cost_hours_attribute
from tests.factories import OperatorFactory
from tests.test_books import H0, HOURS, NOW, SIMPLE, build, deploy
from tests.test_browser import login
from tests.test_economics import site_with_history

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_an_operator_reads_the_pnl_and_moves_utilization_in_the_what_if(page: Page, live_server, artifacts_dir):
    OperatorFactory(username="capital")
    site_with_history(base=datetime.now(tz=UTC).replace(minute=0, second=0, microsecond=0))
    login(page, live_server, "capital")
    page.goto(f"{live_server.url}/economics/pnl/")
    expect(page.get_by_role("heading", name="Factory P&L")).to_be_visible()
    expect(page.get_by_test_id("payback")).to_contain_text("Site")
    page.goto(f"{live_server.url}/economics/what-if/")
    expect(page.locator("#fig-whatif .main-svg").first).to_be_visible()
    slider = page.get_by_role("slider", name="Utilization")
    slider.fill("70")
    # (1.50 + (0.1 + 0.6 x 0.7) x 0.15) / 0.7 = 2.2543 per 1M tokens, the same figure test_economics computes
    expect(page.get_by_test_id("whatif-cost")).to_have_text("USD 2.2543")
    expect(page.get_by_test_id("whatif-vs-half")).to_contain_text("\u2212")
    slider.fill("30")
    expect(page.get_by_test_id("whatif-cost")).not_to_have_text("USD 2.2543")
    page.screenshot(path=artifacts_dir / "what-if.png", full_page=True)


def test_an_auditor_opens_the_books_sees_a_break_and_an_admin_mends_it(page: Page, live_server, artifacts_dir):
    OperatorFactory(username="auditor")
    _tenants, node, holds = build(SIMPLE)
    deploy(node, holds)
    cost_hours_attribute(hours=[H0 + timedelta(hours=h) for h in range(HOURS)], now=NOW)
    CostHour.objects.filter(ts=H0 + timedelta(hours=2)).delete()  # an hour lost after it was attributed
    login(page, live_server, "auditor")
    page.goto(f"{live_server.url}/economics/books/?month=2026-11")
    expect(page.get_by_test_id("books-summary")).to_have_text("1 break in the books of November 2026.")
    expect(page.locator("tr.break")).to_contain_text("Books DC, 2026-11-10 02:00 UTC: 2.0000 GPU-hours")
    page.screenshot(path=artifacts_dir / "books-break.png", full_page=True)
    page.get_by_role("button", name="Re-attribute November 2026 from history").click()
    expect(page.get_by_text("Re-attributing November 2026 in the background")).to_be_visible()
    expect(page.get_by_test_id("books-summary")).to_have_text("The books of November 2026 balance: 0 breaks.")
    expect(page.locator('tr[data-check="capacity"]')).to_contain_text("balances")
