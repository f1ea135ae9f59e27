"""The tenant's invoices, mounted at tenant/<tenant_slug>/billing/. Every view is wrapped in tenant_required
(portal/tenants/access.py) and reads only through membership.tenant."""

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from portal.billing.models import Invoice
from portal.billing.selectors import current_month, invoice_for_tenant, invoice_lines, invoices_for_tenant
from portal.billing.services import BillingError, invoice_refresh_draft
from portal.billing.views import invoice_csv_response
from portal.tenants.access import tenant_admin_required, tenant_required
from portal.tenants.models import Membership


def _own(membership: Membership, invoice_id: int) -> Invoice:
    invoice = invoice_for_tenant(tenant=membership.tenant, invoice_id=invoice_id)
    if invoice is None:
        raise Http404("No such invoice")
    return invoice


@tenant_required
def invoice_list(request: HttpRequest, membership: Membership) -> HttpResponse:
    return render(request, "billing/tenant_list.html", {
        "membership": membership, "tenant": membership.tenant,
        "invoices": invoices_for_tenant(tenant=membership.tenant), "current_month": current_month(),
    })


@tenant_admin_required
@require_POST
def draft_refresh(request: HttpRequest, membership: Membership) -> HttpResponse:
    try:
        invoice = invoice_refresh_draft(tenant=membership.tenant, period_start=current_month())
    except BillingError as exc:
        messages.error(request, str(exc))
        return redirect("tenant_billing:list", tenant_slug=membership.tenant.slug)
    messages.success(request, f"Draft {invoice.number} recomputed from your usage so far.")
    return redirect("tenant_billing:invoice", tenant_slug=membership.tenant.slug, invoice_id=invoice.pk)


@tenant_required
def invoice_detail(request: HttpRequest, membership: Membership, invoice_id: int) -> HttpResponse:
    invoice = _own(membership, invoice_id)
    return render(request, "billing/invoice.html", {
        "membership": membership, "tenant": membership.tenant, "invoice": invoice,
        "lines": invoice_lines(invoice=invoice), "operator": False,
    })


@tenant_required
def invoice_csv(request: HttpRequest, membership: Membership, invoice_id: int) -> HttpResponse:
    return invoice_csv_response(_own(membership, invoice_id))
