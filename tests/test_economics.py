from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db.models import F, Sum
from hypothesis import given, settings
from hypothesis import strategies as st

from portal.capacity.models import Allocation
from portal.capacity.services import allocation_create, deployment_create
from portal.economics.attribution import attribute
from portal.economics.models import CostHour, DeploymentDay, DeploymentHour
from portal.economics.selectors import attributed_costs, deployment_costs, deployment_ranking, tenant_economics
from portal.economics.services import cost_hours_attribute
from portal.economics.whatif import scenario, site_model
from portal.fleet.models import MigInstance, ServingEndpoint, Site
from portal.fleet.selectors import GpuOnBooks
from portal.telemetry.models import GpuHour, SiteHour, UsageHour
from tests.factories import PASSWORD, GpuFactory, NodeFactory, OperatorFactory, SiteFactory, TenantFactory, gpu_uuid

H = datetime(2026, 11, 10, 12, tzinfo=UTC)


def fixed_site():
    return SiteFactory(gpu_capex=Decimal("35064"), depreciation_months=48, energy_price_kwh=Decimal("0.10"),
                       pue=Decimal("1.5"), other_opex_gpu_hour=Decimal("0.50"), currency="USD")


@pytest.mark.django_db
class TestAttribution:
    def test_it_splits_a_gpu_hour_between_holders_and_idle(self):
        # capex 35064 / (48 x 730.5) = 1.0000 per GPU-hour; opex 0.50; energy 2 kWh x 1.5 x 0.10 = 0.30.
        site = fixed_site()
        node = NodeFactory(site=site)
        gpu = GpuFactory(node=node, uuid=gpu_uuid(), index=0, name="H100", mig_mode=True)
        big = MigInstance.objects.create(gpu=gpu, gi_id=1, profile="4g.40gb")
        small = MigInstance.objects.create(gpu=gpu, gi_id=2, profile="3g.40gb")
        a, b = TenantFactory(), TenantFactory()
        allocation_create(tenant=a, gpu=gpu, mig_instance=big, starts_at=H - timedelta(days=1))
        allocation_create(tenant=b, gpu=gpu, mig_instance=small, starts_at=H + timedelta(minutes=30))
        GpuHour.objects.create(gpu=gpu, ts=H, seconds=3600, util_mean=60.0, energy_mj=2 * 3_600_000_000)
        cost_hours_attribute(hours=[H])
        rows = {r.tenant_id: r for r in CostHour.objects.filter(ts=H)}
        assert set(rows) == {a.pk, b.pk, None}
        per_gpu_hour = Decimal("1.00") + Decimal("0.50") + Decimal("0.30")
        assert rows[a.pk].gpu_hours == (Decimal(4) / 7).quantize(Decimal("0.00000001"))
        assert rows[b.pk].gpu_hours == (Decimal(3) / 7 / 2).quantize(Decimal("0.00000001"))
        assert sum(r.total for r in rows.values()) == pytest.approx(per_gpu_hour, abs=Decimal("0.0000001"))
        assert rows[None].total == pytest.approx(per_gpu_hour * Decimal(3) / 14, abs=Decimal("0.0000001"))
        # Idempotent: recomputing replaces the hour's rows with identical ones.
        before = sorted((r.tenant_id or 0, r.total) for r in CostHour.objects.all())
        cost_hours_attribute(hours=[H])
        assert sorted((r.tenant_id or 0, r.total) for r in CostHour.objects.all()) == before

    def test_an_idle_gpu_without_readings_still_costs_its_fixed_part(self):
        site = fixed_site()
        GpuFactory(node=NodeFactory(site=site), uuid=gpu_uuid(), index=0, name="H100")
        cost_hours_attribute(hours=[H])
        (row,) = CostHour.objects.all()
        assert row.tenant_id is None and row.total == Decimal("1.50") and row.energy == 0
        cost = attributed_costs(start=H, end=H + timedelta(hours=1))[(site.pk, None)]
        assert cost.idle == Decimal("1.50")

    def test_deployments_are_ranked_by_tokens_per_unit_with_their_settings(self):
        site = fixed_site()
        node = NodeFactory(site=site)
        tenant = TenantFactory()
        gpus = [GpuFactory(node=node, uuid=gpu_uuid(), index=i, name="H100") for i in range(2)]
        deployments = []
        for i, (gpu, precision) in enumerate(zip(gpus, ("bf16", "fp8"), strict=True)):
            allocation = allocation_create(tenant=tenant, gpu=gpu, starts_at=H - timedelta(days=1))
            url = f"http://127.0.0.1:{8000 + i}/metrics"
            deployments.append(deployment_create(tenant=tenant, name=precision, model_name="m", engine="vllm",
                                                 node=node, metrics_url=url, allocations=[allocation],
                                                 settings={"precision": precision}, active_from=H - timedelta(days=1)))
            endpoint = ServingEndpoint.objects.create(node=node, url=url, model="m", engine="vllm")
            UsageHour.objects.create(endpoint=endpoint, ts=H, prompt_tokens=1_000_000 * (i + 1),
                                     generation_tokens=500_000 * (i + 1))
        cost_hours_attribute(hours=[H])
        costs = deployment_costs(start=H, end=H + timedelta(hours=1))
        lines = deployment_ranking(costs=costs)
        assert [line.deployment.name for line in lines] == ["fp8", "bf16"]
        assert [line.cost.tokens for line in lines] == [3_000_000, 1_500_000]
        assert lines[0].cost.total == Decimal("1.50") and lines[0].settings_label == "precision: fp8"
        assert lines[0].cost.per_million_tokens == Decimal("0.5000")
        (tenant_row,) = [row for row in tenant_economics(start=H, end=H + timedelta(hours=1), costs=costs) if row[0]]
        assert tenant_row[2].tokens == 4_500_000 and tenant_row[2].total == Decimal("3.00")

    def test_deployment_costs_over_any_period_equal_the_hour_tier(self):
        # Whole days come from DeploymentDay, the edges from DeploymentHour: for any period the sums must be those
        # of the hour tier alone, including a period ending inside a day whose later hours are attributed.
        node = NodeFactory(site=fixed_site())
        tenant = TenantFactory()
        day0 = datetime(2026, 11, 9, tzinfo=UTC)
        hours = [day0 + timedelta(hours=h) for h in range(72)]
        deployments = []
        for i in range(2):
            gpu = GpuFactory(node=node, uuid=gpu_uuid(), index=i, name="H100")
            allocation = allocation_create(tenant=tenant, gpu=gpu, starts_at=day0 + timedelta(hours=5 * i))
            url = f"http://127.0.0.1:{8000 + i}/metrics"
            deployments.append(deployment_create(tenant=tenant, name=f"d{i}", model_name="m", engine="vllm",
                                                 node=node, metrics_url=url, allocations=[allocation],
                                                 active_from=day0 + timedelta(hours=5 * i)))
            endpoint = ServingEndpoint.objects.create(node=node, url=url, model="m", engine="vllm")
            for n, ts in enumerate(hours):
                GpuHour.objects.create(gpu=gpu, ts=ts, seconds=3600, util_mean=(n * 7 + i * 13) % 100,
                                       energy_mj=(n % 5 + 1) * 1_000_000_000)
                UsageHour.objects.create(endpoint=endpoint, ts=ts, prompt_tokens=1000 * n + i,
                                         generation_tokens=300 * n)
        cost_hours_attribute(hours=hours)
        assert DeploymentDay.objects.count() == 6

        @given(st.integers(0, 72 * 60), st.integers(1, 72 * 60))
        @settings(max_examples=60, deadline=None)
        def check(offset_minutes, length_minutes):
            start = day0 + timedelta(minutes=offset_minutes)
            end = start + timedelta(minutes=length_minutes)
            expected = {r["deployment_id"]: r for r in DeploymentHour.objects.filter(ts__gte=start, ts__lt=end)
                        .values("deployment_id").annotate(t=Sum(F("prompt_tokens") + F("generation_tokens")),
                                                          c=Sum("capex"), e=Sum("energy"), b=Sum("busy_gpu_hours"))}
            got = {c.deployment_id: c.cost for c in deployment_costs(start=start, end=end)}
            assert set(got) == set(expected)
            for pk, cost in got.items():
                row = expected[pk]
                assert (cost.tokens, cost.capex, cost.energy, cost.busy_gpu_hours) == (
                    row["t"], row["c"], row["e"], row["b"])

        check()

    def test_the_page_shows_tenants_deployments_and_the_idle_line(self, client):
        client.login(username=OperatorFactory().username, password=PASSWORD)
        site = fixed_site()
        GpuFactory(node=NodeFactory(site=site), uuid=gpu_uuid(), index=0, name="H100")
        hour = (datetime.now(tz=UTC) - timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)
        cost_hours_attribute(hours=[hour])
        text = client.get("/economics/?period=7d").content.decode()
        assert "Idle capacity (not allocated)" in text and "USD 1.5000" in text


@given(st.lists(st.tuples(st.integers(0, 3599), st.integers(1, 3600), st.sampled_from([0, 1, 2, 3, 4])),
                max_size=4))
def test_the_shares_of_a_gpu_hour_always_sum_to_one(windows):
    """Non-overlapping holders (as the database guarantees), any MIG mix: shares add up to exactly 1."""
    profiles = {0: None, 1: "1g.10gb", 2: "2g.20gb", 3: "3g.40gb", 4: "1g.10gb"}
    allocations, used_slots = [], set()
    for n, (start, length, slot) in enumerate(windows):
        if slot in used_slots or (slot == 0 and used_slots) or 0 in used_slots:
            continue
        used_slots.add(slot)
        mig = MigInstance(pk=slot, gi_id=slot, profile=profiles[slot]) if slot else None
        allocations.append(Allocation(tenant_id=n + 1, gpu_id=1, mig_instance=mig,
                                      starts_at=H + timedelta(seconds=start),
                                      ends_at=H + timedelta(seconds=min(3600, start + length))))
    site = Site(pk=1, currency="USD", gpu_capex=Decimal("35064"), depreciation_months=48,
                energy_price_kwh=Decimal("0.10"), pue=Decimal("1.5"), other_opex_gpu_hour=Decimal("0.50"))
    gpu = GpuOnBooks(gpu_id=1, node_id=1, site_id=1, start=H - timedelta(days=1), end=None)
    result = attribute(hours=[H], now=H + timedelta(hours=2), sites={1: site}, gpus=[gpu], readings={},
                       allocations={1: allocations}, deployments_of={})
    shares = {tenant: values["gpu_hours"] for (_site, tenant, _ts), values in result.tenants.items()}
    assert sum(shares.values()) == 1
    assert all(share >= 0 for share in shares.values())


def site_with_history(base=H, batching: float = 0.0):
    """48 hours of 10 GPUs from 20 % to 80 % utilization: energy 0.1 + 0.6 x utilization kWh per GPU-hour, and
    1,000,000 tokens per busy GPU-hour (+ `batching` x utilization x 1,000,000 at higher load)."""
    site = fixed_site()
    for h in range(48):
        util = Decimal(str(round(0.2 + 0.6 * (h % 24) / 23, 6)))
        ts = base - timedelta(hours=48 - h)
        CostHour.objects.create(site=site, tenant=None, ts=ts, gpu_hours=10, busy_gpu_hours=util * 10,
                                energy_kwh=(Decimal("0.1") + Decimal("0.6") * util) * 10, capex=10, opex=5, energy=0)
        per_busy = 1_000_000 * (1 + batching * float(util))
        SiteHour.objects.create(site=site, ts=ts, prompt_tokens=int(float(util) * 10 * per_busy), generation_tokens=0)
    return site


@pytest.mark.django_db
class TestWhatIf:

    def test_it_fits_the_sites_own_costs_and_shows_the_utilization_effect(self):
        site = site_with_history()
        model = site_model(site=site, start=H - timedelta(days=3), end=H)
        assert model.kwh_idle == pytest.approx(0.1) and model.kwh_per_util == pytest.approx(0.6)
        assert model.tokens_per_busy_gpu_hour(0.5) == pytest.approx(1_000_000, rel=1e-6)
        assert model.tokens_per_busy_per_util == pytest.approx(0, abs=1)
        at_70 = scenario(model=model, utilization=0.7, allocation=1.0, price_per_million=Decimal("2.00"))
        # per GPU-hour: fixed 1.50 + (0.1 + 0.6 x 0.7) kWh x 1.5 x 0.10 = 1.578; tokens 700,000
        assert at_70.cost_per_million == Decimal("2.2543")
        half = Decimal("1.50") + (Decimal("0.1") + Decimal("0.3")) * Decimal("0.15")
        assert at_70.vs_half == pytest.approx(float(Decimal("2.2543") / (half / Decimal("0.5")) - 1), abs=1e-4)
        assert at_70.vs_half < -0.25  # a factory at 70% makes tokens far cheaper than one at 50%
        assert at_70.margin == (Decimal("2.00") - Decimal("2.2543")) / Decimal("2.00")
        capped = scenario(model=model, utilization=0.9, allocation=0.6, price_per_million=Decimal("2.00"))
        assert capped.utilization == 0.6 and capped.capped_from == 0.9
        assert at_70.capped_from is None and not at_70.outside_measured
        # Without a batching effect in the data, all of the change is the utilization effect.
        assert at_70.from_half.batching == pytest.approx(0, abs=1e-3)
        assert at_70.from_half.utilization_alone == pytest.approx(at_70.vs_half, abs=1e-4)

    def test_it_separates_the_batching_effect_and_says_what_a_40_percent_claim_rests_on(self):
        # Tokens per busy GPU-hour rise by half from 0 to 100 % load: the fleet's own larger batches.
        site = site_with_history(batching=0.5)
        model = site_model(site=site, start=H - timedelta(days=3), end=H)
        assert model.tokens_per_busy_per_util == pytest.approx(500_000, rel=1e-3)
        e = scenario(model=model, utilization=0.7, allocation=1.0, price_per_million=Decimal("2")).from_half
        fixed_alone = Decimal("1.50") + (Decimal("0.1") + Decimal("0.42")) * Decimal("0.15")
        half = Decimal("1.50") + Decimal("0.4") * Decimal("0.15")
        alone = float((fixed_alone / Decimal("0.7")) / (half / Decimal("0.5")) - 1)
        assert e.utilization_alone == pytest.approx(alone, abs=1e-3)  # about -23 %: at most 1 - 50/70
        assert -0.286 < e.utilization_alone < -0.2
        assert e.batching < -0.05 and e.total == pytest.approx(e.utilization_alone + e.batching)
        assert e.supports(0.40) is False and e.supports(0.25) is True

    def test_the_page_answers_the_sliders_with_a_partial(self, client):
        client.login(username=OperatorFactory().username, password=PASSWORD)
        site = site_with_history(base=datetime.now(tz=UTC).replace(minute=0, second=0, microsecond=0))
        response = client.get(f"/economics/what-if/?site={site.pk}&utilization=70&allocation=100&price=2",
                              HTTP_HX_REQUEST="true")
        text = response.content.decode()
        assert response.status_code == 200 and "<html" not in text
        assert 'data-testid="whatif-cost">USD' in text
        bad = client.get(f"/economics/what-if/?site={site.pk}&utilization=700&allocation=100&price=-1")
        assert bad.status_code == 400 and "utilization" in bad.content.decode()


@pytest.mark.django_db
def test_the_pnl_sets_revenue_from_price_books_against_attributed_cost(client):
    from portal.billing.models import ModelPrice, PriceBook
    from portal.economics.pnl import payback, site_pnl
    from portal.tenants.models import Plan

    site = fixed_site()  # 1.50 fixed per GPU-hour, 0.15 per kWh
    node = NodeFactory(site=site)
    plan = Plan.objects.create(name="Growth", tokens_per_minute=10**6, gpus=8)
    tenant = TenantFactory(plan=plan)
    book = PriceBook.objects.create(plan=plan, currency="USD")
    ModelPrice.objects.create(book=book, model_name="m", effective_from=H.date() - timedelta(days=1),
                              input_per_mtok=Decimal("0.10"), output_per_mtok=Decimal("0.40"))
    gpus = [GpuFactory(node=node, uuid=gpu_uuid(), index=i, name="H100") for i in range(2)]
    allocation = allocation_create(tenant=tenant, gpu=gpus[0], starts_at=H - timedelta(days=1))
    url = "http://127.0.0.1:8000/metrics"
    deployment_create(tenant=tenant, name="d", model_name="m", engine="vllm", node=node, metrics_url=url,
                      allocations=[allocation], active_from=H - timedelta(days=1))
    endpoint = ServingEndpoint.objects.create(node=node, url=url, model="m", engine="vllm")
    UsageHour.objects.create(endpoint=endpoint, ts=H, prompt_tokens=6_000_000, generation_tokens=2_000_000)
    GpuHour.objects.create(gpu=gpus[0], ts=H, seconds=3600, util_mean=80.0, energy_mj=2 * 3_600_000_000)
    cost_hours_attribute(hours=[H])
    (line,) = site_pnl(start=H, end=H + timedelta(hours=1))  # the month so far: the draft as of the hour's end
    # revenue 6 x 0.10 + 2 x 0.40 = 1.40; cost: 2 GPU-hours x 1.50 + 2 kWh x 0.15 = 3.30
    assert line.revenue == {"USD": Decimal("1.40")}
    assert line.cost.total == Decimal("3.30")
    assert line.margin == Decimal("-1.90") and line.cost.tokens == 8_000_000
    assert line.allocation_rate == 0.5 and line.cost.utilization == 0.4
    (site_payback,) = payback(now=H + timedelta(hours=1))
    assert site_payback.capex == Decimal("70128") and site_payback.months is None  # losing money: no payback
    client.login(username=OperatorFactory().username, password=PASSWORD)
    assert "Factory P&amp;L" in client.get("/economics/pnl/").content.decode()


@pytest.mark.django_db
def test_a_nodes_cost_kept_for_whole_days_follows_every_re_attribution(django_capture_on_commit_callbacks):
    from portal.economics.selectors import node_cost
    from portal.hours import hours_between

    site = fixed_site()
    start = H - timedelta(days=4, hours=5)  # four whole days and partial days at both ends
    node = NodeFactory(site=site, installed_at=start - timedelta(days=1))
    gpus = [GpuFactory(node=node, uuid=gpu_uuid(), index=i, name="H100", installed_at=node.installed_at)
            for i in range(2)]
    GpuHour.objects.bulk_create(GpuHour(gpu=g, ts=ts, seconds=3600, util_mean=50.0, energy_mj=3_600_000_000)
                                for g in gpus for ts in hours_between(start, H))
    hours = hours_between(start, H)
    cost_hours_attribute(hours=hours, now=H)

    def site_tier():  # the tier's rows are stored to 8 places; the node's figure is exact
        rows = CostHour.objects.filter(site=site, ts__gte=start, ts__lt=H)
        idle = rows.filter(tenant=None).aggregate(t=Sum(F("capex") + F("energy") + F("opex")))["t"]
        return cents(rows.aggregate(t=Sum(F("capex") + F("energy") + F("opex")))["t"]), cents(idle)

    def cents(value):
        return value.quantize(Decimal("0.01"))

    first = node_cost(node=node, start=start, end=H, through=H)
    assert (cents(first.total), cents(first.idle)) == site_tier() and first.idle == first.total  # none held
    assert node_cost(node=node, start=start, end=H, through=H) == first  # the whole days from the cache
    # Held for a day in the middle, recorded late: once re-attributed, the node's figure moves with the tier.
    held_from = (start + timedelta(days=2)).replace(hour=0)
    allocation_create(tenant=TenantFactory(), gpu=gpus[0], starts_at=held_from, ends_at=held_from + timedelta(days=1))
    with django_capture_on_commit_callbacks(execute=True):  # the day's new version counts once committed
        cost_hours_attribute(hours=hours_between(held_from, held_from + timedelta(days=1)), now=H)
    again = node_cost(node=node, start=start, end=H, through=H)
    assert (cents(again.total), cents(again.idle)) == site_tier()
    assert again.total == first.total and again.idle < first.idle
