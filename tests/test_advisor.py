"""The tokens-per-dollar advisor (issue 18): on a seeded pair of deployments that differ in one setting, the
difference it states is the hand-computed one, resting on the hours measured."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from portal.capacity.services import allocation_create, deployment_create
from portal.economics.advisor import tokens_per_dollar_advice
from portal.economics.selectors import deployment_costs
from portal.economics.services import cost_hours_attribute
from portal.fleet.models import ServingEndpoint
from portal.sla.models import SlaObjective, SlaPolicy
from portal.telemetry.models import UsageHour
from tests.factories import GpuFactory, NodeFactory, OperatorFactory, SiteFactory, TenantFactory, gpu_uuid

pytestmark = pytest.mark.django_db

START = (datetime.now(UTC) - timedelta(days=3)).replace(hour=0, minute=0, second=0, microsecond=0)
END = START + timedelta(days=1)
BASE = {"precision": "bf16", "kv_cache_dtype": "auto", "max_batch_size": "128"}


def _deployment(site, tenant, port: int, settings: dict, output_per_hour: int, hours: int):
    node = NodeFactory(site=site, installed_at=START - timedelta(days=2))
    gpu = GpuFactory(node=node, uuid=gpu_uuid(), index=0, name="NVIDIA H100 80GB HBM3")
    allocation = allocation_create(tenant=tenant, gpu=gpu, starts_at=START - timedelta(days=1))
    url = f"http://127.0.0.1:{port}/metrics"
    deployment = deployment_create(tenant=tenant, name=f"llama {port}", model_name="llama", engine="vllm",
                                   node=node, metrics_url=url, allocations=[allocation],
                                   active_from=START - timedelta(days=1), settings=settings)
    endpoint = ServingEndpoint.objects.create(node=node, url=url, model="llama", engine="vllm")
    # Every request within the targets: goodput is equal (and whole) on both sides.
    within = {"le": [0.5, 1.0], "counts": [100, 100, 100], "sum": 20.0}
    UsageHour.objects.bulk_create(
        UsageHour(endpoint=endpoint, ts=START + timedelta(hours=h), prompt_tokens=3 * output_per_hour,
                  generation_tokens=output_per_hour, requests_ok=100, ttft=within, e2e=within)
        for h in range(hours))
    return deployment


@pytest.fixture
def pair():
    """Two H100s at one site where a GPU-hour costs 30000 / (48 x 730.5) + 0.5 = 1.35557837 (no energy price):
    bf16 with an auto KV cache makes 1,000,000 output tokens an hour, the same with an FP8 KV cache 1,380,000;
    a third configuration (FP8 weights too) ran 10 hours only."""
    site = SiteFactory(currency="USD", gpu_capex=Decimal("30000"), depreciation_months=48,
                       other_opex_gpu_hour=Decimal("0.5"), energy_price_kwh=Decimal("0"))
    tenant = TenantFactory(name="Globex")
    policy = SlaPolicy.objects.create(name="Globex SLA", tenant=tenant)
    SlaObjective.objects.create(policy=policy, sli="ttft_p95", target=Decimal("0.5"))
    _deployment(site, tenant, 8000, BASE, 1_000_000, 24)
    _deployment(site, tenant, 8001, {**BASE, "kv_cache_dtype": "fp8_e4m3"}, 1_380_000, 24)
    _deployment(site, tenant, 8002, {**BASE, "kv_cache_dtype": "fp8_e4m3", "precision": "fp8"}, 1_600_000, 10)
    cost_hours_attribute(hours=[START + timedelta(hours=h) for h in range(24)], now=END)


def test_it_states_what_one_setting_changed(pair):
    [advice] = tokens_per_dollar_advice(costs=deployment_costs(start=START, end=END), start=START, end=END, now=END)
    assert (advice.model_name, advice.gpu_name, advice.currency) == ("llama", "NVIDIA H100 80GB HBM3", "USD")
    by_setting = {f.setting: f for f in advice.findings}
    kv = by_setting["KV cache"]
    assert (kv.before, kv.after) == ("auto", "fp8_e4m3")
    # 24,000,000 and 33,120,000 output tokens for 24 x 1.35557837 each: 737,692 and 1,018,015 per USD.
    assert (kv.a.output_per_unit, kv.b.output_per_unit) == (737_692, 1_018_015)
    assert kv.change == pytest.approx(1_018_015 / 737_692 - 1)
    assert round(kv.change, 3) == 0.380
    assert kv.equal_goodput and kv.a.goodput == kv.b.goodput == 1.0
    assert (kv.a.hours, kv.b.hours) == (24, 24) and kv.enough_hours
    # The third served 10 of the day's 24 hours it held its GPU: fewer tokens per USD, and too few hours.
    weights = by_setting["Weights"]
    assert (weights.before, weights.after, weights.a.hours, weights.b.hours) == ("fp8", "bf16", 10, 24)
    assert not weights.enough_hours
    # auto vs FP8 weights and KV cache differ in two settings: no difference is put down to either.
    assert len(advice.findings) == 2


def test_the_page_says_it_in_words(pair, client):
    client.force_login(OperatorFactory())
    html = " ".join(client.get("/economics/advisor/?period=7d").content.decode().split())
    assert ("KV cache auto → fp8_e4m3: +38.0% output tokens per USD</strong> at equal goodput (100.0% vs 100.0%) "
            "on this fleet; 24 and 24 deployment-hours measured.") in html
    assert "Weights fp8 → bf16: too few hours to say (10 and 24 measured, 24 needed on each side)." in html
