"""Factory P&L for capital partners: per site and month, revenue (exactly what the invoices charge, split by
site: economics.revenue), attributed cost (the attribution tier: every GPU-hour on the books), gross margin,
utilization and allocation rate; and the payback of the site's GPU capex at its current run rate (the last 30
days' gross margin). Revenue and cost are compared only in the same currency: no FX here."""

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.db.models import Q, Sum
from django.db.models.functions import TruncMonth
from django.utils import timezone

from portal.billing.selectors import as_utc, next_month
from portal.economics.costmodel import HOURS_PER_MONTH
from portal.economics.models import CostHour
from portal.economics.revenue import MonthInvoices, invoiced_by_site, usage_amounts, usage_revenue_by_site
from portal.economics.selectors import COST_SUMS, Cost, cost_of, deployment_sums
from portal.fleet.models import Site
from portal.fleet.selectors import gpus_on_books_by_site
from portal.tenants.models import Tenant

CENT = Decimal("0.01")


@dataclass
class PnlLine:
    site: Site
    month: date
    cost: Cost
    revenue: dict[str, Decimal] = field(default_factory=dict)
    allocated_gpu_hours: Decimal = Decimal(0)

    @property
    def same_currency_revenue(self) -> Decimal | None:
        """Revenue in the site's currency, when all of it is (None when some is priced in another currency)."""
        if set(self.revenue) - {self.site.currency}:
            return None
        return self.revenue.get(self.site.currency, Decimal("0.00"))

    @property
    def margin(self) -> Decimal | None:
        revenue = self.same_currency_revenue
        return None if revenue is None else (revenue - self.cost.total).quantize(CENT, rounding=ROUND_HALF_UP)

    @property
    def margin_share(self) -> float | None:
        revenue = self.same_currency_revenue
        return float(self.margin / revenue) if revenue else None

    @property
    def allocation_rate(self) -> float | None:
        return float(self.allocated_gpu_hours / self.cost.gpu_hours) if self.cost.gpu_hours else None


def _month(ts: datetime | date) -> date:
    return date(ts.year, ts.month, 1)


def _months(start: datetime, end: datetime) -> list[date]:
    months, month = [], _month(start)
    while as_utc(month) < end:
        months.append(month)
        month = next_month(month)
    return months


def billed_tenants():
    return Tenant.objects.filter(plan__price_book__isnull=False).order_by("pk")


def site_pnl(*, start: datetime, end: datetime, by_month: bool = True, now: datetime | None = None) -> list[PnlLine]:
    """P&L lines per site (and month) over [start, end). By month, revenue is each tenant-month's invoice (issued,
    else its draft: economics.revenue); over any other period, usage revenue rounded per line as invoices are. Every
    figure is read from month- and day-sized sums, so the page costs the same whatever the fleet's size."""
    now = now or timezone.now()
    sites = {s.pk: s for s in Site.objects.all()}
    lines: dict[tuple[int, date | None], PnlLine] = {}

    def line(site_id: int, ts: datetime | date) -> PnlLine:
        key = (site_id, _month(ts) if by_month else None)
        if key not in lines:
            site = sites[site_id]
            lines[key] = PnlLine(site=site, month=key[1] or start.date(), cost=Cost(currency=site.currency))
        return lines[key]

    costs = CostHour.objects.filter(ts__gte=start, ts__lt=end)
    group = ("site_id", "month") if by_month else ("site_id",)
    if by_month:
        costs = costs.annotate(month=TruncMonth("ts", tzinfo=UTC))
    for r in (costs.values(*group).annotate(held=Sum("gpu_hours", filter=Q(tenant__isnull=False)), **COST_SUMS)
              .order_by()):
        pnl = line(r["site_id"], r.get("month") or start)
        pnl.cost.add(cost_of(pnl.site.currency, r))
        pnl.allocated_gpu_hours += r["held"] or 0
    for r in deployment_sums(start=start, end=end, group=("day", "deployment__node__site_id"),
                             sums={"p": Sum("prompt_tokens"), "g": Sum("generation_tokens")}):
        line(r["deployment__node__site_id"], r["day"]).cost.tokens += r["p"] + r["g"]
    tenants = list(billed_tenants())
    amounts = usage_amounts(tenants=tenants, start=start, end=end)
    invoices = MonthInvoices(tenants=tenants, months=_months(start, end) if by_month else [], now=min(now, end))
    revenue: dict[tuple[int, date | None], dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for tenant in tenants:
        periods = ([(month, invoiced_by_site(tenant=tenant, period_start=month, invoices=invoices, amounts=amounts))
                    for month in _months(start, end)] if by_month
                   else [(start, usage_revenue_by_site(tenant=tenant, book=invoices.books.get(tenant.pk),
                                                       amounts=amounts))])
        for when, found in periods:
            if found is None:
                continue
            currency, by_site = found
            for site_id, amount in by_site.items():
                if site_id is not None and amount:
                    revenue[(site_id, line(site_id, when).month if by_month else None)][currency] += amount
    for key, amounts_by_currency in revenue.items():
        lines[key].revenue = dict(amounts_by_currency)
    return sorted(lines.values(), key=lambda p: (p.site.name, p.month))


@dataclass
class Payback:
    site: Site
    capex: Decimal
    monthly_margin: Decimal | None

    @property
    def months(self) -> float | None:
        if not self.monthly_margin or self.monthly_margin <= 0:
            return None
        return float(self.capex / self.monthly_margin)


def payback(*, now: datetime | None = None) -> list[Payback]:
    """Months to pay back each site's GPU capex on the books at the last 30 days' gross margin."""
    now = now or timezone.now()
    installed = gpus_on_books_by_site(at=now)
    recent = {p.site.pk: p for p in site_pnl(start=now - timedelta(days=30), end=now, by_month=False, now=now)}
    out = []
    for site in Site.objects.all():
        margin = recent[site.pk].margin if site.pk in recent else None
        monthly = margin * HOURS_PER_MONTH / Decimal(720) if margin is not None else None
        out.append(Payback(site=site, capex=site.gpu_capex * installed.get(site.pk, 0), monthly_margin=monthly))
    return out
