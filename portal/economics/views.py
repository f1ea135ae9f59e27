from datetime import timedelta
from decimal import Decimal

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from portal.accounts.access import operator_admin_required, operator_required
from portal.audit.services import audit_record
from portal.billing.selectors import as_utc, month_start, next_month
from portal.economics import charts
from portal.economics.advisor import MIN_HOURS, tokens_per_dollar_advice
from portal.economics.books import books_reconcile, month_of
from portal.economics.forms import BooksForm, EconomicsPeriodForm, TokenTypesForm, WhatIfForm
from portal.economics.pnl import payback, site_pnl
from portal.economics.reattribution import reattribution_request
from portal.economics.selectors import (
    attributed_through,
    costs_by_currency,
    deployment_costs,
    deployment_ranking,
    model_economics,
    site_costs,
    tenant_economics,
    utilization_vs_cost,
)
from portal.economics.split import SplitRule
from portal.economics.token_types import token_type_costs
from portal.economics.whatif import scenario, site_model
from portal.fleet.models import Site
from portal.params import cleaned_params, query_params

# A common price-book ratio: output tokens list at about four times input tokens.
DEFAULT_OUTPUT_WEIGHT = Decimal(4)
RANKED = 25  # deployments shown by default; ?all=1 shows every one
PERIODS = {"7d": ("7 days", timedelta(days=7)), "30d": ("30 days", timedelta(days=30)),
           "90d": ("90 days", timedelta(days=90))}


@operator_required
def fleet_economics(request: HttpRequest) -> HttpResponse:
    params = query_params(request, EconomicsPeriodForm)
    period = params["period"] or "30d"
    end = timezone.now()
    start = end - PERIODS[period][1]
    periods = site_costs(start=start, end=end)
    costs = deployment_costs(start=start, end=end)
    context = {
        "tenant_rows": tenant_economics(start=start, end=end, costs=costs),
        "deployments": deployment_ranking(costs=costs, limit=None if params["all"] else RANKED),
        "deployment_count": len(costs),
        "models": model_economics(costs=costs),
        "period": period,
        "periods": PERIODS,
        "sites": periods,
        "totals": costs_by_currency(periods),
        "through": attributed_through(),
        "figures": {
            "cost_per_mtok": charts.cost_per_mtok_chart(periods),
            "breakdown": charts.cost_breakdown_chart(periods),
            "curve": charts.utilization_curve_chart(utilization_vs_cost(periods)),
        },
    }
    return render(request, "economics/fleet.html", context)


@operator_required
def token_types(request: HttpRequest) -> HttpResponse:
    """Cost per million input and per million output tokens, split by the rule the operator picks, beside the
    prices each tenant's price book charges."""
    params = query_params(request, TokenTypesForm)
    period = params["period"] or "30d"
    rule = params["rule"] or SplitRule.TIME
    weight = params["weight"] or DEFAULT_OUTPUT_WEIGHT
    end = timezone.now()
    costs = deployment_costs(start=end - PERIODS[period][1], end=end)
    return render(request, "economics/token_types.html", {
        "types": token_type_costs(costs=costs, rule=rule, output_weight=weight, end=end), "period": period,
        "periods": PERIODS, "rule": rule, "rules": SplitRule.choices, "weight": weight,
        "through": attributed_through()})


@operator_required
def advisor(request: HttpRequest) -> HttpResponse:
    """Tokens per unit of cost and goodput per engine configuration of each model, and what one setting changes."""
    period = query_params(request, EconomicsPeriodForm)["period"] or "7d"
    end = timezone.now()
    start = end - PERIODS[period][1]
    advice = tokens_per_dollar_advice(costs=deployment_costs(start=start, end=end), start=start, end=end, now=end)
    return render(request, "economics/advisor.html", {"advice": advice, "period": period, "periods": PERIODS,
                                                      "min_hours": MIN_HOURS, "through": attributed_through()})


@operator_required
def what_if(request: HttpRequest) -> HttpResponse:
    """Move utilization, allocation and price; see the cost per million tokens and margin that would follow."""
    sites = list(Site.objects.all())
    form = WhatIfForm(request.GET or None, sites=sites)
    valid = form.is_valid()
    site = form.cleaned_data["site"] if valid else (sites[0] if sites else None)
    end = timezone.now()
    model = site_model(site=site, start=end - timedelta(days=30), end=end) if site else None
    context = {"form": form, "model": model, "site": site, "sites": sites}
    if model is not None:
        values = form.cleaned_data if valid else {
            "site": site, "utilization": round(model.measured_utilization * 100), "allocation": 90,
            "price": Decimal("0.40")}
        result = scenario(model=model, utilization=values["utilization"] / 100,
                          allocation=values["allocation"] / 100, price_per_million=values["price"])
        context.update(values=values, result=result, figure=charts.what_if_chart(model, result))
    if request.htmx:
        return render(request, "economics/what_if.html#result", context, status=200 if valid else 400)
    return render(request, "economics/what_if.html", context, status=400 if request.GET and not valid else 200)


@operator_required
def pnl(request: HttpRequest) -> HttpResponse:
    """Factory P&L per site and month, with the payback of GPU capex at the current run rate."""
    now = timezone.now()
    first = (now.replace(day=1, hour=0, minute=0, second=0, microsecond=0) - timedelta(days=150)).replace(day=1)
    return render(request, "economics/pnl.html", {"lines": site_pnl(start=first, end=now),
                                                  "payback": payback(now=now)})


@operator_required
def books(request: HttpRequest) -> HttpResponse:
    """The month's books, reconciled now: every invariant with what it checked and each break (an auditor's
    first page)."""
    month = query_params(request, BooksForm)["month"] or month_of(timezone.now())
    return render(request, "economics/books.html", {"books": books_reconcile(month=month_start(month)),
                                                    "form": BooksForm(request.GET)})


@operator_admin_required
@require_POST
def books_reattribute(request: HttpRequest) -> HttpResponse:
    """Re-attribute a month from history (in the background): attribution is a pure function of it, so this mends
    rows left stale by a change recorded after its hours were attributed."""
    month = month_start(cleaned_params(request.POST, BooksForm)["month"] or month_of(timezone.now()))
    reattribution_request(start=as_utc(month), end=as_utc(next_month(month)))
    audit_record(actor=request.user, action="books.reattribute", target=f"{month:%B %Y}")
    messages.success(request, f"Re-attributing {month:%B %Y} in the background; check the books again shortly.")
    return redirect(f"{reverse('economics:books')}?month={month:%Y-%m}")
