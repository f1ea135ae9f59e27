"""Reads for billing: prices in force, priced usage, revenue, and the invoices each audience may see.

Pricing rule: each UTC day's usage of a model is charged at the price in force on that day (the newest version with
effective_from <= day), so a price change mid-month splits the model's usage into one invoice line per price
version. A line's amount is input tokens x input price / 10^6 + output tokens x output price / 10^6, rounded half
up to the cent once per line; an invoice's total is the sum of its lines' amounts. A tenant's prices come from its
plan's price book (tenant.plan.price_book).
"""

from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import ROUND_HALF_UP, Decimal

from django.db.models import Min, QuerySet
from django.utils import timezone

from portal.billing.models import Commitment, Invoice, InvoiceLine, ModelPrice, PriceBook
from portal.capacity.models import Allocation
from portal.capacity.selectors import usage_for_tenant
from portal.tenants.models import Plan, Tenant, TenantStatus

MILLION = Decimal(1_000_000)
CENT = Decimal("0.01")


def to_cents(amount: Decimal) -> Decimal:
    return amount.quantize(CENT, rounding=ROUND_HALF_UP)


def line_amount(*, input_tokens: int, output_tokens: int, input_per_mtok: Decimal,
                output_per_mtok: Decimal) -> Decimal:
    return to_cents((input_tokens * input_per_mtok + output_tokens * output_per_mtok) / MILLION)


def month_start(day: date) -> date:
    return day.replace(day=1)


def next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def as_utc(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def price_book_for_tenant(*, tenant: Tenant) -> PriceBook | None:
    if tenant.plan_id is None:
        return None
    return PriceBook.objects.filter(plan_id=tenant.plan_id).first()


def price_books_for(*, tenants: list[Tenant]) -> dict[int, PriceBook | None]:
    """price_book_for_tenant for many tenants in one query."""
    books = {b.plan_id: b for b in PriceBook.objects.filter(plan_id__in={t.plan_id for t in tenants})}
    return {t.pk: books.get(t.plan_id) for t in tenants}


def service_starts(*, tenants: list[Tenant]) -> dict[int, datetime]:
    """When each tenant's service began: the start of the first capacity it held (none yet: absent). Commitments
    are owed from then on."""
    return dict(Allocation.objects.filter(tenant__in=tenants).values_list("tenant_id")
                .annotate(first=Min("starts_at")).order_by())


def served_in_month(*, started: datetime | None, period_start: date) -> bool:
    """Whether a tenant whose service began at `started` (service_starts) owes anything for the month: it began
    before the month ended. Invoices and the P&L both ask this."""
    return started is not None and started < as_utc(next_month(period_start))


def _day(at: date | datetime) -> date:
    return at.astimezone(UTC).date() if isinstance(at, datetime) else at


def price_in_force(*, tenant: Tenant, model_name: str, at: date | datetime) -> ModelPrice | None:
    """The price row of the tenant's plan for the model on the UTC day of `at`, or None when none is in force."""
    book = price_book_for_tenant(tenant=tenant)
    if book is None:
        return None
    return (ModelPrice.objects.filter(book=book, model_name=model_name, effective_from__lte=_day(at))
            .order_by("-effective_from").first())


def commitment_in_force(*, book: PriceBook, on: date) -> Commitment | None:
    return Commitment.objects.filter(book=book, effective_from__lte=on).order_by("-effective_from").first()


class PriceIndex:
    """All versions of a book's prices, to find the one in force per (model, day) without a query each."""

    def __init__(self, book: PriceBook | None):
        self.versions: dict[str, list[ModelPrice]] = defaultdict(list)
        if book is not None:
            for price in ModelPrice.objects.filter(book=book).order_by("model_name", "effective_from"):
                self.versions[price.model_name].append(price)

    def at(self, model_name: str, day: date) -> ModelPrice | None:
        versions = self.versions.get(model_name, [])
        i = bisect_right([p.effective_from for p in versions], day)
        return versions[i - 1] if i else None


@dataclass
class PricedUsage:
    model_name: str
    price: ModelPrice | None
    input_tokens: int = 0
    output_tokens: int = 0
    first_day: date | None = None
    last_day: date | None = None

    @property
    def amount(self) -> Decimal:
        if self.price is None:
            return Decimal("0.00")
        return line_amount(input_tokens=self.input_tokens, output_tokens=self.output_tokens,
                           input_per_mtok=self.price.input_per_mtok, output_per_mtok=self.price.output_per_mtok)


def priced_usage(*, tenant: Tenant, start: datetime, end: datetime, now: datetime | None = None) -> list[PricedUsage]:
    """The tenant's usage over [start, end), grouped per model and price version in force on each UTC day; usage
    with no price in force has price None. Tokens are exactly usage_for_tenant's."""
    index = PriceIndex(price_book_for_tenant(tenant=tenant))
    groups: dict[tuple[str, int | None], PricedUsage] = {}
    for line in usage_for_tenant(tenant=tenant, start=start, end=end, by_day=True, now=now):
        day = _day(line.day)
        price = index.at(line.model, day)
        group = groups.setdefault((line.model, price.pk if price else None),
                                  PricedUsage(model_name=line.model, price=price))
        group.input_tokens += line.prompt_tokens
        group.output_tokens += line.generation_tokens
        group.first_day = min(group.first_day or day, day)
        group.last_day = max(group.last_day or day, day)
    return sorted(groups.values(), key=lambda g: (g.model_name, g.first_day))


def revenue_for_tenant(*, tenant: Tenant, start: datetime, end: datetime) -> dict[str, Decimal]:
    """Currency -> revenue from the tenant's tokens x its price book over [start, end) (before SLA credits and
    commitment top-ups), rounded per model and price version as invoices are. Empty without a price book."""
    book = price_book_for_tenant(tenant=tenant)
    if book is None:
        return {}
    return {book.currency: sum((g.amount for g in priced_usage(tenant=tenant, start=start, end=end)), Decimal("0.00"))}


# Invoices ---------------------------------------------------------------------------------------------------------


def invoices_for_tenant(*, tenant: Tenant) -> QuerySet[Invoice]:
    return Invoice.objects.filter(tenant=tenant).order_by("-period_start")


def invoice_for_tenant(*, tenant: Tenant, invoice_id: int) -> Invoice | None:
    """One of the tenant's own invoices, or None (another tenant's id looks like one that does not exist)."""
    return Invoice.objects.filter(tenant=tenant, pk=invoice_id).select_related("tenant").first()


def invoices_for_operators(*, period_start: date | None = None, status: str | None = None) -> QuerySet[Invoice]:
    invoices = Invoice.objects.select_related("tenant", "issued_by").order_by("-period_start", "tenant__name")
    if period_start is not None:
        invoices = invoices.filter(period_start=period_start)
    if status:
        invoices = invoices.filter(status=status)
    return invoices


def invoice_lines(*, invoice: Invoice) -> QuerySet[InvoiceLine]:
    return invoice.lines.order_by("position")


def invoice_csv_rows(*, invoice: Invoice) -> list[list[str]]:
    """The invoice as CSV rows: a header block, one row per line, and the totals."""
    rows = [
        ["invoice", invoice.number], ["tenant", invoice.tenant.name], ["period_start", str(invoice.period_start)],
        ["period_end_exclusive", str(invoice.period_end)], ["status", invoice.status],
        ["currency", invoice.currency], [],
        ["position", "kind", "description", "model", "input_tokens", "output_tokens", "input_price_per_mtok",
         "output_price_per_mtok", "amount"],
    ]
    for line in invoice_lines(invoice=invoice):
        rows.append([str(line.position), line.kind, line.description, line.model_name, str(line.input_tokens),
                     str(line.output_tokens), "" if line.input_per_mtok is None else str(line.input_per_mtok),
                     "" if line.output_per_mtok is None else str(line.output_per_mtok), str(line.amount)])
    rows += [[], ["input_tokens", str(invoice.input_tokens)], ["output_tokens", str(invoice.output_tokens)],
             ["usage", str(invoice.usage_amount)], ["commitment_topup", str(invoice.commitment_topup)],
             ["sla_credits", str(invoice.credits)], ["total", str(invoice.total)]]
    return rows


def price_books() -> QuerySet[PriceBook]:
    return PriceBook.objects.select_related("plan").prefetch_related("prices", "commitments").order_by("plan__name")


def plans_without_price_book() -> QuerySet[Plan]:
    return Plan.objects.filter(price_book__isnull=True).order_by("name")


def current_month(now: datetime | None = None) -> date:
    return month_start((now or timezone.now()).astimezone(UTC).date())


def tenants_to_invoice() -> QuerySet[Tenant]:
    """Tenants billed this run: active or suspended (usage before a suspension is still owed), on a plan with a
    price book."""
    return Tenant.objects.filter(status__in=[TenantStatus.ACTIVE, TenantStatus.SUSPENDED],
                                 plan__price_book__isnull=False).order_by("pk")
