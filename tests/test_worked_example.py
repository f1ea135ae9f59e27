"""docs/economics.md computed by the product: each figure there is asserted here."""

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from portal.billing.models import ModelPrice, PriceBook
from portal.billing.services import invoice_refresh_draft
from portal.capacity.selectors import usage_for_tenant
from portal.capacity.services import allocation_create, deployment_create, deployment_end
from portal.economics.pnl import site_pnl
from portal.economics.selectors import attributed_costs, deployment_costs, site_costs, tenant_economics
from portal.economics.services import cost_hours_attribute
from portal.fleet.models import MigInstance, ServingEndpoint
from portal.telemetry.models import GpuHour, UsageHour, UsageMinute
from portal.telemetry.rollups import rollup_site_hours
from portal.tenants.models import Plan
from tests.factories import GpuFactory, NodeFactory, SiteFactory, TenantFactory, gpu_uuid

H = datetime(2026, 11, 10, 12, tzinfo=UTC)
KWH = 3_600_000_000  # millijoules


@pytest.mark.django_db
def test_the_worked_example_in_docs_economics_md():
    site = SiteFactory(name="Example DC", currency="USD", gpu_capex=Decimal("35064.00"), depreciation_months=48,
                       other_opex_gpu_hour=Decimal("0.50"), energy_price_kwh=Decimal("0.10"), pue=Decimal("1.5"))
    node = NodeFactory(site=site)
    gpu0, gpu1 = (GpuFactory(node=node, uuid=gpu_uuid(), index=i, name="NVIDIA H100 80GB HBM3")
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
    assert site_period.cost.idle == Decimal("1.5375") and site_period.cost.not_busy == Decimal("1.80")

    # Revenue, margin, invoice
    (pnl,) = site_pnl(start=hour[0], end=hour[1])
    assert pnl.revenue == {"USD": Decimal("2.10")}
    assert pnl.margin == Decimal("-1.24") and pnl.allocation_rate == 0.5
    assert pnl.revenue["USD"] - acme_row[2].total == Decimal("0.30")
    invoice = invoice_refresh_draft(tenant=acme, period_start=date(2026, 11, 1), now=H + timedelta(hours=2))
    assert invoice.total == Decimal("2.10") and invoice.credits == 0 and invoice.commitment_topup == 0
    assert (invoice.input_tokens, invoice.output_tokens) == (6_000_000, 2_000_000)


@pytest.mark.django_db
def test_the_second_worked_example():
    site = SiteFactory(name="Example DC", currency="USD", gpu_capex=Decimal("35064.00"), depreciation_months=48,
                       other_opex_gpu_hour=Decimal("0.50"), energy_price_kwh=Decimal("0.10"), pue=Decimal("1.5"))
    node = NodeFactory(site=site)
    gpu0 = GpuFactory(node=node, index=0)
    gpu1 = GpuFactory(node=node, index=1, mig_mode=True)
    four = MigInstance.objects.create(gpu=gpu1, gi_id=1, profile="4g.40gb")
    MigInstance.objects.create(gpu=gpu1, gi_id=2, profile="3g.40gb")
    plan = Plan.objects.create(name="Example plan", tokens_per_minute=10**7, gpus=8)
    book = PriceBook.objects.create(plan=plan, currency="USD")
    ModelPrice.objects.create(book=book, model_name="example/model", effective_from=date(2026, 11, 1),
                              input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60"))
    acme, globex = TenantFactory(name="Acme", plan=plan), TenantFactory(name="Globex", plan=plan)
    handover = H + timedelta(minutes=30)
    url0, url1 = "http://127.0.0.1:8000/metrics", "http://127.0.0.1:8001/metrics"
    a0 = allocation_create(tenant=acme, gpu=gpu0, starts_at=H - timedelta(days=1), ends_at=handover)
    g0 = allocation_create(tenant=globex, gpu=gpu0, starts_at=handover)
    a1 = allocation_create(tenant=acme, gpu=gpu1, mig_instance=four, starts_at=H - timedelta(days=1))
    acme_first = deployment_create(tenant=acme, name="acme-0", model_name="example/model", engine="vllm", node=node,
                                   metrics_url=url0, allocations=[a0], active_from=H - timedelta(days=1))
    deployment_end(deployment=acme_first, at=handover)
    deployment_create(tenant=globex, name="globex-0", model_name="example/model", engine="vllm", node=node,
                      metrics_url=url0, allocations=[g0], active_from=handover)
    deployment_create(tenant=acme, name="acme-mig", model_name="example/model", engine="vllm", node=node,
                      metrics_url=url1, allocations=[a1], active_from=H - timedelta(days=1))
    ep0 = ServingEndpoint.objects.create(node=node, url=url0, model="example/model", engine="vllm")
    ep1 = ServingEndpoint.objects.create(node=node, url=url1, model="example/model", engine="vllm")
    # The usage tiers as the rollups leave them: minutes, and hours that sum them.
    for endpoint, ts, prompt, generation in ((ep0, H + timedelta(minutes=10), 3_000_000, 1_000_000),
                                             (ep0, H + timedelta(minutes=40), 2_000_000, 500_000),
                                             (ep1, H + timedelta(minutes=5), 1_000_000, 400_000),
                                             (ep1, H + timedelta(minutes=65), 1_000_000, 400_000)):
        UsageMinute.objects.create(endpoint=endpoint, ts=ts, prompt_tokens=prompt, generation_tokens=generation)
    UsageHour.objects.create(endpoint=ep0, ts=H, prompt_tokens=5_000_000, generation_tokens=1_500_000)
    for hour in (H, H + timedelta(hours=1)):
        UsageHour.objects.create(endpoint=ep1, ts=hour, prompt_tokens=1_000_000, generation_tokens=400_000)
        GpuHour.objects.create(gpu=gpu1, ts=hour, seconds=3600, util_mean=50.0, energy_mj=KWH * 8 // 10)
    GpuHour.objects.create(gpu=gpu0, ts=H, seconds=3600, util_mean=60.0, energy_mj=KWH * 12 // 10)  # 13:00 silent
    hours = [H, H + timedelta(hours=1)]
    rollup_site_hours(hours=hours)
    cost_hours_attribute(hours=hours, now=H + timedelta(days=1))
    span = (H, H + timedelta(hours=2))
    four_dp = Decimal("0.0001")

    attributed = attributed_costs(start=span[0], end=span[1])
    assert attributed[(site.pk, acme.pk)].total.quantize(four_dp) == Decimal("2.6914")
    assert attributed[(site.pk, globex.pk)].total == Decimal("2.34")
    assert attributed[(site.pk, None)].total.quantize(four_dp) == Decimal("1.3886")
    silent = attributed_costs(start=span[0] + timedelta(hours=1), end=span[1])[(site.pk, globex.pk)]
    assert silent.total == Decimal("1.50") and silent.energy == 0
    (period,) = site_costs(start=span[0], end=span[1])
    assert period.cost.total == Decimal("6.42")
    assert period.cost.tokens == 9_300_000 and period.cost.per_million_tokens == Decimal("0.6903")
    assert period.cost.utilization == pytest.approx(0.40)

    costs = deployment_costs(start=span[0], end=span[1])
    tenants = {row[0]: row[2] for row in tenant_economics(start=span[0], end=span[1], costs=costs) if row[0]}
    assert tenants[acme].tokens == 6_800_000 and tenants[globex].tokens == 2_500_000
    assert tenants[acme].per_million_tokens == Decimal("0.3958")
    assert tenants[globex].per_million_tokens == Decimal("0.9360")
    for tenant, tokens in ((acme, 6_800_000), (globex, 2_500_000)):
        usage = usage_for_tenant(tenant=tenant, start=span[0], end=span[1], by_day=False, now=H + timedelta(days=1))
        assert sum(line.tokens for line in usage) == tokens  # economics = usage, minute by minute

    (pnl,) = site_pnl(start=datetime(2026, 11, 1, tzinfo=UTC), end=span[1], now=H + timedelta(days=1))
    assert pnl.revenue == {"USD": Decimal("2.43")}
    invoices = [invoice_refresh_draft(tenant=t, period_start=date(2026, 11, 1), now=span[1]) for t in (acme, globex)]
    assert [i.total for i in invoices] == [Decimal("1.83"), Decimal("0.60")]
    assert pnl.revenue["USD"] == sum(i.total for i in invoices)
    assert pnl.margin == Decimal("2.43") - pnl.cost.total  # -3.99 over these two hours
    assert (Decimal("2.43") - period.cost.total) == Decimal("-3.99")
