"""docs/economics.md computed by the product: each figure there is asserted here."""

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from portal.billing.models import ModelPrice, PriceBook
from portal.billing.services import invoice_refresh_draft
from portal.capacity.services import allocation_create, deployment_create
from portal.economics.pnl import site_pnl
from portal.economics.selectors import attributed_costs, deployment_costs, site_costs, tenant_economics
from portal.economics.services import cost_hours_attribute
from portal.fleet.models import Gpu, ServingEndpoint
from portal.telemetry.models import GpuHour, UsageHour
from portal.telemetry.rollups import rollup_site_hours
from portal.tenants.models import Plan
from tests.factories import NodeFactory, SiteFactory, TenantFactory, gpu_uuid

H = datetime(2026, 11, 10, 12, tzinfo=UTC)
KWH = 3_600_000_000  # millijoules


@pytest.mark.django_db
def test_the_worked_example_in_docs_economics_md():
    site = SiteFactory(name="Example DC", currency="USD", gpu_capex=Decimal("35064.00"), depreciation_months=48,
                       other_opex_gpu_hour=Decimal("0.50"), energy_price_kwh=Decimal("0.10"), pue=Decimal("1.5"))
    node = NodeFactory(site=site)
    gpu0, gpu1 = (Gpu.objects.create(node=node, uuid=gpu_uuid(), index=i, name="NVIDIA H100 80GB HBM3")
                  for i in range(2))
    plan = Plan.objects.create(name="Example plan", tokens_per_minute=10**7, gpus=8)
    acme = TenantFactory(name="Acme", plan=plan)
    book = PriceBook.objects.create(plan=plan, currency="USD")
    ModelPrice.objects.create(book=book, model_name="example/model", effective_from=date(2026, 11, 1),
                              input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60"))
    allocation = allocation_create(tenant=acme, gpu=gpu0, starts_at=H - timedelta(days=5))
    url = "http://127.0.0.1:8000/metrics"
    deployment_create(tenant=acme, name="example", model_name="example/model", engine="vllm", node=node,
                      metrics_url=url, allocations=[allocation], active_from=H - timedelta(days=5))
    endpoint = ServingEndpoint.objects.create(node=node, url=url, model="example/model", engine="vllm")
    UsageHour.objects.create(endpoint=endpoint, ts=H, prompt_tokens=6_000_000, generation_tokens=2_000_000)
    GpuHour.objects.create(gpu=gpu0, ts=H, seconds=3600, util_mean=80.0, energy_mj=2 * KWH)
    GpuHour.objects.create(gpu=gpu1, ts=H, seconds=3600, util_mean=0.0, energy_mj=KWH // 4)
    rollup_site_hours(hours=[H])
    cost_hours_attribute(hours=[H])
    hour = (H, H + timedelta(hours=1))

    # Cost and its attribution
    attributed = attributed_costs(start=hour[0], end=hour[1])
    assert attributed[(site.pk, acme.pk)].total == Decimal("1.80")
    assert attributed[(site.pk, None)].total == Decimal("1.5375")
    (site_period,) = site_costs(start=hour[0], end=hour[1])
    assert site_period.cost.total == Decimal("3.3375")

    # Cost per million tokens
    costs = deployment_costs(start=hour[0], end=hour[1])
    acme_row = next(row for row in tenant_economics(start=hour[0], end=hour[1], costs=costs) if row[0] == acme)
    assert acme_row[2].per_million_tokens == Decimal("0.2250")
    assert site_period.cost.per_million_tokens == Decimal("0.4172")
    assert site_period.cost.utilization == pytest.approx(0.40)
    assert site_period.cost.idle == Decimal("1.80")

    # Revenue, margin, invoice
    (pnl,) = site_pnl(start=hour[0], end=hour[1])
    assert pnl.revenue == {"USD": Decimal("2.10")}
    assert pnl.margin == Decimal("-1.24") and pnl.allocation_rate == 0.5
    assert pnl.revenue["USD"] - acme_row[2].total == Decimal("0.30")
    invoice = invoice_refresh_draft(tenant=acme, period_start=date(2026, 11, 1), now=H + timedelta(hours=2))
    assert invoice.total == Decimal("2.10") and invoice.credits == 0 and invoice.commitment_topup == 0
    assert (invoice.input_tokens, invoice.output_tokens) == (6_000_000, 2_000_000)
