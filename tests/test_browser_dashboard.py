"""The operator's dashboard in real Chromium: live fleet grid, node page, chart ranges."""

import json
import time
import urllib.request

import pytest
from playwright.sync_api import Page, expect

from portal.fleet.models import Gpu
from tests.factories import OperatorFactory, batch_payload, gpu_payload, gpu_uuid, node_with_credential
from tests.test_browser import login
from tests.worker import store_worker, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def send_batch(live_server, credential: str, body: dict) -> None:
    request = urllib.request.Request(
        f"{live_server.url}/api/v1/agent/ingest", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {credential}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


@pytest.fixture
def stored(live_server):
    """The store worker, as in production: batches the portal accepts reach the pages through it."""
    with store_worker() as proc:
        yield proc
    assert proc.returncode == 0, "the store worker failed"


def test_it_updates_the_fleet_live_and_drills_into_a_node(page: Page, live_server, stored, artifacts_dir):
    OperatorFactory(username="olivia")
    _node, cred = node_with_credential(hostname="iad1-h100-07")
    uuids = [gpu_uuid(), gpu_uuid()]
    send_batch(live_server, cred, batch_payload(seq=1, gpus=[gpu_payload(uuid=u, index=i, util=10.0)
                                                             for i, u in enumerate(uuids)]))
    wait_until(lambda: Gpu.objects.filter(current_util=10.0).count() == 2, what="the store worker")
    login(page, live_server, "olivia")
    expect(page.get_by_test_id("util-now")).to_have_text("10.0%")
    page.evaluate("window.__sameDocument = true")

    send_batch(live_server, cred, batch_payload(seq=2, gpus=[gpu_payload(uuid=uuids[0], index=0, util=30.0),
                                                             gpu_payload(uuid=uuids[1], index=1, util=90.0)]))
    expect(page.get_by_test_id("util-now")).to_have_text("60.0%", timeout=25_000)
    expect(page.locator("[data-node='iad1-h100-07'] .gpu.u9")).to_have_count(1)
    assert page.evaluate("window.__sameDocument") is True, "the page was reloaded"
    page.screenshot(path=artifacts_dir / "fleet-live.png", full_page=True)

    page.locator("[data-node='iad1-h100-07']").click()
    expect(page.get_by_role("heading", name="iad1-h100-07")).to_be_visible()
    expect(page.get_by_test_id("chart-tier")).to_contain_text("minute rollups")
    expect(page.locator("#chart-util .main-svg").first).to_be_visible()  # scripts loaded, charts drawn
    page.get_by_role("button", name="1h").click()
    expect(page.get_by_test_id("chart-tier")).to_contain_text("raw samples")
    expect(page.locator("#chart-util .main-svg").first).to_be_visible()
    page.get_by_role("button", name="30d").click()
    expect(page.get_by_test_id("chart-tier")).to_contain_text("hourly rollups")
    expect(page.get_by_role("button", name="30d")).to_have_attribute("aria-current", "true")
    assert page.evaluate("window.__sameDocument") is None  # navigated once, to the node page; ranges did not reload
    time.sleep(0.2)
    page.screenshot(path=artifacts_dir / "node.png", full_page=True)
