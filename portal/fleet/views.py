from datetime import timedelta

from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render

from portal.accounts.access import operator_admin_required, operator_required
from portal.fleet.forms import EnrollmentTokenForm
from portal.fleet.models import Node, NodeStatus, Site
from portal.fleet.selectors import (
    fleet_grid,
    fleet_headline,
    gpu_models,
    node_detail,
    node_health_events,
    recent_enrollment_tokens,
)
from portal.fleet.services import enrollment_token_create


@operator_required
def overview(request: HttpRequest) -> HttpResponse:
    filters = {
        "site_id": int(request.GET["site"]) if request.GET.get("site", "").isdigit() else None,
        "status": request.GET.get("status") if request.GET.get("status") in NodeStatus.values else None,
        "gpu_name": request.GET.get("gpu") or None,
    }
    context = {
        "headline": fleet_headline(),
        "grids": fleet_grid(**filters),
        "filters": filters,
        "sites": Site.objects.all(),
        "statuses": NodeStatus.choices,
        "gpu_models": gpu_models(),
    }
    template = "fleet/overview.html#live" if request.htmx else "fleet/overview.html"
    return render(request, template, context)


@operator_required
def node_page(request: HttpRequest, node_id: int) -> HttpResponse:
    try:
        node = node_detail(node_id=node_id)
    except Node.DoesNotExist:
        raise Http404("No such node") from None
    return render(request, "fleet/node.html", {"node": node, "events": node_health_events(node=node)})


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
