from datetime import timedelta

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.cache import cache_control
from django.views.decorators.http import condition, require_POST

from portal.accounts.access import operator_admin_required, operator_required
from portal.audit.services import audit_record
from portal.bringup.selectors import bringups_under_way
from portal.capacity.selectors import holders_by_unit
from portal.economics.charts import node_charts
from portal.economics.selectors import (
    attributed_through,
    costs_by_currency,
    node_cost,
    site_costs,
    tokens_per_second_now,
    utilization_over,
)
from portal.fleet.forms import EnrollmentTokenForm, FleetFilterForm, NodeRangeForm
from portal.fleet.models import Node, NodeStatus, Site
from portal.fleet.selectors import (
    fleet_grid,
    fleet_headline,
    fleet_version,
    gpu_models,
    node_detail,
    node_health_events,
    node_last_batch,
    recent_enrollment_tokens,
)
from portal.fleet.services import enrollment_token_create
from portal.health.selectors import open_cordons
from portal.hours import day_floor
from portal.params import query_params
from portal.sla.goodput import fleet_goodput_now
from portal.telemetry.selectors import RANGES, node_series
from portal.telemetry.store import batches_requeue_set_aside
from portal.tenants.models import Tenant, TenantStatus


def _overview_etag(request: HttpRequest) -> str:
    """Changes whenever a batch arrives, an alert moves or the fleet changes; a poll that finds it unchanged gets
    a 304 without rendering anything."""
    return fleet_version() + ":" + request.get_full_path()


@operator_required
@cache_control(private=True, no_cache=True)
@condition(etag_func=_overview_etag)
def overview(request: HttpRequest) -> HttpResponse:
    params = query_params(request, FleetFilterForm)
    filters = {"site_id": params["site"], "status": params["status"] or None, "gpu_name": params["gpu"] or None,
               "tenant_id": params["tenant"]}
    now = timezone.now()
    today = day_floor(now)
    periods_today = site_costs(start=today, end=now)
    tokens_per_s = tokens_per_second_now(now=now)
    context = {
        "headline": fleet_headline(now=now),
        "util_24h": utilization_over(start=now - timedelta(hours=24), end=now),
        "tokens_per_s": tokens_per_s,
        "goodput": fleet_goodput_now(tokens_per_s=tokens_per_s, now=now),
        "cost_today": costs_by_currency(periods_today),
        "cost_month": costs_by_currency(site_costs(start=today.replace(day=1), end=now)),
        "energy_today_kwh": sum(p.cost.energy_kwh for p in periods_today),
        "grids": fleet_grid(**filters),
        "filters": filters,
        "sites": Site.objects.all(),
        "statuses": NodeStatus.choices,
        "gpu_models": gpu_models(),
        "tenants": Tenant.objects.filter(status=TenantStatus.ACTIVE),
        "bringups": bringups_under_way(now=now),
    }
    template = "fleet/overview.html#live" if request.htmx else "fleet/overview.html"
    return render(request, template, context)


@operator_required
def node_page(request: HttpRequest, node_id: int) -> HttpResponse:
    try:
        node = node_detail(node_id=node_id)
    except Node.DoesNotExist:
        raise Http404("No such node") from None
    range_key = query_params(request, NodeRangeForm)["range"] or "24h"
    now = timezone.now()
    context = {
        "node": node,
        "holders": holders_by_unit(gpu_ids=[g.pk for g in node.gpus.all()], at=now),
        "range": RANGES[range_key],
        "ranges": RANGES.values(),
        "charts": node_charts(node_series(node=node, range_key=range_key, now=now)),
    }
    if request.htmx:
        return render(request, "fleet/node.html#charts", context)
    context["events"] = node_health_events(node=node)
    context["cordons"] = list(open_cordons(node_ids=[node.pk]))
    context["last_batch"] = node_last_batch(node_id=node.pk)
    context["cost_through"] = attributed_through()
    context["cost_30d"] = node_cost(node=node, start=now - timedelta(days=30), end=now,
                                    through=context["cost_through"])
    return render(request, "fleet/node.html", context)


@operator_admin_required
@require_POST
def retry_set_aside(request: HttpRequest) -> HttpResponse:
    """Queue the batches the store worker set aside again (after the cause is fixed); their alerts resolve."""
    requeued = batches_requeue_set_aside()
    audit_record(actor=request.user, action="batches.requeue", target="set-aside batches", after={"batches": requeued})
    messages.success(request, f"{requeued} batch{'es' if requeued != 1 else ''} queued again for the store worker.")
    return redirect("fleet:overview")


@operator_admin_required
def enroll(request: HttpRequest) -> HttpResponse:
    """Create a one-time enrollment token; its value is shown on this response only."""
    form = EnrollmentTokenForm(request.POST or None)
    issued = None
    if request.method == "POST" and form.is_valid():
        token, value = enrollment_token_create(
            site=form.cleaned_data["site"], created_by=request.user,
            ttl=timedelta(hours=form.cleaned_data["hours"]), note=form.cleaned_data["note"],
        )
        issued = {"token": token, "value": value, "portal": request.build_absolute_uri("/").rstrip("/")}
        form = EnrollmentTokenForm()
    return render(request, "fleet/enroll.html", {"form": form, "issued": issued, "recent": recent_enrollment_tokens()})
