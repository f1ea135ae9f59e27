"""Factory P&L for capital partners: per site and month, revenue (tokens x each tenant's price book), attributed
cost, gross margin, utilization and allocation rate; and the payback of the site's GPU capex at its current run
rate (the last 30 days' gross margin). Revenue and cost are compared only in the same currency: no FX here."""

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.db.models import Count, Sum
from django.utils import timezone

from portal.billing.selectors import PriceIndex, price_book_for_tenant
from portal.economics.models import CostHour
from portal.economics.selectors import COST_SUMS, MILLION, Cost, deployment_sums
from portal.fleet.models import Gpu, NodeStatus, Site
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


def _month(ts: datetime) -> date:
    return date(ts.year, ts.month, 1)


def site_pnl(*, start: datetime, end: datetime, by_month: bool = True) -> list[PnlLine]:
    """P&L lines per site (and month) over [start, end), from the attribution tier and the price books."""
    sites = {s.pk: s for s in Site.objects.all()}
    lines: dict[tuple[int, date | None], PnlLine] = {}

    def line(site_id: int, ts: datetime) -> PnlLine:
        key = (site_id, _month(ts) if by_month else None)
        if key not in lines:
            site = sites[site_id]
            lines[key] = PnlLine(site=site, month=key[1] or start.date(), cost=Cost(currency=site.currency))
        return lines[key]

    for r in (CostHour.objects.filter(ts__gte=start, ts__lt=end).values("site_id", "tenant_id", "ts")
              .annotate(**COST_SUMS)):
        pnl = line(r["site_id"], r["ts"])
        pnl.cost.add(Cost(currency=pnl.site.currency, capex=r["c"], energy=r["e"], opex=r["o"], gpu_hours=r["g"],
                          busy_gpu_hours=r["b"], energy_kwh=r["k"]))
        if r["tenant_id"] is not None:
            pnl.allocated_gpu_hours += r["g"]
    indexes: dict[int, tuple[str, PriceIndex] | None] = {}
    revenue: dict[tuple[int, date | None], dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    rows = deployment_sums(
        start=start, end=end, group=("day", "deployment__tenant_id", "deployment__model_name",
                                     "deployment__node__site_id"),
        sums={"p": Sum("prompt_tokens"), "g": Sum("generation_tokens")})
    for r in rows:
        pnl = line(r["deployment__node__site_id"], r["day"])
        pnl.cost.tokens += r["p"] + r["g"]
        tenant_id = r["deployment__tenant_id"]
        if tenant_id not in indexes:
            book = price_book_for_tenant(tenant=Tenant.objects.get(pk=tenant_id))
            indexes[tenant_id] = (book.currency, PriceIndex(book)) if book else None
        if indexes[tenant_id] is None:
            continue
        currency, index = indexes[tenant_id]
        price = index.at(r["deployment__model_name"], r["day"].date())
        if price is None:
            continue
        amount = (r["p"] * price.input_per_mtok + r["g"] * price.output_per_mtok) / MILLION
        revenue[(pnl.site.pk, pnl.month if by_month else None)][currency] += amount
    for key, amounts in revenue.items():
        lines[key].revenue = {c: a.quantize(CENT, rounding=ROUND_HALF_UP) for c, a in amounts.items()}
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
    """Months to pay back each site's installed GPU capex at the last 30 days' gross margin."""
    now = now or timezone.now()
    installed = dict(Gpu.objects.exclude(node__status=NodeStatus.DECOMMISSIONED).values_list("node__site_id")
                     .annotate(n=Count("id")))
    recent = {p.site.pk: p for p in site_pnl(start=now - timedelta(days=30), end=now, by_month=False)}
    out = []
    for site in Site.objects.all():
        margin = recent[site.pk].margin if site.pk in recent else None
        monthly = margin * Decimal("730.5") / Decimal(720) if margin is not None else None
        out.append(Payback(site=site, capex=site.gpu_capex * installed.get(site.pk, 0), monthly_margin=monthly))
    return out
