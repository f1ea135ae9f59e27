import re

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from portal.accounts.access import operator_admin_required, operator_required
from portal.audit.services import audit_record
from portal.capacity.forms import AllocationForm, CapacityFilterForm, DeclineForm, DeploymentForm, MoveForm
from portal.capacity.models import Allocation, CapacityRequest, Deployment, RequestStatus
from portal.capacity.selectors import (
    allocation_summary,
    allocations_at,
    capacity_overview,
    capacity_units,
    deployments_unbillable,
    placement_propose,
    replacements_propose,
    units_of,
)
from portal.capacity.services import (
    CapacityError,
    allocation_create,
    allocation_end,
    allocation_move,
    capacity_request_decline,
    capacity_request_fulfil,
    deployment_create,
    deployment_end,
)
from portal.fleet.models import Gpu, MigInstance, Site
from portal.fleet.selectors import gpu_models
from portal.params import query_params
from portal.redirects import next_url
from portal.tenants.models import Tenant, TenantStatus

NODES_PER_PAGE = 10


def _overview(request: HttpRequest, *, form: AllocationForm | None = None, status: int = 200) -> HttpResponse:
    """The capacity page: totals, open requests, and the units of a page of nodes under the filters, each free
    unit with its allocation form and each held one with its holder."""
    now = timezone.now()
    filters = query_params(request, CapacityFilterForm)
    narrow = {"gpu_name": filters["gpu"], "tenant_id": filters["tenant"], "state": filters["state"]}
    nodes = capacity_units(now=now, site_id=filters["site"], hostname=filters["node"], **narrow)
    page = Paginator(nodes, NODES_PER_PAGE).get_page(filters["page"] or 1)
    query = request.GET.copy()
    query.pop("page", None)
    return render(request, "capacity/overview.html", {
        "rows": capacity_overview(now=now),
        "requests": CapacityRequest.objects.filter(status=RequestStatus.OPEN).select_related("tenant"),
        "page": page, "nodes": units_of(nodes=list(page), now=now, **narrow),
        "filters": CapacityFilterForm(request.GET), "query": query.urlencode(),
        "tenants": Tenant.objects.filter(status=TenantStatus.ACTIVE).order_by("name"),
        "sites": Site.objects.order_by("name"), "gpu_models": gpu_models(),
        "upcoming": Allocation.objects.filter(starts_at__gt=now).select_related("tenant", "gpu__node",
                                                                                  "mig_instance"),
        "form": form or AllocationForm(), "now": now, "replacements": replacements_propose(now=now),
    }, status=status)


@operator_required
def overview(request: HttpRequest) -> HttpResponse:
    return _overview(request)


@operator_admin_required
@require_POST
def allocation_new(request: HttpRequest) -> HttpResponse:
    form = AllocationForm(request.POST)
    if form.is_valid():
        data = form.cleaned_data
        try:
            allocation = allocation_create(tenant=data["tenant"], gpu=data["gpu"], mig_instance=data["mig_instance"],
                                           starts_at=data["starts_at"], ends_at=data["ends_at"], by=request.user)
        except CapacityError as exc:
            form.add_error(None, str(exc))
        else:
            audit_record(actor=request.user, action="allocation.create", target=allocation, tenant=data["tenant"])
            messages.success(request, f"Allocated: {allocation_summary(allocation)}.")
            return redirect(next_url(request, "capacity:overview"))
    return _overview(request, form=form, status=400)


@operator_admin_required
@require_POST
def allocation_replace(request: HttpRequest, allocation_id: int) -> HttpResponse:
    """Move a tenant off a cordoned unit onto the replacement the page proposed."""
    allocation = get_object_or_404(Allocation.objects.select_related("tenant", "gpu__node", "mig_instance"),
                                   pk=allocation_id)
    form = MoveForm(request.POST)
    if form.is_valid():
        try:
            moved = allocation_move(allocation=allocation, gpu=form.cleaned_data["gpu"],
                                    mig_instance=form.cleaned_data["mig_instance"], by=request.user)
        except CapacityError as exc:
            form.add_error(None, str(exc))
        else:
            audit_record(actor=request.user, action="allocation.move", target=moved, tenant=allocation.tenant,
                         before={"allocation": allocation.pk}, after={"allocation": moved.pk})
            messages.success(request, f"Moved: {allocation_summary(moved)}.")
            return redirect("capacity:overview")
    return _overview(request, form=form, status=400)


@operator_admin_required
@require_POST
def allocation_release(request: HttpRequest, allocation_id: int) -> HttpResponse:
    allocation = get_object_or_404(Allocation.objects.select_related("tenant", "gpu__node", "mig_instance"),
                                   pk=allocation_id)
    label = allocation_summary(allocation)
    try:
        allocation_end(allocation=allocation)
    except CapacityError as exc:
        messages.error(request, str(exc))
    else:
        audit_record(actor=request.user, action="allocation.end", target=label, tenant=allocation.tenant)
        messages.success(request, f"Released from now: {label.replace(' holds ', ' held ', 1)}.")
    return redirect(next_url(request, "capacity:overview"))


@operator_required
def request_detail(request: HttpRequest, request_id: int) -> HttpResponse:
    capacity_request = get_object_or_404(CapacityRequest.objects.select_related("tenant"), pk=request_id)
    proposal = placement_propose(gpu_type=capacity_request.gpu_type, count=capacity_request.count,
                                 mig_profile=capacity_request.mig_profile, starts_at=capacity_request.starts_at)
    return render(request, "capacity/request.html", {"req": capacity_request, "proposal": proposal,
                                                     "decline_form": DeclineForm()})


@operator_admin_required
@require_POST
def request_fulfil(request: HttpRequest, request_id: int) -> HttpResponse:
    capacity_request = get_object_or_404(CapacityRequest.objects.select_related("tenant"), pk=request_id)
    units = []
    for value in request.POST.getlist("unit"):
        gpu_id, _, mig_id = value.partition(":")
        if not re.fullmatch(r"[0-9]+(:[0-9]+)?", value):  # ASCII digits: int() refuses "²"
            messages.error(request, f"{value!r} does not name a unit; choose units from the proposal.")
            return redirect("capacity:request", request_id=request_id)
        gpu = get_object_or_404(Gpu, pk=int(gpu_id))
        units.append((gpu, get_object_or_404(MigInstance, pk=int(mig_id), gpu=gpu) if mig_id else None))
    try:
        allocations = capacity_request_fulfil(request=capacity_request, units=units, by=request.user)
    except CapacityError as exc:
        messages.error(request, str(exc))
        return redirect("capacity:request", request_id=request_id)
    audit_record(actor=request.user, action="capacity_request.fulfil", target=capacity_request,
                 tenant=capacity_request.tenant, after={"allocations": [a.pk for a in allocations]})
    messages.success(request, f"Placed {capacity_request.tenant.name}'s request: "
                     + "; ".join(allocation_summary(a) for a in allocations) + ".")
    return redirect("capacity:overview")


@operator_admin_required
@require_POST
def request_decline(request: HttpRequest, request_id: int) -> HttpResponse:
    capacity_request = get_object_or_404(CapacityRequest.objects.select_related("tenant"), pk=request_id)
    form = DeclineForm(request.POST)
    if not form.is_valid():
        messages.error(request, "A reason is required to decline.")
        return redirect("capacity:request", request_id=request_id)
    try:
        capacity_request_decline(request=capacity_request, by=request.user, reason=form.cleaned_data["reason"])
    except CapacityError as exc:
        messages.error(request, str(exc))
        return redirect("capacity:request", request_id=request_id)
    audit_record(actor=request.user, action="capacity_request.decline", target=capacity_request,
                 tenant=capacity_request.tenant, after={"reason": form.cleaned_data["reason"]})
    messages.success(request, f"Declined {capacity_request.tenant.name}'s request for {capacity_request.count} "
                              f"{capacity_request.gpu_type} unit(s); they see the reason on their request.")
    return redirect("capacity:overview")


@operator_required
def deployments(request: HttpRequest) -> HttpResponse:
    form = DeploymentForm(request.POST or None)
    if request.method == "POST":
        if not request.user.is_operator_admin:
            raise PermissionDenied("Operator admins only")
        if form.is_valid():
            data = form.cleaned_data
            held = list(allocations_at(at=timezone.now()).filter(tenant=data["tenant"], gpu__node=data["node"]))
            try:
                deployment = deployment_create(
                    tenant=data["tenant"], name=data["name"], model_name=data["model_name"], engine=data["engine"],
                    node=data["node"], metrics_url=data["metrics_url"], allocations=held,
                    settings=form.engine_settings(),
                )
            except CapacityError as exc:
                form.add_error(None, str(exc))
            else:
                audit_record(actor=request.user, action="deployment.create", target=deployment,
                             tenant=data["tenant"])
                messages.success(request, f"Deployment {deployment} created; the node's agent scrapes it next.")
                return redirect("capacity:deployments")
    listing = list(Deployment.objects.select_related("tenant", "node").prefetch_related("allocations"))
    unbillable = deployments_unbillable(deployments=[d for d in listing if d.ended_at is None])
    rows = [(d, unbillable.get(d.pk)) for d in listing]
    return render(request, "capacity/deployments.html", {"form": form, "rows": rows},
                  status=400 if form.errors else 200)


@operator_admin_required
@require_POST
def deployment_stop(request: HttpRequest, deployment_id: int) -> HttpResponse:
    deployment = get_object_or_404(Deployment.objects.select_related("tenant", "node"), pk=deployment_id,
                                   ended_at__isnull=True)
    deployment_end(deployment=deployment)
    audit_record(actor=request.user, action="deployment.end", target=deployment, tenant=deployment.tenant)
    messages.success(request, f"Deployment {deployment} ended.")
    return redirect("capacity:deployments")
