"""The tenant portal. Every view but `home` is wrapped in tenant_required / tenant_admin_required
(portal/tenants/access.py), receives the caller's membership, and reads only through `membership.tenant`."""

from datetime import timedelta

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from portal.accounts.access import authenticated
from portal.capacity.isolation import isolation_for_tenant, noisy_neighbours, noisy_window
from portal.capacity.isolation_charts import noisy_neighbours_chart
from portal.economics.selectors import tenant_energy
from portal.health.selectors import notices_for_tenant
from portal.params import query_params
from portal.tenants.access import tenant_admin_required, tenant_required
from portal.tenants.charts import usage_by_day_chart
from portal.tenants.forms import ApiKeyForm, CapacityRequestForm, InviteForm, RoleForm, UsageRangeForm
from portal.tenants.models import Membership
from portal.tenants.selectors import (
    day_range,
    deployment_health,
    deployment_usage_by_day,
    fleet_gpu_types,
    fleet_mig_profiles,
    memberships_for_user,
    tenant_api_keys,
    tenant_deployment_list,
    tenant_members,
    tenant_open_invitations,
    tenant_overview,
    tenant_requests,
    tenant_usage_by_day,
    totals_by_model,
)
from portal.tenants.services import (
    TenantError,
    api_key_create,
    api_key_revoke,
    invitation_create,
    invitation_revoke,
    membership_remove,
    membership_set_role,
    tenant_capacity_request_submit,
)


@authenticated
def home(request: HttpRequest) -> HttpResponse:
    return render(request, "tenants/home.html", {"memberships": memberships_for_user(user=request.user)})


def _page(request: HttpRequest, membership: Membership, template: str, context: dict,
          status: int = 200) -> HttpResponse:
    return render(request, template, {"membership": membership, "tenant": membership.tenant, **context},
                  status=status)


@tenant_required
def overview(request: HttpRequest, membership: Membership) -> HttpResponse:
    tenant = membership.tenant
    deployments = list(tenant_deployment_list(tenant=tenant))
    health = deployment_health(deployments=deployments)
    return _page(request, membership, "tenants/overview.html", {
        "overview": tenant_overview(tenant=tenant),
        "deployments": [(d, health[d.pk]) for d in deployments],
        "notices": list(notices_for_tenant(tenant=tenant, limit=10)),
    })


@tenant_required
def usage(request: HttpRequest, membership: Membership) -> HttpResponse:
    days = query_params(request, UsageRangeForm)["days"]
    end = timezone.now().date()
    start = end - timedelta(days=days - 1)
    lines = tenant_usage_by_day(tenant=membership.tenant, start=start, end=end)
    lo, hi = day_range(start, end)
    return _page(request, membership, "tenants/usage.html", {
        "energy": tenant_energy(tenant=membership.tenant, start=lo, end=min(hi, timezone.now())),
        "days": days, "start": start, "end": end, "lines": lines, "totals": totals_by_model(lines),
        "chart": usage_by_day_chart(lines, start=start, end=end), "ranges": UsageRangeForm.base_fields["days"].choices,
    })


@tenant_required
def deployment(request: HttpRequest, membership: Membership, deployment_id: int) -> HttpResponse:
    item = get_object_or_404(tenant_deployment_list(tenant=membership.tenant), pk=deployment_id)
    end = timezone.now().date()
    start = end - timedelta(days=29)
    lines = deployment_usage_by_day(deployment=item, start=start, end=end)
    return _page(request, membership, "tenants/deployment.html", {
        "deployment": item, "health": deployment_health(deployments=[item])[item.pk], "lines": lines,
        "chart": usage_by_day_chart(lines, start=start, end=end), "start": start, "end": end,
    })


# Members ---------------------------------------------------------------------------------------------------------


def _members_page(request: HttpRequest, membership: Membership, *, invite: InviteForm | None = None,
                  status: int = 200) -> HttpResponse:
    tenant = membership.tenant
    return _page(request, membership, "tenants/members.html", {
        "members": tenant_members(tenant=tenant), "invitations": tenant_open_invitations(tenant=tenant),
        "invite": invite or InviteForm(), "roles": RoleForm.base_fields["role"].choices,
    }, status=status)


@tenant_required
def members(request: HttpRequest, membership: Membership) -> HttpResponse:
    return _members_page(request, membership)


@tenant_admin_required
@require_POST
def member_invite(request: HttpRequest, membership: Membership) -> HttpResponse:
    form = InviteForm(request.POST)
    if form.is_valid():
        try:
            invitation = invitation_create(tenant=membership.tenant, email=form.cleaned_data["email"],
                                           role=form.cleaned_data["role"], by=request.user,
                                           base_url=request.build_absolute_uri("/"))
        except TenantError as exc:
            form.add_error(exc.field, str(exc))
        else:
            messages.success(request, f"Invitation sent to {invitation.email}.")
            return redirect("tenants:members", tenant_slug=membership.tenant.slug)
    return _members_page(request, membership, invite=form, status=400)


@tenant_admin_required
@require_POST
def member_role(request: HttpRequest, membership: Membership, membership_id: int) -> HttpResponse:
    target = get_object_or_404(tenant_members(tenant=membership.tenant), pk=membership_id)
    form = RoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, f"role: {' '.join(form.errors['role'])}")
        return _members_page(request, membership, status=400)
    try:
        target = membership_set_role(membership=target, role=form.cleaned_data["role"], by=request.user)
    except TenantError as exc:
        messages.error(request, str(exc))
        return _members_page(request, membership, status=409)
    messages.success(request, f"{target.user.email} is now {target.get_role_display().lower()}.")
    return redirect("tenants:members", tenant_slug=membership.tenant.slug)


@tenant_admin_required
@require_POST
def member_remove(request: HttpRequest, membership: Membership, membership_id: int) -> HttpResponse:
    target = get_object_or_404(tenant_members(tenant=membership.tenant), pk=membership_id)
    try:
        membership_remove(membership=target, by=request.user)
    except TenantError as exc:
        messages.error(request, str(exc))
        return _members_page(request, membership, status=409)
    messages.success(request, f"{target.user.email} was removed.")
    if target.pk == membership.pk:
        return redirect("tenants:home")
    return redirect("tenants:members", tenant_slug=membership.tenant.slug)


@tenant_admin_required
@require_POST
def invitation_withdraw(request: HttpRequest, membership: Membership, invitation_id: int) -> HttpResponse:
    invitation = get_object_or_404(tenant_open_invitations(tenant=membership.tenant), pk=invitation_id)
    try:
        invitation_revoke(invitation=invitation, by=request.user)
    except TenantError as exc:
        messages.error(request, str(exc))
        return _members_page(request, membership, status=409)
    messages.success(request, f"The invitation to {invitation.email} was withdrawn.")
    return redirect("tenants:members", tenant_slug=membership.tenant.slug)


# API keys ---------------------------------------------------------------------------------------------------------


def _keys_page(request: HttpRequest, membership: Membership, *, form: ApiKeyForm | None = None, issued=None,
               status: int = 200) -> HttpResponse:
    return _page(request, membership, "tenants/api_keys.html", {
        "keys": tenant_api_keys(tenant=membership.tenant), "form": form or ApiKeyForm(), "issued": issued,
        "api_base": request.build_absolute_uri("/api/v1/tenant/"),
    }, status=status)


@tenant_admin_required
def api_keys(request: HttpRequest, membership: Membership) -> HttpResponse:
    """List and create keys; a new key's value is shown on this response only."""
    if request.method != "POST":
        return _keys_page(request, membership)
    form = ApiKeyForm(request.POST)
    if form.is_valid():
        try:
            issued = api_key_create(tenant=membership.tenant, name=form.cleaned_data["name"], by=request.user)
        except TenantError as exc:
            form.add_error(None, str(exc))
        else:
            return _keys_page(request, membership, issued=issued, status=201)
    return _keys_page(request, membership, form=form, status=400)


@tenant_admin_required
@require_POST
def api_key_withdraw(request: HttpRequest, membership: Membership, key_id: int) -> HttpResponse:
    key = get_object_or_404(tenant_api_keys(tenant=membership.tenant), pk=key_id)
    try:
        api_key_revoke(key=key, by=request.user)
    except TenantError as exc:
        messages.error(request, str(exc))
        return _keys_page(request, membership, status=409)
    messages.success(request, f"Key “{key.name}” revoked: it no longer authenticates.")
    return redirect("tenants:api_keys", tenant_slug=membership.tenant.slug)


# Capacity requests ------------------------------------------------------------------------------------------------


def _capacity_form(data=None) -> CapacityRequestForm:
    return CapacityRequestForm(data, gpu_types=fleet_gpu_types(), mig_profiles=fleet_mig_profiles(),
                               initial={"starts_on": timezone.now().date()})


def _capacity_page(request: HttpRequest, membership: Membership, *, form: CapacityRequestForm | None = None,
                   status: int = 200) -> HttpResponse:
    return _page(request, membership, "tenants/capacity.html", {
        "requests": tenant_requests(tenant=membership.tenant),
        "form": (form or _capacity_form()) if membership.is_admin else None,
    }, status=status)


@tenant_required
def capacity(request: HttpRequest, membership: Membership) -> HttpResponse:
    return _capacity_page(request, membership)


@tenant_admin_required
@require_POST
def capacity_request_new(request: HttpRequest, membership: Membership) -> HttpResponse:
    form = _capacity_form(request.POST)
    if form.is_valid():
        data = form.cleaned_data
        try:
            created = tenant_capacity_request_submit(
                tenant=membership.tenant, by=request.user, model_name=data["model_name"].strip(),
                gpu_type=data["gpu_type"], count=data["count"], mig_profile=data["mig_profile"],
                starts_at=form.starts_at(), note=data["note"].strip(),
            )
        except TenantError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Capacity requested: {created.count} x "
                                      f"{created.mig_profile or created.gpu_type} for {created.model_name}.")
            return redirect("tenants:capacity", tenant_slug=membership.tenant.slug)
    return _capacity_page(request, membership, form=form, status=400)


@tenant_required
def capacity_request(request: HttpRequest, membership: Membership, request_id: int) -> HttpResponse:
    item = get_object_or_404(tenant_requests(tenant=membership.tenant).prefetch_related(
        "allocations__gpu__node", "allocations__mig_instance"), pk=request_id)
    return _page(request, membership, "tenants/capacity_request.html", {"item": item})


@tenant_required
def isolation(request: HttpRequest, membership: Membership) -> HttpResponse:
    now = timezone.now()
    start, end = noisy_window(now=now)
    noisy = noisy_neighbours(tenant=membership.tenant, start=start, end=end, now=now)
    return _page(request, membership, "capacity/isolation_tenant.html", {
        "report": isolation_for_tenant(tenant=membership.tenant, now=now, viewer_is_operator=False),
        "noisy": noisy, "figure": noisy_neighbours_chart(noisy),
    })
