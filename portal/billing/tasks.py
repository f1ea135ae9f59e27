"""Invoicing. Beat runs `invoice_closed_month` daily (a missed run catches up the next day; issued invoices are
skipped) and `refresh_drafts` hourly; both fan out one idempotent task per tenant, taking ids."""

from datetime import date, timedelta
from functools import partial

from celery import shared_task
from django.db import transaction
from django.utils import timezone

from portal.alerts.models import Severity
from portal.alerts.services import alert_raise, alert_resolve_key
from portal.billing.selectors import current_month, month_start, tenants_to_invoice
from portal.billing.services import BillingError, invoice_month, invoice_refresh_draft
from portal.tenants.models import Tenant


@shared_task(acks_late=True)
def invoice_closed_month(period_start: str | None = None) -> int:
    """Invoice the month before the current one (or `period_start`'s) for every tenant that is billed."""
    month = date.fromisoformat(period_start) if period_start else month_start(current_month() - timedelta(days=1))
    tenant_ids = list(tenants_to_invoice().values_list("pk", flat=True))
    for tenant_id in tenant_ids:
        transaction.on_commit(partial(invoice_tenant_month.delay, tenant_id, month.isoformat()))
    return len(tenant_ids)


@shared_task(acks_late=True)
def invoice_tenant_month(tenant_id: int, period_start: str) -> int | None:
    """Issue one tenant-month's invoice. When it cannot be issued (a model without a price), the draft is kept for
    an operator and an alert says why."""
    tenant = Tenant.objects.filter(pk=tenant_id).select_related("plan").first()
    if tenant is None:
        return None
    month = date.fromisoformat(period_start)
    key = f"billing:{tenant.pk}:{month:%Y-%m}"
    try:
        invoice = invoice_month(tenant=tenant, period_start=month)
    except BillingError as exc:
        draft = invoice_refresh_draft(tenant=tenant, period_start=month)
        alert_raise(key=key, kind="billing", severity=Severity.WARNING, at=timezone.now(),
                    title=f"Invoice {draft.number} for {tenant.name} not issued", detail=str(exc))
        return None
    alert_resolve_key(key=key)
    return invoice.pk


@shared_task(acks_late=True)
def refresh_drafts() -> int:
    """Recompute every billed tenant's draft for the running month."""
    tenant_ids = list(tenants_to_invoice().values_list("pk", flat=True))
    for tenant_id in tenant_ids:
        transaction.on_commit(partial(refresh_tenant_draft.delay, tenant_id))
    return len(tenant_ids)


@shared_task(acks_late=True)
def refresh_tenant_draft(tenant_id: int) -> int | None:
    tenant = Tenant.objects.filter(pk=tenant_id).select_related("plan").first()
    if tenant is None:
        return None
    try:
        return invoice_refresh_draft(tenant=tenant, period_start=current_month()).pk
    except BillingError:
        return None
