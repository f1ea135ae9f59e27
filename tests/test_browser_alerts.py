"""End to end in real Chromium: an operator admin acknowledges and resolves an alert in place, without a reload."""

from datetime import UTC, datetime

import pytest
from playwright.sync_api import Page, expect

from portal.alerts.models import Alert
from portal.alerts.services import alert_raise
from tests.factories import NodeFactory, OperatorFactory
from tests.test_browser import login

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_it_acknowledges_and_resolves_an_alert_in_place(page: Page, live_server, artifacts_dir):
    OperatorFactory(username="olivia")
    node = NodeFactory(hostname="iad1-h100-04")
    alert = alert_raise(key=f"xid:79:{node.pk}", kind="xid", severity="critical", node_id=node.pk,
                        title="XID 79: GPU has fallen off the bus on iad1-h100-04", at=datetime.now(tz=UTC))
    login(page, live_server, "olivia")
    page.goto(f"{live_server.url}/alerts/")
    row = page.locator(f"#alert-{alert.pk}")
    expect(row).to_contain_text("XID 79: GPU has fallen off the bus")
    expect(row).to_contain_text("The GPU is unreachable over PCIe")  # its note in NVIDIA's catalog
    page.evaluate("window.notReloaded = true")

    row.get_by_role("button", name="Acknowledge").click()
    expect(row.get_by_test_id("alert-state")).to_contain_text("Acknowledged by olivia")
    expect(row.get_by_role("button", name="Acknowledge")).to_have_count(0)
    expect(page.get_by_test_id("tab-open")).to_contain_text("0")
    expect(page.get_by_test_id("tab-acknowledged")).to_contain_text("1")
    assert page.evaluate("window.notReloaded") is True
    assert page.url == f"{live_server.url}/alerts/"
    page.screenshot(path=artifacts_dir / "alerts-acknowledged.png", full_page=True)

    row.get_by_role("button", name="Resolve").click()
    expect(row.get_by_test_id("alert-state")).to_contain_text("Resolved by olivia")
    expect(row.get_by_role("button")).to_have_count(0)
    expect(page.get_by_test_id("tab-resolved")).to_contain_text("1")
    assert page.evaluate("window.notReloaded") is True
    alert.refresh_from_db()
    assert alert.acknowledged_by.username == "olivia" and alert.resolved_by.username == "olivia"
    assert Alert.objects.filter(resolved_at__isnull=True).count() == 0
