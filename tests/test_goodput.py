"""Live goodput (issue 18): the share of requests within a latency target from merged histogram buckets, checked
against numpy on the raw latencies, per hour and deployment against hand-computed values, and on the pages."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import numpy as np
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from hypothesis import given
from hypothesis import strategies as st

from portal.capacity.services import allocation_create, deployment_create
from portal.fleet.models import ServingEndpoint
from portal.sla.goodput import fleet_goodput_now, tenant_goodput
from portal.sla.models import SlaObjective, SlaPolicy
from portal.telemetry.histograms import quantile, share_at_most
from portal.telemetry.models import UsageHour, UsageMinute
from tests.factories import GpuFactory, NodeFactory, OperatorFactory, TenantFactory, admin_of, gpu_uuid

BOUNDS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


def bucketed(latencies: np.ndarray, bounds: list[float]) -> dict:
    """What an engine exports for these observations: cumulative counts per bound, then +Inf."""
    counts = [int(np.count_nonzero(latencies <= b)) for b in bounds] + [len(latencies)]
    return {"le": bounds, "counts": counts, "sum": float(latencies.sum())}


def test_it_matches_numpy_on_the_raw_latencies():
    latencies = np.random.default_rng(18).lognormal(mean=np.log(0.3), sigma=0.8, size=20_000)
    h = bucketed(latencies, BOUNDS)
    # At a bucket bound the share is exact: the buckets count exactly the observations at most it.
    for bound in BOUNDS:
        assert share_at_most(bound, h) == pytest.approx(np.mean(latencies <= bound), abs=1e-12)
    # Inside a bucket it interpolates linearly, as histogram_quantile does, and stays within the bucket's edges.
    target = 0.4
    lo, hi = np.mean(latencies <= 0.25), np.mean(latencies <= 0.5)
    assert share_at_most(target, h) == pytest.approx(lo + (hi - lo) * (0.4 - 0.25) / (0.5 - 0.25))
    assert lo < share_at_most(target, h) < hi
    assert abs(share_at_most(target, h) - np.mean(latencies <= target)) < hi - lo
    # Beyond the highest finite bound only what the buckets prove is counted.
    assert share_at_most(10.0, h) == pytest.approx(np.mean(latencies <= 2.5))
    assert share_at_most(0.3, None) is None and share_at_most(0.3, bucketed(np.array([]), BOUNDS)) is None


@given(st.lists(st.integers(1, 1000), min_size=len(BOUNDS), max_size=len(BOUNDS)), st.integers(0, 1000),
       st.floats(0.0, 1.0))
def test_it_is_the_inverse_of_the_quantile(per_bucket, overflow, q):
    """share_at_most(quantile(q)) gives q back wherever the quantile falls inside a finite bucket."""
    counts = list(np.cumsum(per_bucket))
    h = {"le": BOUNDS, "counts": [*counts, counts[-1] + overflow], "sum": 0.0}
    if q * h["counts"][-1] <= counts[-1]:
        assert share_at_most(quantile(q, h), h) == pytest.approx(q, abs=1e-9)


# Days ago, so the pages' periods (the last 7 or 30 days) hold it whenever the suite runs.
H = (datetime.now(UTC) - timedelta(days=5)).replace(minute=0, second=0, microsecond=0)


def hist(counts: list[int]) -> dict:
    return {"le": [0.25, 0.5, 1.0], "counts": counts, "sum": 1.0}


@pytest.fixture
def served():
    """A tenant promised TTFT p95 <= 0.5 s and E2E p99 <= 1.0 s, one deployment, two hours of traffic."""
    tenant = TenantFactory(name="Acme")
    policy = SlaPolicy.objects.create(name="Acme SLA", tenant=tenant)
    for sli, target in (("ttft_p95", "0.5"), ("e2e_p99", "1.0"), ("availability", "99.9")):
        SlaObjective.objects.create(policy=policy, sli=sli, target=Decimal(target))
    node = NodeFactory(installed_at=H - timedelta(days=3))
    gpu = GpuFactory(node=node, uuid=gpu_uuid(), index=0)
    allocation = allocation_create(tenant=tenant, gpu=gpu, starts_at=H - timedelta(days=1))
    url = "http://127.0.0.1:8000/metrics"
    deployment = deployment_create(tenant=tenant, name="llama on n1", model_name="llama", engine="vllm", node=node,
                                   metrics_url=url, allocations=[allocation], active_from=H - timedelta(days=1))
    endpoint = ServingEndpoint.objects.create(node=node, url=url, model="llama", engine="vllm")
    # Hour 1: 100 requests (2 failed), 80 with TTFT <= 0.5 s, 90 within 1.0 s end to end; 10,000 tokens.
    UsageHour.objects.create(endpoint=endpoint, ts=H, prompt_tokens=8_000, generation_tokens=2_000, requests_ok=98,
                             requests_failed=2, ttft=hist([40, 80, 95, 100]), e2e=hist([10, 50, 90, 100]))
    # Hour 2: 50 requests, all fine: TTFT 50 within 0.5 s, E2E 45 within 1.0 s; 5,000 tokens.
    UsageHour.objects.create(endpoint=endpoint, ts=H + timedelta(hours=1), prompt_tokens=4_000,
                             generation_tokens=1_000, requests_ok=50, ttft=hist([30, 50, 50, 50]),
                             e2e=hist([5, 20, 45, 50]))
    return tenant, deployment, endpoint


@pytest.mark.django_db
def test_it_measures_each_target_per_hour_and_deployment(served):
    tenant, deployment, _endpoint = served
    g = tenant_goodput(tenant=tenant, start=H, end=H + timedelta(hours=2), now=H + timedelta(days=1))
    assert g.targets == {"ttft_p95": 0.5, "e2e_p99": 1.0}  # availability is not a latency
    (h1, first), (h2, second) = g.hours
    assert (h1, h2) == (H, H + timedelta(hours=1))
    # 80 of 100 within 0.5 s, x 98 of 100 succeeded; 90 % x 0.98 end to end. Good tokens: 10,000 x the lower.
    assert first.shares == {"ttft_p95": pytest.approx(0.784), "e2e_p99": pytest.approx(0.882)}
    assert first.good_tokens == 7_840
    assert second.shares == {"ttft_p95": pytest.approx(1.0), "e2e_p99": pytest.approx(0.9)}
    assert second.good_tokens == 4_500
    # The period: 130 of 150 within 0.5 s, 135 within 1.0 s, 148 of 150 succeeded.
    [(d, whole)] = g.deployments
    assert d == deployment
    assert whole.shares["ttft_p95"] == pytest.approx(130 / 150 * 148 / 150)
    assert whole.good_tokens == int(15_000 * 130 / 150 * 148 / 150)
    assert g.total.tokens == 15_000


@pytest.mark.django_db
def test_the_fleet_headline_counts_tokens_that_met_their_targets(served):
    _tenant, _deployment, endpoint = served
    now = H + timedelta(hours=21, minutes=30, seconds=20)
    minute = now.replace(second=0) - timedelta(minutes=2)
    UsageMinute.objects.create(endpoint=endpoint, ts=minute, prompt_tokens=4_800, generation_tokens=1_200,
                               requests_ok=10, ttft=hist([5, 9, 10, 10]), e2e=hist([1, 5, 8, 10]))
    fleet = fleet_goodput_now(tokens_per_s=150.0, now=now)
    # 6,000 tokens in the minute; the lower share is E2E: 8 of 10, so 4,800 good tokens. Of 150 tokens/s now,
    # 80 % met their targets.
    assert fleet.minute == minute
    assert (fleet.good_tokens, fleet.measured_tokens, fleet.unmeasured_tokens) == (4_800, 6_000, 0)
    assert fleet.share == 0.8 and fleet.good_tokens_per_s == 120.0
    # Tokens of a tenant without latency targets are not known to have met any: they lower the fleet's figure.
    other = TenantFactory(name="Initech")
    gpu = GpuFactory(node=endpoint.node, uuid=gpu_uuid(), index=1)
    url = "http://127.0.0.1:8001/metrics"
    deployment_create(tenant=other, name="qwen", model_name="qwen", engine="vllm", node=endpoint.node,
                      metrics_url=url, allocations=[allocation_create(tenant=other, gpu=gpu,
                                                                      starts_at=H - timedelta(days=1))],
                      active_from=H - timedelta(days=1))
    unmeasured = ServingEndpoint.objects.create(node=endpoint.node, url=url, model="qwen", engine="vllm")
    UsageMinute.objects.create(endpoint=unmeasured, ts=minute, prompt_tokens=1_500, generation_tokens=500)
    fleet = fleet_goodput_now(tokens_per_s=150.0, now=now)
    assert (fleet.unmeasured_tokens, fleet.share) == (2_000, 0.8)
    assert fleet.good_tokens_per_s == 150.0 * 4_800 / 8_000


@pytest.mark.django_db
def test_the_tenant_and_the_operator_read_it_on_the_sla_pages(served, client):
    tenant, _deployment, _endpoint = served
    client.force_login(admin_of(tenant))
    html = client.get(f"/tenant/{tenant.slug}/sla/?days=30").content.decode()
    assert 'data-testid="goodput-table"' in html
    row = html[html.index('data-deployment="llama on n1"'):]
    row = row[:row.index("</tr>")]
    # Whole period: TTFT 130/150 x 148/150 = 85.5 %, E2E 135/150 x 148/150 = 88.8 %.
    assert '<td class="num" data-testid="goodput-ttft_p95">85.5%</td>' in row
    assert '<td class="num" data-testid="goodput-e2e_p99">88.8%</td>' in row
    client.force_login(OperatorFactory())
    html = client.get(f"/sla/tenants/{tenant.slug}/?days=30").content.decode()
    assert '<td class="num" data-testid="goodput-ttft_p95">85.5%</td>' in html


@pytest.mark.django_db
def test_the_fleet_headline_reads_the_same_queries_however_many_tenants(served):
    _tenant, _deployment, endpoint = served
    now = H + timedelta(hours=21)

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            fleet_goodput_now(tokens_per_s=100.0, now=now)
        return len(captured)

    one = queries()
    for port, name in ((8101, "Globex"), (8102, "Initech")):
        tenant = TenantFactory(name=name)
        policy = SlaPolicy.objects.create(name=f"{name} SLA", tenant=tenant)
        SlaObjective.objects.create(policy=policy, sli="ttft_p95", target=Decimal("0.5"))
        gpu = GpuFactory(node=endpoint.node, uuid=gpu_uuid(), index=port)
        allocation = allocation_create(tenant=tenant, gpu=gpu, starts_at=H - timedelta(days=1))
        deployment_create(tenant=tenant, name=f"{name} llama", model_name="llama", engine="vllm", node=endpoint.node,
                          metrics_url=f"http://127.0.0.1:{port}/metrics", allocations=[allocation],
                          active_from=H - timedelta(days=1))
    assert queries() == one
