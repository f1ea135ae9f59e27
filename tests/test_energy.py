"""Energy per token (issue 18): the GPUs' measured energy, attributed as cost is (a MIG instance its slices of 7),
per million tokens and per output token, checked against hand-computed values."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from portal.capacity.services import allocation_create, deployment_create
from portal.economics.selectors import deployment_costs, model_economics, site_costs, tenant_economics, tenant_energy
from portal.economics.services import cost_hours_attribute
from portal.fleet.models import MigInstance, ServingEndpoint
from portal.telemetry.models import GpuHour, RollupWatermark, SiteHour, UsageHour
from tests.factories import (
    GpuFactory,
    NodeFactory,
    OperatorFactory,
    SiteFactory,
    TenantFactory,
    admin_of,
    gpu_uuid,
)

pytestmark = pytest.mark.django_db

H = datetime(2026, 11, 10, 12, tzinfo=UTC)
KWH = 3_600_000_000  # millijoules, as NVML counts


@pytest.fixture
def mig_gpu():
    return build(H)


def build(hour: datetime):
    """One H100 in MIG mode measuring 0.7 kWh in the hour: tenant A's 4g instance serves 2,000,000 tokens (of
    which 500,000 output), tenant B's 3g instance 1,000,000 (200,000 output)."""
    node = NodeFactory(site=SiteFactory(currency="USD"))
    gpu = GpuFactory(node=node, uuid=gpu_uuid(), index=0, name="NVIDIA H100 80GB HBM3", mig_mode=True)
    a, b = TenantFactory(name="A"), TenantFactory(name="B")
    for tenant, gi, profile, port, prompt, output in ((a, 1, "4g.40gb", 8000, 1_500_000, 500_000),
                                                       (b, 2, "3g.40gb", 8001, 800_000, 200_000)):
        mig = MigInstance.objects.create(gpu=gpu, gi_id=gi, profile=profile)
        allocation = allocation_create(tenant=tenant, gpu=gpu, mig_instance=mig, starts_at=hour - timedelta(days=1))
        url = f"http://127.0.0.1:{port}/metrics"
        deployment_create(tenant=tenant, name=f"{tenant.name} llama", model_name=f"model-{tenant.name}",
                          engine="vllm", node=node, metrics_url=url, allocations=[allocation],
                          active_from=hour - timedelta(days=1))
        endpoint = ServingEndpoint.objects.create(node=node, url=url, model=f"model-{tenant.name}", engine="vllm")
        UsageHour.objects.create(endpoint=endpoint, ts=hour, prompt_tokens=prompt, generation_tokens=output)
    GpuHour.objects.create(gpu=gpu, ts=hour, seconds=3600, util_mean=70.0, energy_mj=7 * KWH // 10)
    SiteHour.objects.create(site=node.site, ts=hour, prompt_tokens=2_300_000, generation_tokens=700_000)
    cost_hours_attribute(hours=[hour], now=hour + timedelta(hours=1))
    return node, a, b


def test_each_tenant_gets_its_slices_of_the_energy_per_token(mig_gpu):
    _node, _a, _b = mig_gpu
    costs = deployment_costs(start=H, end=H + timedelta(hours=1))
    rows = {tenant.name: cost for tenant, _site, cost in tenant_economics(start=H, end=H + timedelta(hours=1),
                                                                         costs=costs) if tenant}
    # A: 4/7 of 0.7 kWh = 0.4 kWh for 2,000,000 tokens = 0.2 kWh per million; 0.4 x 3.6e6 J / 500,000 = 2.88 J.
    assert rows["A"].energy_kwh == Decimal("0.40000000")
    assert (rows["A"].kwh_per_million_tokens, rows["A"].joules_per_output_token) == (Decimal("0.2000"),
                                                                                    Decimal("2.8800"))
    # B: 3/7 of 0.7 = 0.3 kWh for 1,000,000 tokens = 0.3 kWh per million; 0.3 x 3.6e6 / 200,000 = 5.4 J.
    assert (rows["B"].kwh_per_million_tokens, rows["B"].joules_per_output_token) == (Decimal("0.3000"),
                                                                                    Decimal("5.4000"))
    by_model = dict(model_economics(costs=costs))
    assert by_model["model-A"].joules_per_output_token == Decimal("2.8800")


def test_the_site_and_the_tenant_portal_read_the_same_energy(mig_gpu, client):
    _node, a, _b = mig_gpu
    [period] = site_costs(start=H, end=H + timedelta(hours=1))
    # The whole GPU: 0.7 kWh for 3,000,000 tokens (700,000 output).
    assert period.cost.kwh_per_million_tokens == Decimal("0.2333")
    assert period.cost.joules_per_output_token == Decimal("3.6000")
    [(model, cost)] = tenant_energy(tenant=a, start=H, end=H + timedelta(hours=1))
    assert (model, cost.tokens, cost.joules_per_output_token) == ("model-A", 2_000_000, Decimal("2.8800"))


def test_no_tokens_no_figure(mig_gpu):
    _node, a, _b = mig_gpu
    assert tenant_energy(tenant=a, start=H + timedelta(hours=1), end=H + timedelta(hours=2)) == []
    [period] = site_costs(start=H + timedelta(hours=1), end=H + timedelta(hours=2))
    assert period.cost.kwh_per_million_tokens is None and period.cost.joules_per_output_token is None


def test_the_economics_page_and_each_tenant_portal_show_it(client):
    hour = (timezone.now() - timedelta(hours=3)).replace(minute=0, second=0, microsecond=0)
    _node, a, _b = build(hour)
    RollupWatermark.objects.create(name="attribution", stored_until=timezone.now())
    client.force_login(OperatorFactory())
    page = client.get("/economics/?period=7d").content.decode()
    assert "kWh / 1M tokens" in page and "J / output token" in page
    assert '<td class="num" data-testid="j-per-output-token">2.88</td>' in page  # tenant A and its model
    client.force_login(admin_of(a))
    page = client.get(f"/tenant/{a.slug}/usage/?days=7").content.decode()
    assert '<tr data-model="model-A"><td>model-A</td><td class="num">2,000,000</td>' in page
    assert '<td class="num" data-testid="j-per-output-token">2.88</td>' in page
    assert "model-B" not in page  # only its own deployments
