"""SLAs: indicators from merged histogram buckets and probes, idempotent evaluation, breaches and alerts, pages."""

import json
from datetime import timedelta
from decimal import Decimal

import numpy as np
import pytest
from django.utils import timezone
from hypothesis import given, settings
from hypothesis import strategies as st

from portal.alerts.models import Alert
from portal.capacity.services import deployment_end
from portal.sla.models import SlaBreach, SlaEvaluation, SlaObjective, SlaPolicy, Sli, Window
from portal.sla.selectors import policy_for_tenant, sli_readings
from portal.sla.services import sla_alert_key, sla_evaluate_tenant
from portal.sla.tasks import evaluate_slas
from portal.telemetry.histograms import merge, quantile
from tests.factories import PASSWORD, MembershipFactory, OperatorFactory, TenantFactory, ViewerFactory
from tests.test_billing import LLAMA_8B, LLAMA_70B, T0, add_usage, served_tenant

LE = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


def histogram(samples, le=LE) -> dict:
    """Cumulative Prometheus buckets of the samples (value <= bound), +Inf last."""
    counts = [int(np.sum(np.asarray(samples) <= bound)) for bound in le] + [len(samples)]
    return {"le": list(le), "counts": counts, "sum": float(np.sum(samples))}


bounds = st.lists(st.floats(0.001, 100, allow_nan=False), min_size=1, max_size=10, unique=True).map(sorted)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), le=bounds, q=st.floats(0.01, 1.0), chunks=st.integers(1, 5))
def test_quantiles_from_merged_buckets_match_numpy_within_the_bucket_width(data, le, q, chunks):
    top = le[-1]
    samples = data.draw(st.lists(st.floats(0, top, allow_nan=False), min_size=1, max_size=300))
    # Split into per-minute deltas and merge them back, as the evaluation does.
    parts = [samples[i::chunks] for i in range(chunks)]
    merged = None
    for part in parts:
        merged = merge(merged, histogram(part, le) if part else None)
    estimate = quantile(q, merged)
    truth = float(np.quantile(samples, q, method="inverted_cdf"))  # the ceil(q*n)-th smallest sample
    i = int(np.searchsorted(le, truth, side="left"))  # the bucket holding it: le[i-1] < truth <= le[i]
    lower, upper = (le[i - 1] if i else 0.0), le[i]
    assert lower - 1e-9 <= estimate <= upper + 1e-9
    assert abs(estimate - truth) <= upper - lower + 1e-9


def test_a_rank_in_the_inf_bucket_returns_the_highest_finite_bound():
    assert quantile(0.99, histogram([0.01] * 90 + [9.0] * 10)) == LE[-1]
    assert quantile(0.5, histogram([])) is None


def usage(endpoint, ts, *, ttft=(), e2e=(), ok=0, failed=0, probes=0, up=0, minute=False):
    add_usage(endpoint, ts, 100, 100, minute=minute, requests_ok=ok, requests_failed=failed, probes=probes,
              probes_up=up, ttft=histogram(list(ttft)) if ttft else None, e2e=histogram(list(e2e)) if e2e else None)


def policy(tenant_or_plan, **targets) -> SlaPolicy:
    scope = {"tenant": tenant_or_plan} if hasattr(tenant_or_plan, "slug") else {"plan": tenant_or_plan}
    p = SlaPolicy.objects.create(name=f"policy-{tenant_or_plan.pk}-{len(scope)}", **scope)
    for sli, (target, window) in targets.items():
        SlaObjective.objects.create(policy=p, sli=sli, target=Decimal(target), window=window)
    return p


@pytest.mark.django_db
class TestReadings:
    def test_it_reads_quantiles_from_merged_buckets_and_probes_and_errors_of_live_deployments_only(self):
        tenant, eps = served_tenant(models=(LLAMA_8B, LLAMA_70B))
        end = T0 + timedelta(hours=3, minutes=30)  # whole hours from the hour tier, the edge from minutes
        usage(eps[LLAMA_8B], T0 + timedelta(hours=1), ttft=[0.04] * 50, ok=95, failed=5, probes=360, up=350)
        usage(eps[LLAMA_70B], T0 + timedelta(hours=2), ttft=[0.3] * 50, ok=100, probes=360, up=360)
        usage(eps[LLAMA_70B], T0 + timedelta(hours=3, minutes=10), ttft=[2.0] * 900, ok=900, minute=True)
        usage(eps[LLAMA_70B], T0 + timedelta(hours=4), ttft=[2.0] * 900, ok=900)  # after the window
        readings = sli_readings(tenant=tenant, start=T0, end=end, now=end + timedelta(days=1))
        # 1000 requests: 50 at 0.04, 50 at 0.3, 900 at 2.0. p95 = rank 950 in the (1.0, 2.5] bucket.
        assert readings[Sli.TTFT_P95].samples == 1000
        assert readings[Sli.TTFT_P95].value == pytest.approx(1.0 + 1.5 * (950 - 100) / 900)
        assert readings[Sli.ERROR_RATE].value == pytest.approx(100 * 5 / 1100)
        assert readings[Sli.AVAILABILITY].value == pytest.approx(100 * 710 / 720)
        assert readings[Sli.E2E_P99].value is None and readings[Sli.E2E_P99].samples == 0
        deployment_end(deployment=tenant.deployments.get(model_name=LLAMA_70B), at=T0 + timedelta(hours=2))
        readings = sli_readings(tenant=tenant, start=T0, end=end, now=end + timedelta(days=1))
        assert readings[Sli.TTFT_P95].samples == 50 and readings[Sli.ERROR_RATE].samples == 100
        assert sli_readings(tenant=TenantFactory(), start=T0, end=end)[Sli.TTFT_P95].value is None

    def test_a_tenant_override_replaces_its_plans_policy(self):
        tenant, _ = served_tenant()
        plan_policy = policy(tenant.plan, ttft_p95=("0.5", Window.HOUR))
        assert policy_for_tenant(tenant=tenant) == plan_policy
        override = policy(tenant, availability=("99.99", Window.DAY))
        assert policy_for_tenant(tenant=tenant) == override
        assert policy_for_tenant(tenant=TenantFactory(plan=None)) is None


@pytest.mark.django_db
class TestEvaluation:
    def test_it_records_breaches_raises_and_resolves_alerts_and_rerunning_writes_nothing(self):
        tenant, eps = served_tenant()
        policy(tenant.plan, ttft_p95=("0.5", Window.HOUR), availability=("99.5", Window.HOUR),
               error_rate=("1", Window.HOUR))
        ep = eps[LLAMA_8B]
        usage(ep, T0, ttft=[0.2] * 90 + [2.0] * 10, ok=100, probes=360, up=360)  # p95 in (1.0, 2.5]: missed
        usage(ep, T0 + timedelta(hours=1), ttft=[0.2] * 90 + [2.0] * 10, ok=100, probes=360, up=300)
        usage(ep, T0 + timedelta(hours=2), ttft=[0.2] * 100, ok=100, probes=360, up=360)
        end1, end2, end3 = (T0 + timedelta(hours=h) for h in (1, 2, 3))
        later = T0 + timedelta(days=1)

        written = sla_evaluate_tenant(tenant=tenant, window_end=end1, now=later)
        assert {(e.sli, e.compliant) for e in written} == {
            (Sli.TTFT_P95, False), (Sli.AVAILABILITY, True), (Sli.ERROR_RATE, True)}
        key = sla_alert_key(tenant=tenant, sli=Sli.TTFT_P95)
        alert = Alert.objects.get(key=key, resolved_at__isnull=True)
        assert alert.kind == "sla_breach" and alert.occurrences == 1 and tenant.name in alert.title
        assert sla_evaluate_tenant(tenant=tenant, window_end=end1, now=later) == []
        assert SlaEvaluation.objects.count() == 3 and Alert.objects.get(key=key).occurrences == 1

        sla_evaluate_tenant(tenant=tenant, window_end=end2, now=later)
        alert.refresh_from_db()
        breach = SlaBreach.objects.get(sli=Sli.TTFT_P95)
        assert alert.occurrences == 2 and breach.windows == 2 and breach.ended_at is None
        assert Alert.objects.filter(key=sla_alert_key(tenant=tenant, sli=Sli.AVAILABILITY),
                                    resolved_at__isnull=True).exists()

        sla_evaluate_tenant(tenant=tenant, window_end=end3, now=later)
        breach.refresh_from_db()
        assert breach.ended_at == end3 and breach.worst_value == pytest.approx(1.0 + 1.5 * 5 / 10)
        assert not Alert.objects.filter(key__startswith=f"sla:{tenant.pk}:", resolved_at__isnull=True).exists()
        assert SlaEvaluation.objects.count() == 9

    def test_a_window_without_traffic_is_no_data_not_a_breach(self):
        tenant, _ = served_tenant()
        policy(tenant.plan, e2e_p99=("10", Window.DAY))
        (evaluation,) = sla_evaluate_tenant(tenant=tenant, window_end=T0, now=T0)
        assert evaluation.value is None and evaluation.compliant is None
        assert not SlaBreach.objects.exists() and not Alert.objects.exists()

    def test_the_beat_task_evaluates_every_active_tenant_for_the_last_hour(self, django_capture_on_commit_callbacks):
        tenants = [served_tenant()[0] for _ in range(2)]
        for t in tenants:
            policy(t.plan, availability=("99", Window.HOUR))
        TenantFactory(status="pending")
        with django_capture_on_commit_callbacks(execute=True):
            assert evaluate_slas.delay((T0 + timedelta(hours=5)).isoformat()).get() == 2
        assert sorted(SlaEvaluation.objects.values_list("tenant_id", flat=True)) == [t.pk for t in tenants]
        assert set(SlaEvaluation.objects.values_list("window_end", flat=True)) == {T0 + timedelta(hours=5)}


@pytest.mark.django_db
class TestPages:
    def test_a_member_sees_its_compliance_with_a_chart_per_sli_against_its_target(self, client):
        tenant, eps = served_tenant()
        policy(tenant.plan, ttft_p95=("0.5", Window.HOUR))
        now = timezone.now().replace(minute=0, second=0, microsecond=0)
        for h in (3, 2, 1):
            usage(eps[LLAMA_8B], now - timedelta(hours=h), ttft=[0.2] * 100 if h != 2 else [2.0] * 100, ok=1)
            sla_evaluate_tenant(tenant=tenant, window_end=now - timedelta(hours=h - 1))
        client.login(username=MembershipFactory(tenant=tenant, role="member").user.username, password=PASSWORD)
        page = client.get(f"/tenant/{tenant.slug}/sla/")
        assert page.status_code == 200
        (chart,) = page.context["charts"]
        measured, target = chart["figure"]["data"]
        assert len(measured["x"]) == 3 and target["y"] == [0.5, 0.5, 0.5]
        assert measured["y"] == pytest.approx([0.1 + 0.15 * 0.95, 1.0 + 1.5 * 0.95, 0.1 + 0.15 * 0.95])
        assert measured["marker"]["color"] == ["#2e7d4f", "#c0392b", "#2e7d4f"]
        script = page.content.decode().split('<script id="fig-sla-ttft_p95-data" type="application/json">')[1]
        assert json.loads(script.split("</script>")[0]) == json.loads(json.dumps(chart["figure"]))
        assert page.context["compliance"].open_breaches == 0
        assert client.get(f"/tenant/{tenant.slug}/sla/?days=5").status_code == 400

    def test_a_credit_shows_only_beside_an_objective_with_a_breached_window_this_month(self, client):
        tenant, eps = served_tenant()
        p = policy(tenant.plan, ttft_p95=("0.5", Window.HOUR), error_rate=("1", Window.HOUR))
        p.objectives.update(credit_pct=Decimal("10"))
        now = timezone.now().replace(minute=0, second=0, microsecond=0)
        for h in (3, 2, 1):
            usage(eps[LLAMA_8B], now - timedelta(hours=h), ttft=[0.2] * 100 if h != 2 else [2.0] * 100, ok=100)
            sla_evaluate_tenant(tenant=tenant, window_end=now - timedelta(hours=h - 1))
        client.login(username=MembershipFactory(tenant=tenant).user.username, password=PASSWORD)
        page = client.get(f"/tenant/{tenant.slug}/sla/")
        text = page.content.decode()
        breach_end = now - timedelta(hours=1)
        in_month = [w for w in (now - timedelta(hours=h - 1) for h in (3, 2, 1)) if w > now.replace(day=1, hour=0)]
        statuses = {st.objective.sli: st for st in page.context["compliance"].statuses}
        ttft, errors = statuses["ttft_p95"], statuses["error_rate"]
        assert errors.credit_due is None and "none: every window met (10% on a breach)" in text
        if breach_end > now.replace(day=1, hour=0):  # the breached window ended this month
            assert (ttft.credit_due.count, ttft.credit_due.total) == (1, len(in_month))
            assert f"1 of {len(in_month)} window" in text and f"first {breach_end:%Y-%m-%d %H:%M}" in text
        else:
            assert ttft.credit_due is None

    def test_tenants_see_only_their_own_compliance(self, client):
        tenant, _ = served_tenant()
        other, _ = served_tenant()
        client.login(username=MembershipFactory(tenant=tenant).user.username, password=PASSWORD)
        assert client.get(f"/tenant/{other.slug}/sla/").status_code == 404
        assert client.get("/tenant/no-such-tenant/sla/").status_code == 404
        assert client.get("/sla/").status_code == 403
        client.logout()
        assert client.get(f"/tenant/{tenant.slug}/sla/").status_code == 302

    def test_operators_see_all_tenants_and_admins_edit_policies(self, client):
        tenant, _ = served_tenant()
        client.login(username=ViewerFactory().username, password=PASSWORD)
        assert client.get("/sla/").status_code == 200
        assert client.get(f"/sla/tenants/{tenant.slug}/").status_code == 200
        assert client.post("/sla/policies/new/", {"name": "x", "plan": tenant.plan.pk}).status_code == 403
        client.login(username=OperatorFactory().username, password=PASSWORD)
        assert client.post("/sla/policies/new/", {"name": "Gold"}).status_code == 400
        response = client.post("/sla/policies/new/", {"name": "Gold", "plan": tenant.plan.pk})
        created = SlaPolicy.objects.get(name="Gold")
        assert response.status_code == 302 and created.plan == tenant.plan
        url = f"/sla/policies/{created.pk}/objectives/"
        bad = client.post(url, {"sli": "availability", "target": "120", "window": 3600, "credit_pct": "5"})
        assert bad.status_code == 400 and "target" in bad.context["form"].errors
        ok = client.post(url, {"sli": "availability", "target": "99.9", "window": 86400, "credit_pct": "10"})
        assert ok.status_code == 302
        objective = created.objectives.get()
        assert (objective.target, objective.window, objective.credit_pct) == (Decimal("99.9"), 86400, Decimal(10))
        assert client.get(f"/sla/policies/{created.pk}/").status_code == 200
        assert client.post(f"/sla/policies/{created.pk}/objectives/remove/", {"sli": "availability"}).status_code \
            == 302
        assert not created.objectives.exists()

