"""The demo's SLAs and billing: a price book per plan (USD, per million input/output tokens, with one price cut in
the middle of last month so an invoice shows two price versions), minimum commitments, SLA policies per plan and
one tenant override, the last day of hourly SLA evaluations, last month's issued invoices and this month's drafts.

Call it from seed_demo after the tenants, their plans (portal/demo/tenants_seed.py) and their usage history exist:
    seed_billing(now=now)
"""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.db import transaction

from portal.billing.models import Commitment, ModelPrice, PriceBook
from portal.billing.selectors import month_start, tenants_to_invoice
from portal.billing.services import BillingError, invoice_month, invoice_refresh_draft
from portal.sla.models import SlaObjective, SlaPolicy, Sli, Window
from portal.sla.services import evaluation_window_end, sla_evaluate_tenant
from portal.tenants.models import Plan, Tenant, TenantStatus

# List prices per million tokens (input, output), USD.
LIST_PRICES = {
    "meta-llama/Llama-3.1-8B-Instruct": ("0.05", "0.08"),
    "meta-llama/Llama-3.1-70B-Instruct": ("0.35", "0.40"),
    "Qwen/Qwen2.5-32B-Instruct": ("0.20", "0.30"),
    "mistralai/Mistral-7B-Instruct-v0.3": ("0.04", "0.07"),
    "nvidia/Llama-3.1-Nemotron-70B-Instruct": ("0.38", "0.45"),
}
PRICE_CUT = ("meta-llama/Llama-3.1-8B-Instruct", "0.045", "0.072")  # from the 15th of last month
DISCOUNTS = {"Enterprise": Decimal("0.90")}
COMMITMENTS = {"Enterprise": Decimal("5000.00"), "Growth": Decimal("1000.00")}
# Per plan: SLI -> (target, window, credit %).
POLICIES = {
    "Enterprise": {
        Sli.TTFT_P95: ("0.8", Window.HOUR, "5"), Sli.ITL_P95: ("0.075", Window.HOUR, "0"),
        Sli.E2E_P99: ("40", Window.DAY, "5"), Sli.AVAILABILITY: ("99.9", Window.MONTH, "10"),
        Sli.ERROR_RATE: ("0.5", Window.DAY, "5"),
    },
    "Growth": {
        Sli.TTFT_P95: ("1.0", Window.HOUR, "0"), Sli.E2E_P99: ("60", Window.DAY, "0"),
        Sli.AVAILABILITY: ("99.5", Window.MONTH, "10"), Sli.ERROR_RATE: ("1", Window.DAY, "5"),
    },
    "Starter": {Sli.AVAILABILITY: ("99", Window.MONTH, "0")},
}
# Acme negotiated a tighter time to first token: its busiest hours breach it (p95 above 0.4 s near the afternoon
# peak), so the demo shows breaches, alerts and an SLA credit on last month's invoice.
OVERRIDES = {"acme": ("Acme AI contract", {**POLICIES["Enterprise"], Sli.TTFT_P95: ("0.4", Window.HOUR, "5"),
                                           Sli.E2E_P99: ("25", Window.DAY, "5")})}
EVALUATED_HOURS = 24


def _policy(name: str, objectives: dict, **scope) -> SlaPolicy:
    policy = SlaPolicy.objects.create(name=name, **scope)
    SlaObjective.objects.bulk_create(
        SlaObjective(policy=policy, sli=sli, target=Decimal(target), window=window, credit_pct=Decimal(credit))
        for sli, (target, window, credit) in objectives.items())
    return policy


def _plans() -> list[Plan]:
    """The demo's plans; when the tenants seed made none, a Growth and an Enterprise plan for the active tenants."""
    if Plan.objects.exists():
        return list(Plan.objects.all())
    growth = Plan.objects.create(name="Growth", description="Production traffic on dedicated GPUs.")
    enterprise = Plan.objects.create(name="Enterprise", description="Large fleets of dedicated GPUs.")
    for i, tenant in enumerate(Tenant.objects.filter(status=TenantStatus.ACTIVE, plan__isnull=True).order_by("pk")):
        tenant.plan = enterprise if i % 2 == 0 else growth
        tenant.save(update_fields=["plan"])
    return [growth, enterprise]


def seed_billing(*, now: datetime | None = None, history_since: datetime | None = None) -> dict:
    """Price books, SLA policies and their evaluations since `history_since` (default: the last day), last month's
    invoices issued and this month's drafts."""
    now = now or datetime.now(tz=UTC)
    history_since = history_since or now - timedelta(hours=EVALUATED_HOURS)
    this_month = month_start(now.astimezone(UTC).date())
    last_month = month_start(this_month - timedelta(days=1))
    since = month_start(last_month - timedelta(days=60))
    with transaction.atomic():
        for plan in _plans():
            book = PriceBook.objects.create(plan=plan, currency="USD")
            factor = DISCOUNTS.get(plan.name, Decimal(1))
            ModelPrice.objects.bulk_create(
                ModelPrice(book=book, model_name=model, effective_from=since,
                           input_per_mtok=Decimal(pin) * factor, output_per_mtok=Decimal(pout) * factor)
                for model, (pin, pout) in LIST_PRICES.items())
            model, pin, pout = PRICE_CUT
            ModelPrice.objects.create(book=book, model_name=model, effective_from=last_month + timedelta(days=14),
                                      input_per_mtok=Decimal(pin) * factor, output_per_mtok=Decimal(pout) * factor)
            if plan.name in COMMITMENTS:
                Commitment.objects.create(book=book, effective_from=since, monthly_minimum=COMMITMENTS[plan.name])
            _policy(f"{plan.name} SLA", POLICIES.get(plan.name, POLICIES["Starter"]), plan=plan)
        for slug, (name, objectives) in OVERRIDES.items():
            tenant = Tenant.objects.filter(slug=slug).first()
            if tenant is not None:
                _policy(name, objectives, tenant=tenant)
        # What the hourly beat would have recorded since the history began: every hourly window. Windows of a
        # day or a month slide over a month of hours, so the seed evaluates those at each midnight and over the
        # last day only (the views and the invoices' credits read the same rows).
        end = evaluation_window_end(now)
        hourly = [end - timedelta(hours=h) for h in range(int((end - history_since).total_seconds() // 3600), -1, -1)]
        midnight = end.replace(hour=0)
        longer = {*hourly[-EVALUATED_HOURS:],
                  *(midnight - timedelta(days=d) for d in range((midnight.date() - last_month).days + 1))}
        evaluations = 0
        for tenant in Tenant.objects.filter(status=TenantStatus.ACTIVE).select_related("plan"):
            for tick in sorted(set(hourly) | longer):
                evaluations += len(sla_evaluate_tenant(tenant=tenant, window_end=tick, now=now,
                                                       windows=None if tick in longer else {Window.HOUR}))
        issued = drafts = 0
        for tenant in tenants_to_invoice().select_related("plan"):
            try:
                invoice_month(tenant=tenant, period_start=last_month, now=now)
                issued += 1
            except BillingError:
                invoice_refresh_draft(tenant=tenant, period_start=last_month, now=now)
            invoice_refresh_draft(tenant=tenant, period_start=this_month, now=now)
            drafts += 1
    return {"price_books": PriceBook.objects.count(), "sla_evaluations": evaluations, "invoices_issued": issued,
            "invoice_drafts": drafts}
