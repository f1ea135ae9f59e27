"""Price books, invoices and revenue: tokens x the price in force, credits, commitments, immutability, pages."""

import csv
import io
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import IntegrityError, transaction
from django.urls import get_resolver, reverse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portal.alerts.models import Alert
from portal.audit.models import AuditEntry
from portal.billing.models import (
    Commitment,
    ImmutableError,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    LineKind,
    ModelPrice,
    PriceBook,
)
from portal.billing.selectors import line_amount, price_in_force, revenue_for_tenant
from portal.billing.services import (
    BillingError,
    commitment_add,
    invoice_issue,
    invoice_month,
    invoice_refresh_draft,
    price_add,
)
from portal.billing.tasks import invoice_closed_month
from portal.capacity.selectors import usage_for_tenant
from portal.capacity.services import allocation_create, deployment_create
from portal.demo.seed import DEMO_PASSWORD, seed_demo
from portal.fleet.models import ServingEndpoint
from portal.sla.models import SlaEvaluation, SlaObjective, SlaPolicy, Sli, Window
from portal.sla.selectors import fleet_compliance
from portal.sla.services import sla_evaluate_tenant
from portal.telemetry.models import UsageHour, UsageMinute
from portal.tenants.models import Plan
from tests.factories import (
    PASSWORD,
    GpuFactory,
    MembershipFactory,
    NodeFactory,
    OperatorFactory,
    TenantFactory,
    ViewerFactory,
    gpu_uuid,
)

OCT = date(2026, 10, 1)
T0 = datetime(2026, 10, 1, tzinfo=UTC)
NOV = datetime(2026, 11, 1, tzinfo=UTC)
AFTER = datetime(2026, 11, 2, 4, tzinfo=UTC)  # when the October invoices are run
LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
LLAMA_70B = "meta-llama/Llama-3.1-70B-Instruct"


def served_tenant(*, models=(LLAMA_8B,), plan: Plan | None = None, currency: str = "USD",
                  prices: dict | None = None, since: datetime = T0 - timedelta(days=40), **tenant_kwargs):
    """A tenant on a plan with a price book, one deployment per model (each on its own GPU and endpoint).
    Returns (tenant, {model: endpoint})."""
    if plan is None:
        plan = Plan.objects.create(name=f"Plan {Plan.objects.count() + 1}-{gpu_uuid()[-6:]}")
        book = PriceBook.objects.create(plan=plan, currency=currency)
        for model, (pin, pout) in (prices or {LLAMA_8B: ("0.05", "0.08"), LLAMA_70B: ("0.35", "0.40")}).items():
            ModelPrice.objects.create(book=book, model_name=model, effective_from=OCT - timedelta(days=60),
                                      input_per_mtok=Decimal(pin), output_per_mtok=Decimal(pout))
    tenant = TenantFactory(plan=plan, **tenant_kwargs)
    node = NodeFactory()
    endpoints = {}
    for i, model in enumerate(models):
        gpu = GpuFactory(node=node, uuid=gpu_uuid(), index=i, name="NVIDIA H100 80GB HBM3")
        allocation = allocation_create(tenant=tenant, gpu=gpu, starts_at=since)
        url = f"http://127.0.0.1:{8000 + i}/metrics"
        deployment_create(tenant=tenant, name=model, model_name=model, engine="vllm", node=node, metrics_url=url,
                          allocations=[allocation], active_from=since)
        endpoints[model] = ServingEndpoint.objects.create(node=node, url=url, model=model, engine="vllm")
    return tenant, endpoints


def add_usage(endpoint, ts: datetime, prompt: int, generation: int, *, minute: bool = False, **extra) -> None:
    model = UsageMinute if minute else UsageHour
    model.objects.create(endpoint=endpoint, ts=ts, prompt_tokens=prompt, generation_tokens=generation, **extra)


@pytest.mark.django_db
class TestInvoices:
    def test_it_invoices_a_month_per_model_at_the_price_in_force(self):
        tenant, eps = served_tenant(models=(LLAMA_8B, LLAMA_70B))
        add_usage(eps[LLAMA_8B], T0 + timedelta(hours=1), 40_000_000, 10_000_000)
        add_usage(eps[LLAMA_8B], T0 + timedelta(days=30, hours=23), 1_000_001, 3)
        add_usage(eps[LLAMA_70B], T0 + timedelta(days=3), 2_000_000, 1_000_000)
        add_usage(eps[LLAMA_8B], T0 - timedelta(hours=1), 9_999, 9_999)  # September
        add_usage(eps[LLAMA_8B], NOV, 9_999, 9_999)  # November
        invoice = invoice_month(tenant=tenant, period_start=OCT, now=AFTER)
        assert invoice.status == InvoiceStatus.ISSUED and invoice.number == f"INV-202610-{tenant.pk:05d}"
        lines = list(invoice.lines.order_by("position"))
        assert [(ln.model_name, ln.input_tokens, ln.output_tokens, ln.amount) for ln in lines] == [
            # 41,000,001 x 0.05 / 1M + 10,000,003 x 0.08 / 1M = 2.05000005 + 0.80000024 -> 2.85
            (LLAMA_70B, 2_000_000, 1_000_000, Decimal("1.10")),
            (LLAMA_8B, 41_000_001, 10_000_003, Decimal("2.85")),
        ]
        assert invoice.input_tokens == 43_000_001 and invoice.output_tokens == 11_000_003
        assert invoice.total == invoice.usage_amount == Decimal("3.95") and invoice.currency == "USD"
        usage = usage_for_tenant(tenant=tenant, start=T0, end=NOV, by_day=False, now=AFTER)
        assert invoice.tokens == sum(u.tokens for u in usage)
        assert AuditEntry.objects.filter(action="invoice.issue", tenant=tenant).count() == 1

    def test_a_price_change_mid_month_splits_the_model_into_one_line_per_version(self):
        tenant, eps = served_tenant()
        book = tenant.plan.price_book
        ModelPrice.objects.create(book=book, model_name=LLAMA_8B, effective_from=date(2026, 10, 16),
                                  input_per_mtok=Decimal("0.04"), output_per_mtok=Decimal("0.06"))
        add_usage(eps[LLAMA_8B], T0 + timedelta(days=15, hours=23), 1_000_000, 1_000_000)  # Oct 16 is the 16th
        add_usage(eps[LLAMA_8B], T0 + timedelta(days=14, hours=23), 1_000_000, 1_000_000)  # Oct 15, old price
        invoice = invoice_month(tenant=tenant, period_start=OCT, now=AFTER)
        assert [(ln.input_per_mtok, ln.output_per_mtok, ln.amount) for ln in invoice.lines.all()] == [
            (Decimal("0.05"), Decimal("0.08"), Decimal("0.13")), (Decimal("0.04"), Decimal("0.06"), Decimal("0.10"))]
        assert price_in_force(tenant=tenant, model_name=LLAMA_8B, at=T0 + timedelta(days=15, hours=23)).effective_from \
            == date(2026, 10, 16)
        assert price_in_force(tenant=tenant, model_name=LLAMA_8B, at=date(2026, 10, 15)).input_per_mtok == Decimal(
            "0.05")
        assert price_in_force(tenant=tenant, model_name="unknown/model", at=T0) is None
        assert revenue_for_tenant(tenant=tenant, start=T0, end=NOV) == {"USD": Decimal("0.23")}

    def test_a_minimum_commitment_tops_up_and_sla_credits_come_off_the_charges(self):
        tenant, eps = served_tenant()
        book = tenant.plan.price_book
        Commitment.objects.create(book=book, effective_from=date(2026, 9, 1), monthly_minimum=Decimal("100.00"))
        Commitment.objects.create(book=book, effective_from=date(2026, 10, 2), monthly_minimum=Decimal("999.00"))
        policy = SlaPolicy.objects.create(name="Standard", plan=tenant.plan)
        SlaObjective.objects.create(policy=policy, sli=Sli.AVAILABILITY, target=Decimal("99.9"), window=Window.DAY,
                                    credit_pct=Decimal("10"))
        SlaObjective.objects.create(policy=policy, sli=Sli.ERROR_RATE, target=Decimal("1"), window=Window.DAY,
                                    credit_pct=Decimal("5"))
        # 40 USD of usage. On Oct 3 availability is 99.0% (misses 99.9), errors 0.5% (meets 1%): the daily
        # evaluations of the month record one breached availability window.
        add_usage(eps[LLAMA_8B], T0 + timedelta(days=2), 800_000_000, 0, probes=1000, probes_up=990,
                  requests_ok=995, requests_failed=5)
        for day in range(1, 32):
            sla_evaluate_tenant(tenant=tenant, window_end=T0 + timedelta(days=day), now=AFTER)
        invoice = invoice_month(tenant=tenant, period_start=OCT, now=AFTER)
        kinds = [(ln.kind, ln.amount) for ln in invoice.lines.order_by("position")]
        # The credit is 10% of the usage only: a commitment top-up is owed whatever the service level.
        assert kinds == [(LineKind.USAGE, Decimal("40.00")), (LineKind.COMMITMENT, Decimal("60.00")),
                         (LineKind.CREDIT, Decimal("-4.00"))]
        assert invoice.credits == Decimal("4.00") and invoice.commitment_topup == Decimal("60.00")
        assert invoice.total == Decimal("96.00") == sum(a for _, a in kinds)
        credit = invoice.lines.get(kind=LineKind.CREDIT)
        assert credit.sli == Sli.AVAILABILITY
        assert "breached its target" in credit.description and "in 1 of " in credit.description
        assert "2026-10-04 00:00" in credit.description  # the window it breached in, shown with the credit

    def test_no_credit_without_a_breached_window_even_if_the_month_misses_on_average(self):
        # Every daily window meets its target, the month as a whole does not: a contract credits breaches.
        tenant, eps = served_tenant()
        policy = SlaPolicy.objects.create(name="Standard", plan=tenant.plan)
        SlaObjective.objects.create(policy=policy, sli=Sli.AVAILABILITY, target=Decimal("99.9"), window=Window.DAY,
                                    credit_pct=Decimal("10"))
        add_usage(eps[LLAMA_8B], T0 + timedelta(days=2), 800_000_000, 0, probes=1000, probes_up=1000)
        for day in range(1, 32):
            sla_evaluate_tenant(tenant=tenant, window_end=T0 + timedelta(days=day), now=AFTER)
        invoice = invoice_month(tenant=tenant, period_start=OCT, now=AFTER)
        assert invoice.credits == 0 and not invoice.lines.filter(kind=LineKind.CREDIT).exists()

    def test_a_tenant_starting_mid_month_owes_the_commitment_for_its_days_only(self):
        # Service from Oct 21 (its first capacity): 11 of October's 31 days of a 310.00 minimum = 110.00.
        tenant, eps = served_tenant(since=datetime(2026, 10, 21, 9, tzinfo=UTC))
        Commitment.objects.create(book=tenant.plan.price_book, effective_from=date(2026, 9, 1),
                                  monthly_minimum=Decimal("310.00"))
        add_usage(eps[LLAMA_8B], datetime(2026, 10, 22, tzinfo=UTC), 800_000_000, 0)
        invoice = invoice_month(tenant=tenant, period_start=OCT, now=AFTER)
        top_up = invoice.lines.get(kind=LineKind.COMMITMENT)
        assert top_up.amount == Decimal("110.00") - Decimal("40.00")
        assert "prorated for 11 of 31 days" in top_up.description
        september = invoice_month(tenant=tenant, period_start=date(2026, 9, 1), now=AFTER)
        assert september.total == 0  # before its service started: nothing is owed

    def test_the_pnl_owes_what_the_invoice_owes_for_a_service_starting_later_this_month(self):
        from portal.billing.services import invoice_compute
        from portal.economics.pnl import site_pnl

        tenant, _eps = served_tenant(since=datetime(2026, 10, 21, 9, tzinfo=UTC))
        Commitment.objects.create(book=tenant.plan.price_book, effective_from=date(2026, 9, 1),
                                  monthly_minimum=Decimal("310.00"))
        now = datetime(2026, 10, 15, tzinfo=UTC)  # no draft stored yet; the service begins in six days
        owed = invoice_compute(tenant=tenant, book=tenant.plan.price_book, period_start=OCT, now=now)
        assert sum(line.amount for line in owed.lines) == Decimal("110.00")
        revenue = sum(line.revenue.get("USD", 0) for line in site_pnl(start=T0, end=NOV,
                                                                       now=now))
        assert revenue == Decimal("110.00")

    def test_invoicing_a_tenant_month_twice_yields_one_invoice(self):
        tenant, eps = served_tenant()
        add_usage(eps[LLAMA_8B], T0, 1_000_000, 1_000_000)
        first = invoice_month(tenant=tenant, period_start=OCT, now=AFTER)
        add_usage(eps[LLAMA_8B], T0 + timedelta(hours=5), 7, 7)  # arrives after issue: never changes it
        again = invoice_month(tenant=tenant, period_start=date(2026, 10, 17), now=AFTER + timedelta(days=1))
        assert again.pk == first.pk and again.total == Decimal("0.13") and again.input_tokens == 1_000_000
        assert Invoice.objects.count() == 1 and InvoiceLine.objects.count() == 1
        assert invoice_refresh_draft(tenant=tenant, period_start=OCT).input_tokens == 1_000_000
        with pytest.raises(IntegrityError), transaction.atomic():
            Invoice.objects.create(tenant=tenant, period_start=OCT, period_end=date(2026, 11, 1), number="X",
                                   currency="USD", usage_through=NOV, computed_at=AFTER)

    def test_issued_invoices_and_their_lines_refuse_every_change(self):
        tenant, eps = served_tenant()
        add_usage(eps[LLAMA_8B], T0, 1_000_000, 1_000_000)
        invoice = invoice_month(tenant=tenant, period_start=OCT, now=AFTER)
        line = invoice.lines.get()
        invoice.total = Decimal("0.01")
        for attempt in (invoice.save, invoice.delete, line.save, line.delete,
                        lambda: Invoice.objects.filter(pk=invoice.pk).update(total=0),
                        lambda: Invoice.objects.filter(pk=invoice.pk).delete(),
                        lambda: InvoiceLine.objects.filter(pk=line.pk).update(amount=0),
                        lambda: InvoiceLine.objects.filter(pk=line.pk).delete()):
            with pytest.raises(ImmutableError):
                attempt()
        invoice.refresh_from_db()
        assert invoice.total == Decimal("0.13") and invoice.lines.get().amount == Decimal("0.13")

    def test_the_running_month_is_a_draft_recomputed_on_demand_and_cannot_be_issued(self):
        tenant, eps = served_tenant()
        now = T0 + timedelta(days=10, minutes=30)
        add_usage(eps[LLAMA_8B], T0 + timedelta(days=1), 1_000_000, 0)
        draft = invoice_refresh_draft(tenant=tenant, period_start=OCT, now=now)
        assert draft.status == InvoiceStatus.DRAFT and draft.total == Decimal("0.05") and draft.usage_through == now
        add_usage(eps[LLAMA_8B], T0 + timedelta(days=10, minutes=5), 0, 1_000_000, minute=True)
        draft = invoice_refresh_draft(tenant=tenant, period_start=OCT, now=now)
        assert draft.total == Decimal("0.13") and InvoiceLine.objects.filter(invoice=draft).count() == 1
        with pytest.raises(BillingError, match="not over yet"):
            invoice_issue(invoice_id=draft.pk, by=None, now=now)
        assert invoice_issue(invoice_id=draft.pk, by=None, now=AFTER).status == InvoiceStatus.ISSUED

    def test_usage_without_a_price_keeps_the_draft_and_alerts_instead_of_issuing(
            self, django_capture_on_commit_callbacks):
        tenant, eps = served_tenant(models=(LLAMA_8B, "Qwen/Qwen2.5-32B-Instruct"))
        add_usage(eps["Qwen/Qwen2.5-32B-Instruct"], T0, 5, 5)
        with pytest.raises(BillingError, match=r"Qwen/Qwen2\.5-32B-Instruct"):
            invoice_month(tenant=tenant, period_start=OCT, now=AFTER)
        with django_capture_on_commit_callbacks(execute=True):
            invoice_closed_month.delay("2026-10-01")
        invoice = Invoice.objects.get(tenant=tenant)
        assert invoice.status == InvoiceStatus.DRAFT and invoice.tokens == 10
        alert = Alert.objects.get(key=f"billing:{tenant.pk}:2026-10")
        assert "Qwen" in alert.detail

    def test_the_daily_task_invoices_every_billed_tenant_once(self, django_capture_on_commit_callbacks):
        tenants = [served_tenant()[0] for _ in range(3)]
        for t in tenants:
            add_usage(t.deployments.get().node.endpoints.get(), T0, 1_000_000, 0)
        TenantFactory(plan=None)  # no plan, no price book: not billed
        for _ in range(2):
            with django_capture_on_commit_callbacks(execute=True):
                invoice_closed_month.delay("2026-10-01")
        assert sorted(Invoice.objects.values_list("tenant_id", flat=True)) == [t.pk for t in tenants]
        assert set(Invoice.objects.values_list("status", flat=True)) == {InvoiceStatus.ISSUED}
        assert InvoiceLine.objects.count() == 3


@pytest.mark.django_db
class TestPriceBooks:
    def test_a_price_change_is_a_new_version_never_an_edit(self):
        tenant, _ = served_tenant()
        book = tenant.plan.price_book
        operator = OperatorFactory()
        today = date(2026, 11, 20)
        price = price_add(book=book, model_name=LLAMA_8B, effective_from=today, input_per_mtok=Decimal("0.045"),
                          output_per_mtok=Decimal("0.07"), by=operator, today=today)
        assert book.prices.filter(model_name=LLAMA_8B).count() == 2
        price.input_per_mtok = Decimal(1)
        with pytest.raises(ImmutableError):
            price.save()
        with pytest.raises(BillingError) as exc:
            price_add(book=book, model_name=LLAMA_8B, effective_from=today - timedelta(days=1),
                      input_per_mtok=Decimal(1), output_per_mtok=Decimal(1), by=operator, today=today)
        assert exc.value.field == "effective_from"
        with pytest.raises(BillingError, match="already takes effect"):
            price_add(book=book, model_name=LLAMA_8B, effective_from=today, input_per_mtok=Decimal(1),
                      output_per_mtok=Decimal(1), by=operator, today=today)
        with pytest.raises(BillingError) as exc:
            commitment_add(book=book, effective_from=today, monthly_minimum=Decimal(-1), by=operator, today=today)
        assert exc.value.field == "monthly_minimum"
        assert AuditEntry.objects.filter(action="price.add").count() == 1

    def test_operator_admins_add_versions_from_the_page_and_errors_name_the_field(self, client):
        tenant, _ = served_tenant()
        book = tenant.plan.price_book
        client.login(username=OperatorFactory().username, password=PASSWORD)
        assert client.get("/billing/prices/").status_code == 200
        url = f"/billing/prices/books/{book.pk}/prices/new/"
        response = client.post(url, {"model_name": LLAMA_8B, "effective_from": "2020-01-01",
                                     "input_per_mtok": "0.1", "output_per_mtok": "0.2"})
        assert response.status_code == 400
        assert "never in the past" in response.context["price_form"].errors["effective_from"][0]
        response = client.post(url, {"model_name": LLAMA_8B, "effective_from": "2099-01-01",
                                     "input_per_mtok": "-1", "output_per_mtok": "x"})
        assert response.status_code == 400
        assert set(response.context["price_form"].errors) == {"input_per_mtok", "output_per_mtok"}
        response = client.post(url, {"model_name": LLAMA_8B, "effective_from": "2099-01-01",
                                     "input_per_mtok": "0.1", "output_per_mtok": "0.2"})
        assert response.status_code == 302
        assert book.prices.filter(effective_from=date(2099, 1, 1)).count() == 1
        plan = Plan.objects.create(name="Enterprise EU")
        assert client.post("/billing/prices/books/new/", {"plan": plan.pk, "currency": "eu"}).status_code == 400
        assert client.post("/billing/prices/books/new/", {"plan": plan.pk, "currency": "EUR"}).status_code == 302
        assert PriceBook.objects.get(plan=plan).currency == "EUR"

    def test_viewers_and_tenants_cannot_change_prices(self, client):
        tenant, _ = served_tenant()
        book = tenant.plan.price_book
        data = {"model_name": LLAMA_8B, "effective_from": "2099-01-01", "input_per_mtok": "1", "output_per_mtok": "1"}
        for user in (ViewerFactory(), MembershipFactory(tenant=tenant).user):
            client.login(username=user.username, password=PASSWORD)
            assert client.post(f"/billing/prices/books/{book.pk}/prices/new/", data).status_code == 403
        assert book.prices.count() == 2


@pytest.mark.django_db
class TestInvoicePages:
    def _issued(self):
        tenant, eps = served_tenant()
        add_usage(eps[LLAMA_8B], T0, 1_234_567, 89_012)
        return tenant, invoice_month(tenant=tenant, period_start=OCT, now=AFTER)

    def test_a_member_sees_and_downloads_its_own_invoices_only(self, client):
        tenant, invoice = self._issued()
        other, other_invoice = self._issued()
        member = MembershipFactory(tenant=tenant, role="member").user
        client.login(username=member.username, password=PASSWORD)
        page = client.get(f"/tenant/{tenant.slug}/billing/")
        assert page.status_code == 200 and invoice.number in page.content.decode()
        assert other_invoice.number not in page.content.decode()
        detail = client.get(f"/tenant/{tenant.slug}/billing/{invoice.pk}/")
        assert detail.status_code == 200 and "1,234,567" in detail.content.decode()
        response = client.get(f"/tenant/{tenant.slug}/billing/{invoice.pk}/csv/")
        assert response["Content-Type"].startswith("text/csv")
        assert response["Content-Disposition"] == f'attachment; filename="{invoice.number}.csv"'
        rows = list(csv.reader(io.StringIO(response.content.decode())))
        assert rows[8][3:6] == [LLAMA_8B, "1234567", "89012"] and rows[-1] == ["total", "0.07"]
        for url in (f"/tenant/{tenant.slug}/billing/{other_invoice.pk}/",
                    f"/tenant/{tenant.slug}/billing/{other_invoice.pk}/csv/",
                    f"/tenant/{other.slug}/billing/", f"/tenant/{other.slug}/billing/{other_invoice.pk}/csv/"):
            assert client.get(url).status_code == 404, url

    def test_a_tenant_admin_recomputes_the_running_month_draft_and_a_member_cannot(self, client):
        tenant, _ = served_tenant()
        member = MembershipFactory(tenant=tenant, role="member").user
        client.login(username=member.username, password=PASSWORD)
        assert "Recompute" not in client.get(f"/tenant/{tenant.slug}/billing/").content.decode()
        assert client.post(f"/tenant/{tenant.slug}/billing/draft/").status_code == 403
        assert not Invoice.objects.filter(tenant=tenant).exists()
        client.login(username=MembershipFactory(tenant=tenant).user.username, password=PASSWORD)
        assert "Recompute" in client.get(f"/tenant/{tenant.slug}/billing/").content.decode()
        response = client.post(f"/tenant/{tenant.slug}/billing/draft/")
        invoice = Invoice.objects.get(tenant=tenant)
        assert response.status_code == 302 and invoice.status == InvoiceStatus.DRAFT
        assert response["Location"] == f"/tenant/{tenant.slug}/billing/{invoice.pk}/"

    def test_operators_see_all_invoices_and_admins_issue_drafts(self, client, django_capture_on_commit_callbacks):
        tenant, eps = served_tenant()
        add_usage(eps[LLAMA_8B], T0, 1_000_000, 0)
        draft = invoice_refresh_draft(tenant=tenant, period_start=OCT, now=NOV - timedelta(hours=1))
        client.login(username=ViewerFactory().username, password=PASSWORD)
        assert draft.number in client.get("/billing/").content.decode()
        assert client.get(f"/billing/invoices/{draft.pk}/csv/").status_code == 200
        assert client.post(f"/billing/invoices/{draft.pk}/issue/").status_code == 403
        assert client.get("/billing/?month=not-a-month").status_code == 400
        client.login(username=OperatorFactory().username, password=PASSWORD)
        assert client.post(f"/billing/invoices/{draft.pk}/issue/").status_code == 302
        draft.refresh_from_db()
        assert draft.status == InvoiceStatus.ISSUED and draft.total == Decimal("0.05")
        assert client.post("/billing/run/", {"month": "2999-01"}).status_code == 400
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            assert client.post("/billing/run/", {"month": "2026-10"}).status_code == 302
        assert len(callbacks) == 1

    def test_tenant_users_cannot_reach_operator_billing(self, client):
        _, invoice = self._issued()
        client.login(username=MembershipFactory(tenant=invoice.tenant).user.username, password=PASSWORD)
        for url in ("/billing/", f"/billing/invoices/{invoice.pk}/", "/billing/prices/"):
            assert client.get(url).status_code == 403, url


usage_rows = st.lists(
    st.tuples(st.integers(0, 30 * 24 - 1), st.integers(0, 10**12), st.integers(0, 10**11), st.booleans()),
    max_size=25)


@pytest.mark.django_db
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(rows=usage_rows, second_model=st.booleans())
def test_invoiced_tokens_equal_usage_tokens_for_random_usage(rows, second_model):
    with transaction.atomic():
        tenant, eps = served_tenant(models=(LLAMA_8B, LLAMA_70B))
        seen = set()
        for hour, prompt, generation, use_70b in rows:
            endpoint = eps[LLAMA_70B if use_70b and second_model else LLAMA_8B]
            if (endpoint.pk, hour) in seen:
                continue
            seen.add((endpoint.pk, hour))
            add_usage(endpoint, T0 + timedelta(hours=hour), prompt, generation)
        invoice = invoice_month(tenant=tenant, period_start=OCT, now=AFTER)
        usage = usage_for_tenant(tenant=tenant, start=T0, end=NOV, by_day=False, now=AFTER)
        lines = list(invoice.lines.all())
        assert invoice.input_tokens == sum(u.prompt_tokens for u in usage) == sum(ln.input_tokens for ln in lines)
        assert invoice.output_tokens == sum(u.generation_tokens for u in usage) == sum(
            ln.output_tokens for ln in lines)
        assert invoice.total == sum((ln.amount for ln in lines), Decimal(0))
        transaction.set_rollback(True)


prices = st.decimals(min_value=0, max_value=100, places=6, allow_nan=False, allow_infinity=False)


@given(lines=st.lists(st.tuples(st.integers(0, 10**13), st.integers(0, 10**13), prices, prices), max_size=12))
def test_money_rounding_line_amounts_are_cents_and_sum_to_the_exact_total_within_half_a_cent_each(lines):
    amounts = [line_amount(input_tokens=i, output_tokens=o, input_per_mtok=pi, output_per_mtok=po)
               for i, o, pi, po in lines]
    exact = [(i * pi + o * po) / Decimal(1_000_000) for i, o, pi, po in lines]
    for amount, value in zip(amounts, exact, strict=True):
        assert amount == amount.quantize(Decimal("0.01")) and abs(amount - value) <= Decimal("0.005")
    assert sum(amounts, Decimal(0)) - sum(exact, Decimal(0)) <= Decimal("0.005") * len(lines)


@pytest.mark.django_db
def test_the_demo_seed_prices_every_plan_evaluates_slas_and_invoices_last_month(client):
    now = datetime(2026, 11, 2, 10, 7, tzinfo=UTC)
    seed_demo(now=now, days=2, minute_hours=1)  # seeds billing too (portal.demo.billing_seed)
    assert PriceBook.objects.count() == Plan.objects.count() >= 2
    assert Invoice.objects.filter(period_start=OCT, status=InvoiceStatus.ISSUED).count() == 4
    assert Invoice.objects.filter(period_start=date(2026, 11, 1), status=InvoiceStatus.DRAFT).count() == 4
    assert SlaEvaluation.objects.filter(window_end=datetime(2026, 11, 2, 10, tzinfo=UTC)).exists()
    for invoice in Invoice.objects.filter(period_start=OCT):
        assert invoice.status == InvoiceStatus.ISSUED and invoice.total > 0
        usage = usage_for_tenant(tenant=invoice.tenant, start=T0, end=NOV, by_day=False, now=now)
        assert invoice.tokens == sum(u.tokens for u in usage) > 0
    assert set(Invoice.objects.filter(period_start=date(2026, 11, 1)).values_list("status", flat=True)) == {"draft"}
    acme = Invoice.objects.get(tenant__slug="acme", period_start=OCT)
    assert acme.currency == "USD" and acme.lines.filter(kind=LineKind.USAGE).exists()
    assert Sli.TTFT_P95 in set(acme.lines.filter(kind=LineKind.CREDIT).values_list("sli", flat=True))
    assert acme.credits > 0 and acme.total == sum(acme.lines.values_list("amount", flat=True))
    client.login(username="operator", password=DEMO_PASSWORD)
    for url in ("/sla/", "/sla/tenants/acme/", "/sla/policies/", f"/sla/policies/{SlaPolicy.objects.first().pk}/",
                "/billing/", "/billing/prices/", f"/billing/invoices/{acme.pk}/"):
        assert client.get(url).status_code == 200, url
    assert all(c.series for c in fleet_compliance(since=now - timedelta(hours=2)))
    client.login(username="acme-admin", password=DEMO_PASSWORD)
    for url in ("/tenant/acme/sla/?days=30", "/tenant/acme/billing/", f"/tenant/acme/billing/{acme.pk}/"):
        assert client.get(url).status_code == 200, url


@pytest.mark.django_db
def test_every_tenant_sla_and_billing_url_is_404_to_non_members_and_for_other_tenants_ids(client):
    """Walks every URL of the tenant_sla and tenant_billing namespaces, so a new one cannot skip the scoping."""
    a, eps = served_tenant()
    b, _ = served_tenant()
    add_usage(eps[LLAMA_8B], T0, 1_000, 1_000)
    a_invoice = invoice_month(tenant=a, period_start=OCT, now=AFTER)
    b_admin = MembershipFactory(tenant=b).user
    urls = []
    for namespace in ("tenant_sla", "tenant_billing"):
        _prefix, resolver = get_resolver().namespace_dict[namespace]
        for pattern in resolver.url_patterns:
            params = set(pattern.pattern.converters) - {"tenant_slug"}
            assert params <= {"invoice_id"}, f"{namespace}:{pattern.name} takes {params}: cover it here"
            name = f"{namespace}:{pattern.name}"
            ids = {"invoice_id": a_invoice.pk} if params else {}
            urls.append((reverse(name, kwargs={"tenant_slug": a.slug, **ids}),
                         reverse(name, kwargs={"tenant_slug": b.slug, **ids}) if params else None))
    for user in (b_admin, OperatorFactory()):
        client.login(username=user.username, password=PASSWORD)
        for a_url, b_url_with_a_ids in urls:
            for method in (client.get, client.post):
                assert method(a_url).status_code == 404, a_url
                if b_url_with_a_ids and user == b_admin:
                    assert method(b_url_with_a_ids).status_code in (404, 405), b_url_with_a_ids
    assert Invoice.objects.filter(tenant=b).count() == 0 and Invoice.objects.count() == 1
