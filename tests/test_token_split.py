"""Input vs output cost (issue 18): the split rule against hand-computed values and under hypothesis, the phase
times from an agent's batch to the deployment tier, and the page that sets them against the price book."""

import json
import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portal.billing.models import ModelPrice, PriceBook
from portal.capacity.services import allocation_create, deployment_create
from portal.economics.models import DeploymentHour
from portal.economics.selectors import deployment_costs
from portal.economics.services import cost_hours_attribute
from portal.economics.split import SplitRule, cost_split
from portal.economics.token_types import token_type_costs
from portal.fleet.models import Gpu, ServingEndpoint
from portal.telemetry.models import UsageHour, UsageMinute
from portal.telemetry.rollups import rollup_minutes
from portal.telemetry.store import batches_store
from portal.tenants.models import Plan
from tests.factories import (
    GpuFactory,
    NodeFactory,
    OperatorFactory,
    SiteFactory,
    TenantFactory,
    batch_payload,
    engine_payload,
    gpu_payload,
    gpu_uuid,
    node_with_credential,
)

INGEST = "/api/v1/agent/ingest"


def test_it_splits_by_measured_time():
    # 1 s of prefill and 3 s of decode: a quarter of 10.00 goes to the 2,000,000 input tokens.
    split = cost_split(cost=Decimal("10.00"), input_tokens=2_000_000, output_tokens=500_000, prefill_seconds=1.0,
                       decode_seconds=3.0, rule=SplitRule.TIME)
    assert (split.input_cost, split.output_cost) == (Decimal("2.5000"), Decimal("7.5000"))
    assert (split.input_per_million, split.output_per_million) == (Decimal("1.2500"), Decimal("15.0000"))
    assert split.measured_tokens == 2_500_000 and split.prefill_share == 0.25


def test_it_falls_back_to_token_counts_where_the_engine_exports_no_phase_times():
    split = cost_split(cost=Decimal("10.00"), input_tokens=3_000_000, output_tokens=1_000_000, prefill_seconds=0.0,
                       decode_seconds=0.0, rule=SplitRule.TIME)
    assert (split.input_cost, split.output_cost) == (Decimal("7.500"), Decimal("2.500"))
    assert split.measured_tokens == 0 and split.measured_share == 0.0 and split.prefill_share is None
    # Every token the same: 2.50 per million of each.
    assert split.input_per_million == split.output_per_million == Decimal("2.5000")


def test_it_weights_output_tokens_as_the_operator_says():
    # Output weighs 4: 3,000,000 input vs 4 x 1,000,000 output -> 3/7 of 14.00 = 6.00 to input.
    split = cost_split(cost=Decimal("14.00"), input_tokens=3_000_000, output_tokens=1_000_000, prefill_seconds=9.0,
                       decode_seconds=1.0, rule=SplitRule.WEIGHTED, output_weight=Decimal(4))
    assert split.input_cost.quantize(Decimal("0.000001")) == Decimal("6.000000")
    assert split.output_per_million == Decimal("8.0000") and split.input_per_million == Decimal("2.0000")


@given(cost=st.decimals(min_value=0, max_value=10**9, places=8),
       tokens=st.tuples(st.integers(0, 10**12), st.integers(0, 10**12)),
       seconds=st.tuples(st.floats(0, 1e9), st.floats(0, 1e9)),
       rule=st.sampled_from(list(SplitRule)), weight=st.decimals(min_value="0.1", max_value=100, places=2))
def test_the_two_parts_always_add_up_to_the_cost(cost, tokens, seconds, rule, weight):
    split = cost_split(cost=cost, input_tokens=tokens[0], output_tokens=tokens[1], prefill_seconds=seconds[0],
                       decode_seconds=seconds[1], rule=rule, output_weight=weight)
    assert split.input_cost + split.output_cost == cost
    assert split.input_cost >= 0 and split.output_cost >= 0
    assert (split.input_tokens, split.output_tokens) == tokens


def _phase(total: float, n: int) -> dict:
    return {"le": [0.3, 0.5, 1.0], "counts": [0, 0, n, n], "sum": total}


@pytest.mark.django_db
def test_it_carries_phase_times_from_the_agent_to_the_deployment_tier(client):
    """Two intervals of one vLLM endpoint, posted as an agent would: the deployment's hour holds the sums of their
    prefill and decode histograms, and the split uses them."""
    clock = time.time()
    hour = datetime.fromtimestamp(clock, tz=UTC).replace(minute=0, second=0, microsecond=0)
    # Both intervals inside this hour (near its start, they run up to 20 s ahead: the accept step allows 5 min).
    end = max(hour.timestamp(), clock - 120)
    node, credential = node_with_credential(installed_at=hour - timedelta(days=2))
    uuid = gpu_uuid()
    for seq, (prefill, decode) in enumerate(((1.5, 4.5), (0.5, 1.5)), start=1):
        engine = engine_payload(prefill=_phase(prefill, 5), decode=_phase(decode, 5))
        body = batch_payload(seq=seq, gpus=[gpu_payload(uuid=uuid)], engines=[engine], end=end + 10 * seq)
        response = client.post(INGEST, data=json.dumps(body), content_type="application/json",
                               HTTP_AUTHORIZATION=f"Bearer {credential}")
        assert response.json()["status"] == "stored", response.content
    assert batches_store() == 2
    rollup_minutes(now=datetime.fromtimestamp(end + 200, tz=UTC))
    assert sum(m.prefill["sum"] for m in UsageMinute.objects.all()) == 2.0
    # The GPU came into service before this hour (the agent first reported it just now).
    Gpu.objects.filter(uuid=uuid).update(installed_at=hour - timedelta(days=2))
    tenant = TenantFactory()
    allocation = allocation_create(tenant=tenant, gpu=Gpu.objects.get(uuid=uuid), starts_at=hour - timedelta(days=1))
    deployment_create(tenant=tenant, name="llama", model_name="meta-llama/Llama-3.1-8B-Instruct", engine="vllm",
                      node=node, metrics_url="http://127.0.0.1:8000/metrics", allocations=[allocation],
                      active_from=hour - timedelta(days=1))
    now = datetime.fromtimestamp(end + 200, tz=UTC)
    cost_hours_attribute(hours=[hour, hour + timedelta(hours=1)], now=now)
    rows = DeploymentHour.objects.filter(prompt_tokens__gt=0)
    assert [(r.prompt_tokens, r.prefill_seconds, r.decode_seconds) for r in rows] == [(2000, 2.0, 6.0)]
    [c] = [c for c in deployment_costs(start=hour, end=now) if c.cost.tokens]
    split = c.split(rule=SplitRule.TIME, output_weight=Decimal(1))
    # A quarter of the time in prefill: a quarter of the cost to the 2,000 input tokens.
    assert split.input_cost == c.cost.total / 4 and split.measured_tokens == 2500


# Days ago, so the pages' periods (the last 7 or 30 days) hold it whenever the suite runs.
H = (datetime.now(UTC) - timedelta(days=5)).replace(minute=0, second=0, microsecond=0)


def _priced_pair():
    """One H100 for an hour, 3,000 x 10^6 input and 1,000 x 10^6 output tokens, 20 s prefill, 80 s decode, on a
    plan that charges 0.10 per million input and 0.90 per million output tokens."""
    site = SiteFactory(currency="USD", gpu_capex=Decimal("30000"), depreciation_months=48,
                       other_opex_gpu_hour=Decimal("0.5"), energy_price_kwh=Decimal("0"))
    node = NodeFactory(site=site)
    gpu = GpuFactory(node=node, uuid=gpu_uuid(), index=0)
    plan = Plan.objects.create(name="Standard")
    book = PriceBook.objects.create(plan=plan, currency="USD")
    ModelPrice.objects.create(book=book, model_name="m", effective_from=date(2026, 1, 1),
                              input_per_mtok=Decimal("0.10"), output_per_mtok=Decimal("0.90"))
    tenant = TenantFactory(plan=plan)
    allocation = allocation_create(tenant=tenant, gpu=gpu, starts_at=H - timedelta(days=1))
    deployment = deployment_create(tenant=tenant, name="m on node", model_name="m", engine="vllm", node=node,
                                   metrics_url="http://127.0.0.1:8000/metrics", allocations=[allocation],
                                   active_from=H - timedelta(days=1))
    endpoint = ServingEndpoint.objects.create(node=node, url=deployment.metrics_url, model="m", engine="vllm")
    UsageHour.objects.create(endpoint=endpoint, ts=H, prompt_tokens=3_000_000_000, generation_tokens=1_000_000_000,
                             prefill=_phase(20.0, 9), decode=_phase(80.0, 9))
    cost_hours_attribute(hours=[H], now=H + timedelta(hours=1))
    return deployment


@pytest.mark.django_db
def test_it_sets_each_token_type_against_the_price_book():
    _priced_pair()
    costs = deployment_costs(start=H, end=H + timedelta(hours=1))
    [c] = costs
    # An hour of the GPU: 30000 / (48 x 730.5) + 0.5 = 1.35557837 (8 places, as stored).
    assert c.cost.total == Decimal("1.35557837")
    types = token_type_costs(costs=costs, rule=SplitRule.TIME, output_weight=Decimal(1), end=H + timedelta(hours=1))
    [model] = types.models
    # 20 % of the time in prefill: 0.27111567 over 3,000 M input, 1.08446270 over 1,000 M output.
    assert (model.split.input_per_million, model.split.output_per_million) == (Decimal("0.0001"), Decimal("0.0011"))
    [line] = types.deployments
    assert line.price.input_per_mtok == Decimal("0.10")
    assert round(line.output_margin, 4) == round(float((Decimal("0.90") - Decimal("0.0011")) / Decimal("0.90")), 4)


@pytest.mark.django_db
def test_it_shows_the_split_and_the_prices_on_the_page(client):
    _priced_pair()
    client.force_login(OperatorFactory())
    page = client.get("/economics/token-types/?period=7d&rule=weighted&weight=4")
    html = page.content.decode()
    assert "one output token weighs 4 input tokens" in html
    # Weighted 4: input share 3,000 / (3,000 + 4 x 1,000) = 3/7 of 1.35557837 = 0.58096216 over 3,000 M input
    # tokens is 0.0002 per million; the other 0.77461621 over 1,000 M output tokens 0.0008.
    row = html[html.index('data-model="m"'):]
    row = row[:row.index("</tr>")]
    assert '<td data-testid="input-per-mtok">USD 0.0002</td>' in row
    assert '<td data-testid="output-per-mtok">USD 0.0008</td>' in row
    assert "USD 0.9000" in html  # the price book's output price beside it
    bad = client.get("/economics/token-types/?rule=bogus")
    assert bad.status_code == 400 and "rule" in bad.content.decode()
