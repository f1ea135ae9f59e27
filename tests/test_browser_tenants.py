"""End to end in real Chromium: a new organization signs up, verifies its e-mail, is approved by an operator,
requests capacity, and sees its deployment's usage; another tenant sees none of it."""

import re
from datetime import timedelta

import pytest
from django.core import mail
from django.utils import timezone
from playwright.sync_api import Browser, Page, expect

from portal.capacity.services import allocation_create, deployment_create
from portal.fleet.models import ServingEndpoint
from portal.telemetry.models import UsageMinute
from portal.tenants.models import Plan, Tenant, TenantStatus
from tests.factories import PASSWORD, GpuFactory, MembershipFactory, NodeFactory, OperatorFactory, gpu_uuid

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

H100 = "NVIDIA H100 80GB HBM3"
SECRET = "violet-kettle-harbour-42"
METRICS = "http://127.0.0.1:8000/metrics"


def log_in(page: Page, live_server, username: str, password: str) -> None:
    page.goto(f"{live_server.url}/accounts/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def test_it_takes_a_tenant_from_signup_to_usage(page: Page, browser: Browser, live_server, artifacts_dir,
                                                settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    OperatorFactory(username="olivia")
    Plan.objects.create(name="Growth", tokens_per_minute=3_000_000, gpus=24, description="Production traffic")
    node = NodeFactory(hostname="iad1-h100-07")
    gpu = GpuFactory(node=node, uuid=gpu_uuid(), index=0, name=H100)

    # Sign up.
    page.goto(f"{live_server.url}/signup/")
    page.get_by_label("Organization").fill("Stark Compute")
    page.get_by_label("Your name").fill("Pepper Potts")
    page.get_by_label("Work e-mail").fill("pepper@stark.example")
    page.get_by_label("Password").fill(SECRET)
    page.get_by_label("Models you intend to serve").fill("meta-llama/Llama-3.1-8B-Instruct")
    page.get_by_label("Expected volume (tokens per month)").fill("3000000000")
    page.get_by_label("Capacity you need").fill("1 x H100")
    page.screenshot(path=artifacts_dir / "tenant-signup.png", full_page=True)
    page.get_by_role("button", name="Sign up").click()
    expect(page.get_by_role("heading", name="Check your e-mail")).to_be_visible()
    expect(page.get_by_text("pepper@stark.example")).to_be_visible()

    # Verify the address from the mail.
    [message] = mail.outbox
    link = re.search(r"(http://\S+/signup/verify/\S+/)", message.body).group(1)
    page.goto(link)
    page.get_by_role("button", name="Verify my e-mail address").click()
    expect(page.get_by_text("Your e-mail address is verified")).to_be_visible()
    page.get_by_label("Username").fill("pepper@stark.example")
    page.get_by_label("Password").fill(SECRET)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{live_server.url}/tenant/")
    expect(page.get_by_role("heading", name="Stark Compute")).to_be_visible()
    expect(page.locator("[data-tenant='stark-compute']")).to_contain_text("Pending approval")

    # An operator approves it on a plan, in another browser context.
    operator_context = browser.new_context()
    operator = operator_context.new_page()
    log_in(operator, live_server, "olivia", PASSWORD)
    operator.goto(f"{live_server.url}/tenants/")
    expect(operator.locator("[data-tenant='stark-compute']")).to_contain_text("Pending approval")
    operator.get_by_role("link", name="Stark Compute").click()
    operator.get_by_label("Plan").select_option(label="Growth")
    operator.get_by_role("button", name="Approve").click()
    expect(operator.get_by_test_id("tenant-status")).to_have_text("Active")
    operator.screenshot(path=artifacts_dir / "tenant-approved-by-operator.png", full_page=True)
    operator_context.close()
    assert [m.subject for m in mail.outbox][-1] == "Stark Compute is approved on Tokenmill"

    # The tenant admin requests capacity.
    page.goto(f"{live_server.url}/tenant/stark-compute/capacity/")
    expect(page.get_by_test_id("tenant-status")).to_have_text("Active")
    page.get_by_label("Model:", exact=True).fill("meta-llama/Llama-3.1-8B-Instruct")
    page.get_by_label("GPU type").select_option(H100)
    page.get_by_label("Count").fill("1")
    page.get_by_role("button", name="Submit request").click()
    expect(page.get_by_text("Capacity requested: 1 x NVIDIA H100 80GB HBM3")).to_be_visible()
    expect(page.get_by_test_id("request-status")).to_have_text("Open")
    page.screenshot(path=artifacts_dir / "tenant-capacity-request.png", full_page=True)

    # The operator side fulfils it (here through the capacity services) and the engine reports usage.
    tenant = Tenant.objects.get(slug="stark-compute")
    assert tenant.status == TenantStatus.ACTIVE
    now = timezone.now()
    allocation = allocation_create(tenant=tenant, gpu=gpu, starts_at=now - timedelta(hours=2))
    deployment = deployment_create(tenant=tenant, name="llama-8b-prod", model_name="meta-llama/Llama-3.1-8B-Instruct",
                                   engine="vllm", node=node, metrics_url=METRICS, allocations=[allocation],
                                   active_from=now - timedelta(hours=2))
    endpoint = ServingEndpoint.objects.create(node=node, url=METRICS, model="meta-llama/Llama-3.1-8B-Instruct",
                                              engine="vllm", up=True, probe_latency_ms=3.4, last_seen=now)
    UsageMinute.objects.create(endpoint=endpoint, ts=now.replace(minute=0, second=0, microsecond=0),
                               prompt_tokens=90_000, generation_tokens=33_456, requests_ok=120)

    page.goto(f"{live_server.url}/tenant/stark-compute/")
    expect(page.get_by_test_id("tokens-today")).to_have_text("123,456")
    row = page.locator("[data-deployment='llama-8b-prod']")
    expect(row.get_by_test_id("health")).to_have_text("up")
    expect(row).to_contain_text("3.4 ms")
    expect(page.get_by_test_id("gpus-held")).to_have_text("1")
    page.screenshot(path=artifacts_dir / "tenant-overview.png", full_page=True)
    page.get_by_role("link", name="Usage").click()
    expect(page.locator("[data-model='meta-llama/Llama-3.1-8B-Instruct']").get_by_test_id("model-tokens")
           ).to_have_text("123,456")
    expect(page.locator("#usage-chart .main-svg").first).to_be_visible()
    page.screenshot(path=artifacts_dir / "tenant-usage.png", full_page=True)

    # Another tenant sees none of it.
    other = MembershipFactory(user__username="globex-admin", tenant__name="Globex", tenant__slug="globex")
    other_context = browser.new_context()
    outsider = other_context.new_page()
    log_in(outsider, live_server, other.user.username, PASSWORD)
    expect(outsider.get_by_role("heading", name="Globex")).to_be_visible()
    expect(outsider.get_by_text("Stark Compute")).to_have_count(0)
    for path in ("/tenant/stark-compute/", "/tenant/stark-compute/usage/",
                 f"/tenant/stark-compute/deployments/{deployment.pk}/", f"/tenant/globex/deployments/{deployment.pk}/"):
        response = outsider.goto(f"{live_server.url}{path}")
        assert response.status == 404, path
    other_context.close()
