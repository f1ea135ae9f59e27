"""Books that balance: the invariants every cost, token and revenue figure must keep, checked on the real database
for a month, each break reported with its scope, size and likely cause. `manage.py reconcile`, the operator's
Books page and an hourly beat task (alerting on a break) all run `books_reconcile`.

The checks recompute from history by another path than the figures they check (no shared arithmetic beyond the
cost model's rates), so a bug in attribution, usage ownership or invoicing shows as a break:
  1. site cost: for every site-hour, the rows of the attribution tier (tenants + idle) add up to the site's cost
     computed from its GPUs on the books and what they measured;
  2. capacity: every GPU-hour on the books is counted once, and every hour of the month is attributed;
  3. existence: each tenant's attributed GPU-hours are exactly what its allocations held while the GPUs were on
     the books (none where it held nothing), and no deployment has cost outside its window;
  4. tokens: per tenant, tokens in economics = tokens in usage = tokens invoiced;
  5. revenue: the P&L's revenue = the sum of the invoices' lines, per currency.
"""

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from django.db.models import F, Q, Sum
from django.utils import timezone

from portal.billing.models import Invoice, InvoiceStatus
from portal.billing.selectors import as_utc, next_month
from portal.capacity.models import Allocation, Deployment
from portal.capacity.selectors import usage_for_tenant
from portal.economics.costmodel import ZERO, capex_per_gpu_hour, energy_cost, kwh
from portal.economics.models import CostHour, DeploymentHour
from portal.economics.pnl import billed_tenants, site_pnl
from portal.economics.revenue import MonthInvoices
from portal.fleet.models import Site
from portal.fleet.selectors import gpus_on_books
from portal.hours import HOUR, hour_floor
from portal.telemetry.models import GpuHour, RollupWatermark
from portal.tenants.models import Tenant

# Stored figures carry 8 decimal places; a recomputation may differ in the last of them.
TOLERANCE = Decimal("0.000001")


@dataclass(frozen=True)
class Break:
    scope: str
    size: str
    cause: str


@dataclass
class Check:
    key: str
    title: str
    checked: int = 0
    breaks: list[Break] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.breaks


@dataclass
class Books:
    month: date
    through: datetime  # the month is checked up to here (the last attributed hour)
    checks: list[Check]

    @property
    def breaks(self) -> int:
        return sum(len(c.breaks) for c in self.checks)


def books_reconcile(*, month: date, now: datetime | None = None) -> Books:
    now = now or timezone.now()
    start = as_utc(month)
    attributed = RollupWatermark.objects.filter(name="attribution").values_list("stored_until", flat=True).first()
    # Whole hours only: the hour still running is attributed again at each rollup.
    through = hour_floor(min(as_utc(next_month(month)), now, attributed or now))
    checks = [_site_costs(start, through), _existence(start, through), _tokens(month, start, through, now),
              _revenue(month, now)]
    return Books(month=month, through=through, checks=[checks[0][0], checks[0][1], *checks[1:]])


def _site_costs(start: datetime, end: datetime) -> tuple[Check, Check]:
    cost = Check("site_cost", "Every site-hour's tenants and idle add up to the site's cost")
    capacity = Check("capacity", "Every GPU-hour on the books is counted once, every hour attributed")
    sites = {s.pk: s for s in Site.objects.all()}
    expected: dict[tuple[int, datetime], dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    gpus = gpus_on_books(start=start, end=end)
    energy = dict(((gpu, ts), mj) for gpu, ts, mj in GpuHour.objects.filter(
        gpu_id__in=[g.gpu_id for g in gpus], ts__gte=start, ts__lt=end).values_list("gpu_id", "ts", "energy_mj"))
    for gpu in gpus:
        lo, hi = max(gpu.start, start), min(gpu.end or end, end)
        hour = hour_floor(lo)
        while hour < hi:
            present = Decimal((min(hi, hour + HOUR) - max(lo, hour)).total_seconds()) / 3600
            expected[(gpu.site_id, hour)]["gpu_hours"] += present
            expected[(gpu.site_id, hour)]["kwh"] += kwh(energy.get((gpu.gpu_id, hour)) or 0)
            hour += HOUR
    stored = {(r["site_id"], r["ts"]): r for r in CostHour.objects.filter(ts__gte=start, ts__lt=end)
              .values("site_id", "ts").annotate(gpu_hours_sum=Sum("gpu_hours"),
                                                total=Sum(F("capex") + F("opex") + F("energy")))
              .order_by()}
    for key in sorted(set(expected) | set(stored), key=lambda k: (k[1], k[0])):
        site, hour = sites[key[0]], key[1]
        scope = f"{site.name}, {hour:%Y-%m-%d %H:%M} UTC"
        want, got = expected.get(key), stored.get(key)
        capacity.checked += 1
        cost.checked += 1
        if got is None:
            capacity.breaks.append(Break(scope, f"{want['gpu_hours']:.4f} GPU-hours",
                                         "the hour was never attributed (the rollups were stopped): re-attribute "
                                         "the month from this page"))
            continue
        if want is None:
            capacity.breaks.append(Break(scope, f"{got['gpu_hours_sum']:.4f} GPU-hours",
                                         "cost for an hour in which the site had no GPU on the books (a backdated "
                                         "allocation or a retired node)"))
            continue
        if abs(got["gpu_hours_sum"] - want["gpu_hours"]) > TOLERANCE:
            capacity.breaks.append(Break(scope, f"{got['gpu_hours_sum'] - want['gpu_hours']:+.6f} GPU-hours",
                                         "GPU-hours counted twice or not at all (inventory changed after the hour "
                                         "was attributed: re-attribute it)"))
        fixed = want["gpu_hours"] * (capex_per_gpu_hour(site) + site.other_opex_gpu_hour)
        expected_total = fixed + energy_cost(site, want["kwh"])
        total = got["total"]
        if abs(total - expected_total) > TOLERANCE:
            cost.breaks.append(Break(scope, f"{site.currency} {total - expected_total:+.6f}",
                                     "the tenants' and idle rows do not add up to the site's cost: energy or the "
                                     "cost model changed after attribution, or rows were lost"))
    return cost, capacity


def _existence(start: datetime, end: datetime) -> Check:
    check = Check("existence", "Every tenant's cost is the capacity it held, while its GPUs existed; every "
                               "deployment's inside its window")
    on_books: dict[int, list] = defaultdict(list)
    for gpu in gpus_on_books(start=start, end=end):
        on_books[gpu.gpu_id].append(gpu)
    held: dict[tuple[int, int, datetime], Decimal] = defaultdict(Decimal)
    for a in (Allocation.objects.filter(starts_at__lt=end).filter(Q(ends_at__isnull=True) | Q(ends_at__gt=start))
              .select_related("mig_instance")):
        share = a.share
        for gpu in on_books.get(a.gpu_id, ()):
            lo, hi = max(a.starts_at, gpu.start, start), min(a.ends_at or end, gpu.end or end, end)
            hour = hour_floor(lo)
            while hour < hi:
                seconds = (min(hi, hour + HOUR) - max(lo, hour)).total_seconds()
                held[(gpu.site_id, a.tenant_id, hour)] += Decimal(seconds) / 3600 * share
                hour += HOUR
    stored = {(site, tenant, ts): gpu_hours for site, tenant, ts, gpu_hours in (
        CostHour.objects.filter(ts__gte=start, ts__lt=end, tenant__isnull=False)
        .values_list("site_id", "tenant_id", "ts").annotate(gpu_hours_sum=Sum("gpu_hours")).order_by())}
    # An hour never attributed is the capacity check's break, not one per tenant here.
    attributed = set(CostHour.objects.filter(ts__gte=start, ts__lt=end).values_list("site_id", "ts").distinct())
    sites = dict(Site.objects.values_list("pk", "name"))
    tenants = dict(Tenant.objects.values_list("pk", "name"))
    for key in sorted(set(held) | set(stored), key=lambda k: (k[2], k[0], tenants[k[1]])):
        if (key[0], key[2]) not in attributed:
            continue
        check.checked += 1
        want, got = held.get(key, ZERO), stored.get(key, ZERO)
        if abs(got - want) <= TOLERANCE:
            continue
        site, tenant, ts = key
        cause = ("cost for an hour the tenant held nothing (an allocation ended or was withdrawn after the hour "
                 "was attributed)" if not want else
                 "the tenant's holding changed after the hour was attributed (a backdated or shortened "
                 "allocation not re-attributed): re-attribute the month from this page")
        check.breaks.append(Break(f"{tenants[tenant]} at {sites[site]}, {ts:%Y-%m-%d %H:%M} UTC",
                                  f"{got - want:+.6f} GPU-hours", cause))
    windows = {d.pk: d for d in Deployment.objects.all()}
    for deployment_id, ts, total in (DeploymentHour.objects.filter(ts__gte=start, ts__lt=end, gpu_hours__gt=0)
                                     .values_list("deployment_id", "ts")
                                     .annotate(total=Sum(F("capex") + F("opex") + F("energy"))).order_by()):
        check.checked += 1
        d = windows[deployment_id]
        if ts + HOUR <= d.active_from or (d.ended_at is not None and ts >= d.ended_at):
            check.breaks.append(Break(f"deployment {d.name}, {ts:%Y-%m-%d %H:%M} UTC", f"{total:.6f}",
                                      "cost outside the deployment's live window (its dates changed after "
                                      "attribution)"))
    return check


def _tokens(month: date, start: datetime, end: datetime, now: datetime) -> Check:
    check = Check("tokens", "Per tenant: tokens in economics = tokens in usage = tokens invoiced")
    economics = dict(DeploymentHour.objects.filter(ts__gte=start, ts__lt=end).values_list("deployment__tenant_id")
                     .annotate(tokens=Sum(F("prompt_tokens") + F("generation_tokens"))).order_by())
    closed = as_utc(next_month(month)) <= now
    for tenant in billed_tenants():
        check.checked += 1
        usage = sum(line.tokens for line in usage_for_tenant(tenant=tenant, start=start, end=end, by_day=False,
                                                              now=now))
        in_economics = economics.get(tenant.pk, 0) or 0
        if in_economics != usage:
            check.breaks.append(Break(f"{tenant.name}, {month:%B %Y}", f"{in_economics - usage:+,} tokens",
                                      "economics and usage disagree on who owned an endpoint's minutes (a "
                                      "handover or a backdated deployment not re-attributed)"))
        issued = Invoice.objects.filter(tenant=tenant, period_start=month, status=InvoiceStatus.ISSUED).first()
        if closed and issued is not None and end >= as_utc(next_month(month)) and issued.tokens != usage:
            check.breaks.append(Break(f"{tenant.name}, invoice {issued.number}", f"{issued.tokens - usage:+,} tokens",
                                      "usage arrived after the invoice was issued (an agent's late spool); the "
                                      "difference is on no invoice"))
    return check


def _revenue(month: date, now: datetime) -> Check:
    check = Check("revenue", "The P&L's revenue is the sum of the invoices' lines, per currency")
    start, end = as_utc(month), min(as_utc(next_month(month)), now)
    invoiced: dict[str, Decimal] = defaultdict(Decimal)
    tenants = list(billed_tenants())
    invoices = MonthInvoices(tenants=tenants, months=[month], now=end)
    for tenant in tenants:
        found = invoices.lines(tenant=tenant, period_start=month)
        if found is not None:
            currency, lines = found
            invoiced[currency] += sum((amount for _kind, _model, _price, amount in lines), Decimal("0.00"))
    reported: dict[str, Decimal] = defaultdict(Decimal)
    for line in site_pnl(start=start, end=end, now=now):
        for currency, amount in line.revenue.items():
            reported[currency] += amount
    for currency in sorted(set(invoiced) | set(reported)):
        check.checked += 1
        difference = reported[currency] - invoiced[currency]
        if difference:
            check.breaks.append(Break(f"{month:%B %Y}, {currency}", f"{currency} {difference:+.2f}",
                                      "revenue of no site (usage with no deployment left to place it) or a "
                                      "rounding of its own in the P&L"))
    return check


BOOKS_ALERT = "books"


def books_alert(*, now: datetime | None = None) -> int:
    """Reconcile the current month (and the previous one during the first three days, while late usage and the
    closing invoices settle); keep one alert open while there is a break. Returns the number of breaks."""
    from portal.alerts.models import Severity
    from portal.alerts.services import alert_raise, alert_resolve_key

    now = now or timezone.now()
    months = [month_of(now)]
    if now.day <= 3:
        months.insert(0, month_of(as_utc(months[0]) - timedelta(days=1)))
    found = [(books, check) for books in (books_reconcile(month=m, now=now) for m in months)
             for check in books.checks if not check.ok]
    breaks = sum(len(check.breaks) for _books, check in found)
    if not breaks:
        alert_resolve_key(key=BOOKS_ALERT)
        return 0
    summary = "; ".join(f"{books.month:%B %Y}: {check.title} ({len(check.breaks)})" for books, check in found)
    alert_raise(key=BOOKS_ALERT, kind=BOOKS_ALERT, severity=Severity.CRITICAL, at=now,
                title=f"The books do not balance: {breaks} break(s)",
                detail=f"{summary}. See Economics > Books for each break's scope, size and likely cause.")
    return breaks


def month_of(ts: datetime) -> date:
    ts = ts.astimezone(UTC)
    return date(ts.year, ts.month, 1)
