"""Revenue as invoiced, split by site: what the P&L counts as revenue is exactly what the invoices charge.

A tenant-month's revenue is its invoice's lines (usage, commitment top-up, SLA credits): the issued invoice's when
there is one, otherwise the draft's as computed now. Each usage line is split across sites by the exact amount of
its tokens served there; the top-up and credits, which belong to the whole month, by the sites' shares of the
usage. Every split is to the cent by largest remainder, so the sites' parts add up to each line exactly.
"""

from collections import defaultdict
from datetime import date, datetime
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal

from portal.billing.models import Invoice, InvoiceStatus, LineKind
from portal.billing.selectors import (
    CENT,
    MILLION,
    PriceIndex,
    as_utc,
    next_month,
    price_book_for_tenant,
)
from portal.capacity.selectors import allocations_overlapping, usage_for_tenant
from portal.tenants.models import Tenant


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


def _site_amounts(*, tenant: Tenant, start: datetime, end: datetime, now: datetime,
                  index: PriceIndex) -> dict[tuple[str, int | None], dict[int, Decimal]]:
    """Exact (unrounded) usage amounts per (model, price version) and site."""
    out: dict[tuple[str, int | None], dict[int, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for line in usage_for_tenant(tenant=tenant, start=start, end=end, by_day=True, now=now, by_site=True):
        price = index.at(line.model, line.day.date())
        if price is not None:
            out[(line.model, price.pk)][line.site_id] += (line.prompt_tokens * price.input_per_mtok
                                                          + line.generation_tokens * price.output_per_mtok) / MILLION
    return out


def _held_by_site(tenant: Tenant, start: datetime, end: datetime) -> dict[int, Decimal]:
    """Hours of capacity the tenant held in [start, end), per site."""
    held: dict[int, Decimal] = defaultdict(Decimal)
    for a in allocations_overlapping(tenant=tenant, start=start, end=end).select_related("gpu__node"):
        lo, hi = max(a.starts_at, start), min(a.ends_at or end, end)
        held[a.gpu.node.site_id] += Decimal((hi - lo).total_seconds())
    return {site: seconds for site, seconds in held.items() if seconds > 0}


def invoiced_by_site(*, tenant: Tenant, period_start: date,
                     now: datetime) -> tuple[str, dict[int | None, Decimal]] | None:
    """(currency, revenue per site) of the tenant's invoice for the month; None without a price book."""
    from portal.billing.services import invoice_compute  # services import these selectors

    book = price_book_for_tenant(tenant=tenant)
    if book is None:
        return None
    start, end = as_utc(period_start), min(as_utc(next_month(period_start)), now)
    issued = Invoice.objects.filter(tenant=tenant, period_start=period_start, status=InvoiceStatus.ISSUED).first()
    if issued is not None:
        lines = [(line.kind, line.model_name, line.price_id, line.amount) for line in issued.lines.all()]
        currency = issued.currency
    else:
        computed = invoice_compute(tenant=tenant, book=book, period_start=period_start, now=now)
        lines = [(line.kind, line.model_name, line.price.pk if line.price else None, line.amount)
                 for line in computed.lines]
        currency = book.currency
    amounts = _site_amounts(tenant=tenant, start=start, end=end, now=now, index=PriceIndex(book))
    every_site: dict[int | None, Decimal] = defaultdict(Decimal)
    for by_site in amounts.values():
        for site, amount in by_site.items():
            every_site[site] += amount
    # A line whose usage is no longer found (late usage changed it after issue) follows all of the month's usage;
    # a month without usage (a commitment alone) follows the capacity the tenant held; one with neither is revenue
    # of no site (None), which the books report.
    fallback = dict(every_site) or _held_by_site(tenant, start, end) or {None: Decimal(1)}
    revenue: dict[int | None, Decimal] = defaultdict(Decimal)
    usage: dict[int | None, Decimal] = defaultdict(Decimal)
    for kind, model, price_id, amount in lines:
        if kind == LineKind.USAGE and amount:
            for site, part in largest_remainder(amount, amounts.get((model, price_id)) or fallback).items():
                revenue[site] += part
                usage[site] += part
    for kind, _model, _price, amount in lines:
        if kind != LineKind.USAGE and amount:
            for site, part in largest_remainder(amount, dict(usage) or fallback).items():
                revenue[site] += part
    return currency, dict(revenue)


def usage_revenue_by_site(*, tenant: Tenant, start: datetime, end: datetime,
                          now: datetime) -> tuple[str, dict[int | None, Decimal]] | None:
    """(currency, usage revenue per site) over any [start, end): each (model, price version) rounded to the cent
    once, as an invoice line is, then split by site. No top-ups or credits (they belong to whole months)."""
    book = price_book_for_tenant(tenant=tenant)
    if book is None:
        return None
    revenue: dict[int | None, Decimal] = defaultdict(Decimal)
    for by_site in _site_amounts(tenant=tenant, start=start, end=end, now=now, index=PriceIndex(book)).values():
        line = sum(by_site.values(), Decimal(0)).quantize(CENT, rounding=ROUND_HALF_UP)
        for site, part in largest_remainder(line, by_site).items():
            revenue[site] += part
    return book.currency, dict(revenue)
