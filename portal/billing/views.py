"""Operator billing pages: invoices across tenants (issue, recompute, run a month), price books (new versions
only). Tenant-facing invoice pages are in tenant_views.py."""

import csv
from functools import partial

from django.contrib import messages
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from portal.accounts.access import operator_admin_required, operator_required
from portal.billing.forms import CommitmentForm, InvoiceFilterForm, PriceBookForm, PriceForm, RunForm
from portal.billing.models import Invoice, PriceBook
from portal.billing.selectors import (
    current_month,
    invoice_csv_rows,
    invoice_lines,
    invoices_for_operators,
    month_start,
    price_books,
    tenants_to_invoice,
)
from portal.billing.services import (
    BillingError,
    commitment_add,
    invoice_issue,
    invoice_refresh_draft,
    price_add,
    price_book_create,
)
from portal.billing.tasks import invoice_tenant_month
from portal.params import query_params


def invoice_csv_response(invoice: Invoice) -> HttpResponse:
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{invoice.number}.csv"'
    csv.writer(response).writerows(invoice_csv_rows(invoice=invoice))
    return response


def _list_page(request: HttpRequest, run_form: RunForm | None = None, status: int = 200) -> HttpResponse:
    filters = query_params(request, InvoiceFilterForm)
    month = filters["month"]
    invoices = invoices_for_operators(period_start=month_start(month) if month else None,
                                      status=filters["status"] or None)
    return render(request, "billing/operator_list.html", {
        "form": InvoiceFilterForm(request.GET), "invoices": invoices[:500], "run_form": run_form or RunForm(),
    }, status=status)


@operator_required
def invoice_list(request: HttpRequest) -> HttpResponse:
    return _list_page(request)


@operator_admin_required
@require_POST
def run_month(request: HttpRequest) -> HttpResponse:
    form = RunForm(request.POST)
    if form.is_valid() and month_start(form.cleaned_data["month"]) >= current_month():
        form.add_error("month", "Only a closed month can be invoiced; the running month stays a draft.")
    if not form.is_valid():
        return _list_page(request, form, status=400)
    month = month_start(form.cleaned_data["month"])
    tenant_ids = list(tenants_to_invoice().values_list("pk", flat=True))
    for tenant_id in tenant_ids:
        transaction.on_commit(partial(invoice_tenant_month.delay, tenant_id, month.isoformat()))
    messages.success(request, f"Invoicing {len(tenant_ids)} tenant(s) for {month:%B %Y} in the background.")
    return redirect(f"{reverse('billing:list')}?month={month:%Y-%m}")


def _invoice(invoice_id: int) -> Invoice:
    return get_object_or_404(Invoice.objects.select_related("tenant", "issued_by"), pk=invoice_id)


@operator_required
def invoice_detail(request: HttpRequest, invoice_id: int) -> HttpResponse:
    invoice = _invoice(invoice_id)
    return render(request, "billing/invoice.html", {"invoice": invoice, "lines": invoice_lines(invoice=invoice),
                                                    "operator": True})


@operator_required
def invoice_csv(request: HttpRequest, invoice_id: int) -> HttpResponse:
    return invoice_csv_response(_invoice(invoice_id))


@operator_admin_required
@require_POST
def invoice_issue_view(request: HttpRequest, invoice_id: int) -> HttpResponse:
    invoice = _invoice(invoice_id)
    try:
        invoice = invoice_issue(invoice_id=invoice.pk, by=request.user)
    except BillingError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Invoice {invoice.number} issued: {invoice.currency} {invoice.total}.")
    return redirect("billing:invoice", invoice_id=invoice.pk)


@operator_admin_required
@require_POST
def invoice_recompute(request: HttpRequest, invoice_id: int) -> HttpResponse:
    invoice = _invoice(invoice_id)
    if invoice.is_issued:
        messages.error(request, f"{invoice.number} is issued: issued invoices never change.")
    else:
        try:
            invoice_refresh_draft(tenant=invoice.tenant, period_start=invoice.period_start)
        except BillingError as exc:
            messages.error(request, str(exc))
        else:
            messages.success(request, f"Draft {invoice.number} recomputed from usage.")
    return redirect("billing:invoice", invoice_id=invoice.pk)


def _prices_page(request: HttpRequest, forms: dict | None = None, status: int = 200) -> HttpResponse:
    forms = forms or {}
    blank_price = PriceForm(initial={"effective_from": timezone.now().date()})
    blank_commitment = CommitmentForm(initial={"effective_from": timezone.now().date()})
    return render(request, "billing/prices.html", {
        "books": price_books(), "book_form": forms.get("book") or PriceBookForm(),
        "price_form": forms.get("price") or blank_price, "blank_price_form": blank_price,
        "commitment_form": forms.get("commitment") or blank_commitment, "blank_commitment_form": blank_commitment,
        "failed_book": forms.get("book_id"),
    }, status=status)


@operator_required
def prices(request: HttpRequest) -> HttpResponse:
    return _prices_page(request)


def _apply(form, call) -> bool:
    """Run a service with a valid form's data; a BillingError becomes an error on the field it names."""
    if not form.is_valid():
        return False
    try:
        call(form.cleaned_data)
    except BillingError as exc:
        form.add_error(exc.field if exc.field in form.fields else None, str(exc))
        return False
    return True


@operator_admin_required
@require_POST
def price_book_new(request: HttpRequest) -> HttpResponse:
    form = PriceBookForm(request.POST)
    if _apply(form, lambda d: price_book_create(plan=d["plan"], currency=d["currency"], by=request.user)):
        messages.success(request, f"Price book created for plan {form.cleaned_data['plan']}.")
        return redirect("billing:prices")
    return _prices_page(request, {"book": form}, status=400)


@operator_admin_required
@require_POST
def price_new(request: HttpRequest, book_id: int) -> HttpResponse:
    book = get_object_or_404(PriceBook.objects.select_related("plan"), pk=book_id)
    form = PriceForm(request.POST)
    if _apply(form, lambda d: price_add(book=book, by=request.user, **d)):
        messages.success(request, f"New price for {form.cleaned_data['model_name']} in {book}.")
        return redirect("billing:prices")
    return _prices_page(request, {"price": form, "book_id": book.pk}, status=400)


@operator_admin_required
@require_POST
def commitment_new(request: HttpRequest, book_id: int) -> HttpResponse:
    book = get_object_or_404(PriceBook.objects.select_related("plan"), pk=book_id)
    form = CommitmentForm(request.POST)
    if _apply(form, lambda d: commitment_add(book=book, by=request.user, **d)):
        messages.success(request, f"New minimum commitment in {book}.")
        return redirect("billing:prices")
    return _prices_page(request, {"commitment": form, "book_id": book.pk}, status=400)
