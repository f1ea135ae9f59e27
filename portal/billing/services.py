"""Writes for billing: price book versions, and computing, recomputing and issuing invoices.

Invoice arithmetic (see selectors for the pricing rule; docs/economics.md, "Contract rules"):
  usage       = sum of the usage lines (one per model and price version, each rounded to the cent)
  minimum     = the commitment in force on the month's first day, prorated by days for the month the tenant's
                service starts in (from the day it first held capacity), rounded to the cent
  top-up      = max(0, minimum - usage)
  SLA credits = per objective with a credit percentage that breached in at least one of its evaluation windows
                of the month (or of the month so far, for a draft): usage x credit % / 100, rounded to the cent.
                Credits come off the usage charges only, never the top-up (a commitment is owed whatever the
                service level); all credits together never exceed the usage
  total       = usage + top-up - credits = the sum of every line's amount
"""

from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal

from django.db import IntegrityError, transaction
from django.utils import timezone

from portal.accounts.models import User
from portal.audit.services import audit_record
from portal.billing.models import (
    CURRENCY,
    Commitment,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    LineKind,
    ModelPrice,
    PriceBook,
)
from portal.billing.selectors import (
    as_utc,
    commitment_in_force,
    month_start,
    next_month,
    price_book_for_tenant,
    priced_usage,
    served_in_month,
    service_starts,
    to_cents,
)
from portal.sla.models import SLI_UNITS, Sli
from portal.sla.selectors import objectives_for_tenant, sla_breached_windows
from portal.tenants.models import Plan, Tenant


class BillingError(Exception):
    """A billing action that cannot be done; `field` names the form field at fault, if any."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass
class ComputedLine:
    kind: str
    description: str
    amount: Decimal
    model_name: str = ""
    price: ModelPrice | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    sli: str = ""


@dataclass
class Computed:
    lines: list[ComputedLine]
    usage_through: datetime
    unpriced: list[str]

    def amount(self, kind: str) -> Decimal:
        return sum((line.amount for line in self.lines if line.kind == kind), Decimal("0.00"))


def invoice_compute(*, tenant: Tenant, book: PriceBook, period_start: date, now: datetime) -> Computed:
    """The lines of the tenant's invoice for the month starting `period_start`, with usage up to the month's end or
    `now`, whichever comes first."""
    start = as_utc(period_start)
    end = min(as_utc(next_month(period_start)), now)
    lines = []
    unpriced = []
    for group in priced_usage(tenant=tenant, start=start, end=end, now=now):
        if group.price is None:
            unpriced.append(group.model_name)
            description = f"{group.model_name}: no price in force"
        else:
            description = (f"{group.model_name}, {group.first_day:%Y-%m-%d} to {group.last_day:%Y-%m-%d} at "
                           f"{book.currency} {group.price.input_per_mtok.normalize():f} in / "
                           f"{group.price.output_per_mtok.normalize():f} out per 1M tokens")
        lines.append(ComputedLine(kind=LineKind.USAGE, description=description, amount=group.amount,
                                  model_name=group.model_name, price=group.price, input_tokens=group.input_tokens,
                                  output_tokens=group.output_tokens))
    usage = sum((line.amount for line in lines), Decimal("0.00"))
    commitment = commitment_in_force(book=book, on=period_start)
    if commitment is not None:
        minimum, days = prorated_minimum(tenant=tenant, monthly_minimum=commitment.monthly_minimum,
                                         period_start=period_start)
        if minimum > usage:
            of_month = "" if days is None else f", prorated for {days[0]} of {days[1]} days"
            lines.append(ComputedLine(kind=LineKind.COMMITMENT, amount=minimum - usage,
                                      description=f"Minimum monthly commitment of {book.currency} "
                                                  f"{commitment.monthly_minimum}{of_month}: top-up"))
    lines += _credits(tenant=tenant, start=start, end=end, now=now, usage=usage)
    return Computed(lines=lines, usage_through=end, unpriced=sorted(set(unpriced)))


def service_start(*, tenant: Tenant) -> datetime | None:
    """When the tenant's service began (billing.selectors.service_starts)."""
    return service_starts(tenants=[tenant]).get(tenant.pk)


def prorated_minimum(*, tenant: Tenant, monthly_minimum: Decimal,
                     period_start: date) -> tuple[Decimal, tuple[int, int] | None]:
    """The month's minimum commitment: whole for a month the tenant's service ran all of, by days (the days from
    its start to the month's end, the start day included) for the month it started in, nothing before. Returns
    (amount, (days charged, days in month) when prorated)."""
    start = service_start(tenant=tenant)
    days_in_month = (next_month(period_start) - period_start).days
    if not served_in_month(started=start, period_start=period_start):
        return Decimal("0.00"), (0, days_in_month)
    first_day = start.astimezone(UTC).date()
    if first_day <= period_start:
        return monthly_minimum, None
    days = (next_month(period_start) - first_day).days
    return to_cents(monthly_minimum * days / days_in_month), (days, days_in_month)


def _credits(*, tenant: Tenant, start: datetime, end: datetime, now: datetime, usage: Decimal) -> list[ComputedLine]:
    """One credit per objective that breached in at least one evaluation window of [start, end), on the usage."""
    objectives = [o for o in objectives_for_tenant(tenant=tenant) if o.credit_pct > 0]
    if not objectives or usage <= 0 or start >= end:
        return []
    breached = sla_breached_windows(tenant=tenant, start=start, end=min(end, now), slis={o.sli for o in objectives})
    lines, remaining = [], usage
    for objective in objectives:
        windows = breached.get(objective.sli)
        if not windows or remaining <= 0:
            continue
        credit = min(to_cents(usage * objective.credit_pct / 100), remaining)
        remaining -= credit
        unit = SLI_UNITS[Sli(objective.sli)]
        lines.append(ComputedLine(
            kind=LineKind.CREDIT, amount=-credit, sli=objective.sli,
            description=(f"SLA credit {objective.credit_pct.normalize():f}% of usage: {Sli(objective.sli).label} "
                         f"breached its target {objective.target_label} in {windows.count} of {windows.total} "
                         f"windows, first ending {windows.first:%Y-%m-%d %H:%M} UTC (worst {windows.worst:.4g} "
                         f"{unit})")))
    return lines


def invoice_number(*, tenant: Tenant, period_start: date) -> str:
    return f"INV-{period_start:%Y%m}-{tenant.pk:05d}"


def _locked_invoice(*, tenant: Tenant, book: PriceBook, period_start: date, now: datetime) -> Invoice:
    """The tenant-month's invoice, locked for this transaction; created as an empty draft if there is none."""
    invoice = Invoice.objects.select_for_update().filter(tenant=tenant, period_start=period_start).first()
    if invoice is not None:
        return invoice
    try:
        with transaction.atomic():
            return Invoice.objects.create(
                tenant=tenant, period_start=period_start, period_end=next_month(period_start),
                number=invoice_number(tenant=tenant, period_start=period_start), currency=book.currency,
                usage_through=as_utc(period_start), computed_at=now)
    except IntegrityError:
        # Another worker created it between our read and insert; take theirs (and wait for its lock).
        return Invoice.objects.select_for_update().get(tenant=tenant, period_start=period_start)


def _recompute(*, invoice: Invoice, book: PriceBook, now: datetime) -> Computed:
    computed = invoice_compute(tenant=invoice.tenant, book=book, period_start=invoice.period_start, now=now)
    invoice.lines.all().delete()
    InvoiceLine.objects.bulk_create(
        InvoiceLine(invoice=invoice, position=position, kind=line.kind, description=line.description[:300],
                    model_name=line.model_name, price=line.price, input_tokens=line.input_tokens,
                    output_tokens=line.output_tokens, sli=line.sli, amount=line.amount,
                    input_per_mtok=line.price.input_per_mtok if line.price else None,
                    output_per_mtok=line.price.output_per_mtok if line.price else None)
        for position, line in enumerate(computed.lines, start=1)
    )
    usage_lines = [line for line in computed.lines if line.kind == LineKind.USAGE]
    invoice.currency = book.currency
    invoice.input_tokens = sum(line.input_tokens for line in usage_lines)
    invoice.output_tokens = sum(line.output_tokens for line in usage_lines)
    invoice.usage_amount = computed.amount(LineKind.USAGE)
    invoice.commitment_topup = computed.amount(LineKind.COMMITMENT)
    invoice.credits = -computed.amount(LineKind.CREDIT)
    invoice.total = sum((line.amount for line in computed.lines), Decimal("0.00"))
    invoice.usage_through = computed.usage_through
    invoice.computed_at = now
    invoice.save()
    return computed


def _book(tenant: Tenant) -> PriceBook:
    book = price_book_for_tenant(tenant=tenant)
    if book is None:
        raise BillingError(f"{tenant} has no price book: its plan needs one before it can be invoiced.")
    return book


def invoice_refresh_draft(*, tenant: Tenant, period_start: date, now: datetime | None = None) -> Invoice:
    """Create or recompute the tenant-month's draft from usage so far. An issued invoice is returned untouched."""
    now = now or timezone.now()
    period_start = month_start(period_start)
    book = _book(tenant)
    with transaction.atomic():
        invoice = _locked_invoice(tenant=tenant, book=book, period_start=period_start, now=now)
        if not invoice.is_issued:
            _recompute(invoice=invoice, book=book, now=now)
    return invoice


def _issue(*, invoice: Invoice, by: User | None, now: datetime) -> Invoice:
    if invoice.is_issued:
        return invoice
    if as_utc(invoice.period_end) > now:
        raise BillingError(f"{invoice.period_start:%B %Y} is not over yet: its invoice stays a draft until then.")
    book = _book(invoice.tenant)
    computed = _recompute(invoice=invoice, book=book, now=now)
    if computed.unpriced:
        raise BillingError(f"No price in force for {', '.join(computed.unpriced)} in {book}: add one, then issue.")
    invoice.status, invoice.issued_at, invoice.issued_by = InvoiceStatus.ISSUED, now, by
    invoice.save()
    audit_record(actor=by, action="invoice.issue", target=invoice, tenant=invoice.tenant,
                 after={"number": invoice.number, "currency": invoice.currency, "total": invoice.total,
                        "tokens": invoice.tokens})
    return invoice


def invoice_issue(*, invoice_id: int, by: User | None, now: datetime | None = None) -> Invoice:
    """Recompute a draft of a closed month from final usage and issue it; issuing it again changes nothing."""
    with transaction.atomic():
        invoice = Invoice.objects.select_for_update().select_related("tenant").get(pk=invoice_id)
        return _issue(invoice=invoice, by=by, now=now or timezone.now())


def invoice_month(*, tenant: Tenant, period_start: date, now: datetime | None = None,
                  by: User | None = None) -> Invoice:
    """Invoice a closed month in one transaction: create or recompute the draft, then issue it. Idempotent: a
    tenant-month has one invoice (unique constraint), and an issued one is returned as it is."""
    now = now or timezone.now()
    period_start = month_start(period_start)
    book = _book(tenant)
    with transaction.atomic():
        invoice = _locked_invoice(tenant=tenant, book=book, period_start=period_start, now=now)
        return _issue(invoice=invoice, by=by, now=now)


def invoice_delete_draft(*, invoice_id: int, by: User | None) -> None:
    with transaction.atomic():
        invoice = Invoice.objects.select_for_update().get(pk=invoice_id)
        if invoice.is_issued:
            raise BillingError(f"{invoice.number} is issued: issued invoices are never deleted.")
        audit_record(actor=by, action="invoice.delete_draft", target=invoice, tenant=invoice.tenant)
        invoice.delete()


# Price books ------------------------------------------------------------------------------------------------------


def _today() -> date:
    return timezone.now().astimezone(UTC).date()


def price_book_create(*, plan: Plan, currency: str, by: User | None) -> PriceBook:
    currency = currency.strip().upper()
    try:
        CURRENCY(currency)
    except Exception:
        raise BillingError("Use a three-letter ISO 4217 code, e.g. USD.", field="currency") from None
    if PriceBook.objects.filter(plan=plan).exists():
        raise BillingError(f"Plan {plan} already has a price book.", field="plan")
    with transaction.atomic():
        book = PriceBook.objects.create(plan=plan, currency=currency)
        audit_record(actor=by, action="pricebook.create", target=book, after={"plan": plan.name, "currency": currency})
    return book


def _not_in_past(effective_from: date, today: date | None) -> None:
    today = today or _today()
    if effective_from < today:
        raise BillingError(f"Changes take effect from today ({today}) or later, never in the past, so periods "
                           "already billed keep their prices.", field="effective_from")


def price_add(*, book: PriceBook, model_name: str, effective_from: date, input_per_mtok: Decimal,
              output_per_mtok: Decimal, by: User | None, today: date | None = None) -> ModelPrice:
    """Add a price version for a model, in force from `effective_from` (today or later) until the next version."""
    model_name = model_name.strip()
    if not model_name:
        raise BillingError("Name the model, as deployed.", field="model_name")
    for name, value in (("input_per_mtok", input_per_mtok), ("output_per_mtok", output_per_mtok)):
        if value < 0:
            raise BillingError("A price cannot be negative.", field=name)
    _not_in_past(effective_from, today)
    with transaction.atomic():
        try:
            with transaction.atomic():
                price = ModelPrice.objects.create(book=book, model_name=model_name, effective_from=effective_from,
                                                  input_per_mtok=input_per_mtok, output_per_mtok=output_per_mtok,
                                                  created_by=by)
        except IntegrityError:
            raise BillingError(f"A price for {model_name} already takes effect on {effective_from}; versions are "
                               "never edited, so choose another day.", field="effective_from") from None
        audit_record(actor=by, action="price.add", target=price, after={
            "plan": book.plan.name, "model": model_name, "effective_from": effective_from,
            "input_per_mtok": input_per_mtok, "output_per_mtok": output_per_mtok, "currency": book.currency})
    return price


def commitment_add(*, book: PriceBook, effective_from: date, monthly_minimum: Decimal, by: User | None,
                   today: date | None = None) -> Commitment:
    """Add a minimum-commitment version; a month uses the version in force on its first day."""
    if monthly_minimum < 0:
        raise BillingError("A commitment cannot be negative.", field="monthly_minimum")
    _not_in_past(effective_from, today)
    with transaction.atomic():
        try:
            with transaction.atomic():
                commitment = Commitment.objects.create(book=book, effective_from=effective_from,
                                                       monthly_minimum=monthly_minimum, created_by=by)
        except IntegrityError:
            raise BillingError(f"A commitment already takes effect on {effective_from}; choose another day.",
                               field="effective_from") from None
        audit_record(actor=by, action="commitment.add", target=commitment, after={
            "plan": book.plan.name, "effective_from": effective_from, "monthly_minimum": monthly_minimum,
            "currency": book.currency})
    return commitment
