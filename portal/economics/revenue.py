"""Revenue as invoiced, split by site: what the P&L counts as revenue is exactly what the invoices charge.

A tenant-month's revenue is its invoice's lines (usage, commitment top-up, SLA credits): the issued invoice's when
there is one, else the stored draft's (refreshed every hour and on demand), else the draft as computed now. Each
usage line is split across sites by the amount its tokens came to at each site (from the deployment tier, whose
tokens the books prove equal to usage); the top-up and credits, which belong to the whole month, by the sites'
shares of the usage. Every split is to the cent by largest remainder, so the sites' parts add up to each line
exactly. The split reads a few rows per tenant, model, site and day, never the raw usage.
"""

from collections import defaultdict
from datetime import date, datetime
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal

from django.db.models import Sum

from portal.billing.models import Invoice, InvoiceStatus, LineKind, PriceBook
from portal.billing.selectors import (
    CENT,
    MILLION,
    PriceIndex,
    as_utc,
    next_month,
    price_books_for,
    served_in_month,
    service_starts,
)
from portal.capacity.selectors import allocations_overlapping
from portal.economics.selectors import deployment_sums
from portal.tenants.models import Tenant

Line = tuple[str, str, int | None, Decimal]  # kind, model, price id, amount
# (tenant id, month, model, price id) -> site id -> exact usage amount
Amounts = dict[tuple[int, date, str, int | None], dict[int, Decimal]]


def largest_remainder(total: Decimal, weights: dict) -> dict:
    """`total` (a whole number of cents, either sign) split in proportion to `weights`, to the cent, summing
    exactly to it. Ties go to the key that sorts first, so the split is the same however it is asked."""
    keys = sorted(weights, key=lambda k: (k is None, k or 0))
    if not keys:
        return {}
    weight = sum((weights[k] for k in keys), Decimal(0))
    if weight <= 0:
        return {keys[0]: total, **{k: Decimal("0.00") for k in keys[1:]}}
    sign, total = (-1, -total) if total < 0 else (1, total)
    exact = {k: total * weights[k] / weight for k in keys}
    parts = {k: exact[k].quantize(CENT, rounding=ROUND_DOWN) for k in keys}
    left = int(((total - sum(parts.values(), Decimal(0))) / CENT).to_integral_value())
    for k in sorted(keys, key=lambda k: -(exact[k] - parts[k]))[:left]:  # stable: ties keep the key order
        parts[k] += CENT
    return {k: sign * v for k, v in parts.items()}


class MonthInvoices:
    """The invoices of some tenants for some months, as the P&L counts them: issued, else the stored draft
    (refreshed every hour and on demand), else computed now; a month before the tenant's service started has no
    lines (no usage, and no commitment is owed before service starts). Stored invoices, price books and service
    starts are read at once for all of them."""

    def __init__(self, *, tenants: list[Tenant], months: list[date], now: datetime):
        self.now = now
        self.books = price_books_for(tenants=tenants)
        self.stored: dict[tuple[int, date], Invoice] = {}
        for invoice in (Invoice.objects.filter(tenant__in=tenants, period_start__in=months,
                                               status__in=[InvoiceStatus.ISSUED, InvoiceStatus.DRAFT])
                        .prefetch_related("lines")):
            key = (invoice.tenant_id, invoice.period_start)
            if key not in self.stored or invoice.status == InvoiceStatus.ISSUED:
                self.stored[key] = invoice
        self.service_start = service_starts(tenants=tenants)

    def lines(self, *, tenant: Tenant, period_start: date) -> tuple[str, list[Line]] | None:
        """(currency, lines) of the tenant's invoice for the month; None without a price book."""
        from portal.billing.services import invoice_compute  # billing's services import its selectors

        book = self.books.get(tenant.pk)
        if book is None:
            return None
        invoice = self.stored.get((tenant.pk, period_start))
        if invoice is not None:
            return invoice.currency, [(ln.kind, ln.model_name, ln.price_id, ln.amount) for ln in invoice.lines.all()]
        if not served_in_month(started=self.service_start.get(tenant.pk), period_start=period_start):
            return book.currency, []
        computed = invoice_compute(tenant=tenant, book=book, period_start=period_start, now=self.now)
        return book.currency, [(ln.kind, ln.model_name, ln.price.pk if ln.price else None, ln.amount)
                               for ln in computed.lines]


def usage_amounts(*, tenants: list[Tenant], start: datetime, end: datetime) -> Amounts:
    """Exact (unrounded) usage amounts per tenant, month, (model, price version) and site over [start, end)."""
    books = price_books_for(tenants=tenants)
    # tenants share books: one index a book
    by_book = {book.pk: PriceIndex(book) for book in {b.pk: b for b in books.values() if b}.values()}
    indexes = {tenant_id: by_book[book.pk] for tenant_id, book in books.items() if book is not None}
    out: Amounts = defaultdict(lambda: defaultdict(Decimal))
    for r in deployment_sums(start=start, end=end, group=("day", "deployment__tenant_id", "deployment__model_name",
                                                          "deployment__node__site_id"),
                             sums={"prompt": Sum("prompt_tokens"), "generation": Sum("generation_tokens")}):
        index = indexes.get(r["deployment__tenant_id"])
        day = r["day"].date()
        price = index.at(r["deployment__model_name"], day) if index else None
        if price is None:
            continue
        key = (r["deployment__tenant_id"], date(day.year, day.month, 1), r["deployment__model_name"], price.pk)
        out[key][r["deployment__node__site_id"]] += (r["prompt"] * price.input_per_mtok
                                                     + r["generation"] * price.output_per_mtok) / MILLION
    return out


def _held_by_site(tenant: Tenant, start: datetime, end: datetime) -> dict[int, Decimal]:
    """Hours of capacity the tenant held in [start, end), per site."""
    held: dict[int, Decimal] = defaultdict(Decimal)
    for a in allocations_overlapping(tenant=tenant, start=start, end=end).select_related("gpu__node"):
        lo, hi = max(a.starts_at, start), min(a.ends_at or end, end)
        held[a.gpu.node.site_id] += Decimal((hi - lo).total_seconds())
    return {site: seconds for site, seconds in held.items() if seconds > 0}


def invoiced_by_site(*, tenant: Tenant, period_start: date, invoices: MonthInvoices,
                     amounts: Amounts) -> tuple[str, dict[int | None, Decimal]] | None:
    """(currency, revenue per site) of the tenant's invoice for the month; None without a price book. `amounts`
    are usage_amounts() over a range covering the month."""
    found = invoices.lines(tenant=tenant, period_start=period_start)
    if found is None:
        return None
    currency, lines = found
    mine = {(model, price): by_site for (t, month, model, price), by_site in amounts.items()
            if t == tenant.pk and month == period_start}
    every_site: dict[int | None, Decimal] = defaultdict(Decimal)
    for by_site in mine.values():
        for site, amount in by_site.items():
            every_site[site] += amount
    # A line whose usage is no longer found follows all of the month's usage; a month without usage (a commitment
    # alone) follows the capacity the tenant holds in the month (a service starting later this month owes its
    # commitment already, on the invoice and here); one with neither is revenue of no site (None), which the books
    # report.
    held: dict[int, Decimal] | None = None

    def weights_or_fallback(weights: dict | None) -> dict:
        nonlocal held
        if weights:
            return weights
        if every_site:
            return dict(every_site)
        if held is None:
            held = _held_by_site(tenant, as_utc(period_start), as_utc(next_month(period_start)))
        return held or {None: Decimal(1)}

    revenue: dict[int | None, Decimal] = defaultdict(Decimal)
    usage: dict[int | None, Decimal] = defaultdict(Decimal)
    for kind, model, price_id, amount in lines:
        if kind == LineKind.USAGE and amount:
            for site, part in largest_remainder(amount, weights_or_fallback(mine.get((model, price_id)))).items():
                revenue[site] += part
                usage[site] += part
    for kind, _model, _price, amount in lines:
        if kind != LineKind.USAGE and amount:
            for site, part in largest_remainder(amount, weights_or_fallback(dict(usage))).items():
                revenue[site] += part
    return currency, dict(revenue)


def usage_revenue_by_site(*, tenant: Tenant, book: PriceBook | None,
                          amounts: Amounts) -> tuple[str, dict[int | None, Decimal]] | None:
    """(currency, usage revenue per site) over the range of `amounts` for the tenant priced by `book` (its price
    book: billing.selectors.price_books_for): each (model, price version) rounded to the cent once, as an invoice
    line is, then split by site. No top-ups or credits (they belong to whole months)."""
    if book is None:
        return None
    lines: dict[tuple[str, int | None], dict[int, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for (t, _month, model, price), by_site in amounts.items():
        if t == tenant.pk:
            for site, amount in by_site.items():
                lines[(model, price)][site] += amount
    revenue: dict[int | None, Decimal] = defaultdict(Decimal)
    for by_site in lines.values():
        line = sum(by_site.values(), Decimal(0)).quantize(CENT, rounding=ROUND_HALF_UP)
        for site, part in largest_remainder(line, by_site).items():
            revenue[site] += part
    return book.currency, dict(revenue)
