"""Operators onboard tenants: the sign-up queue, approve on a plan, reject, suspend, reactivate; and the plans."""

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from portal.accounts.access import operator_admin_required, operator_required
from portal.audit.selectors import audit_entries
from portal.capacity.isolation import isolation_for_tenant, noisy_neighbours, noisy_window
from portal.capacity.isolation_charts import noisy_neighbours_chart
from portal.capacity.models import Quota
from portal.params import query_params
from portal.tenants.forms import ApproveForm, PlanForm, ReasonForm, TenantFilterForm
from portal.tenants.models import Plan, Tenant
from portal.tenants.selectors import plans, tenant_admins, tenant_members, tenants_for_operators
from portal.tenants.services import (
    TenantError,
    plan_save,
    tenant_approve,
    tenant_reactivate,
    tenant_reject,
    tenant_suspend,
)

PAGE_SIZE = 50


@operator_required
def tenant_list(request: HttpRequest) -> HttpResponse:
    params = query_params(request, TenantFilterForm)
    status = params["status"]
    page = Paginator(tenants_for_operators(status=status or None), PAGE_SIZE).get_page(params["page"] or 1)
    return render(request, "tenants/operator/list.html",
                  {"page": page, "form": TenantFilterForm(request.GET), "status": status})


def _detail(request: HttpRequest, tenant: Tenant, *, approve: ApproveForm | None = None,
            reason: ReasonForm | None = None, status: int = 200) -> HttpResponse:
    return render(request, "tenants/operator/detail.html", {
        "tenant": tenant, "admins": tenant_admins(tenant=tenant), "members": tenant_members(tenant=tenant),
        "quota": Quota.objects.filter(tenant=tenant).first(), "approve": approve or ApproveForm(),
        "reason": reason or ReasonForm(), "history": audit_entries(tenant_id=tenant.pk)[:20],
    }, status=status)


@operator_required
def tenant_detail(request: HttpRequest, tenant_id: int) -> HttpResponse:
    return _detail(request, get_object_or_404(Tenant.objects.select_related("plan"), pk=tenant_id))


@operator_required
def tenant_isolation(request: HttpRequest, tenant_id: int) -> HttpResponse:
    tenant = get_object_or_404(Tenant, pk=tenant_id)
    now = timezone.now()
    start, end = noisy_window(now=now)
    noisy = noisy_neighbours(tenant=tenant, start=start, end=end, now=now, viewer_is_operator=True)
    return render(request, "capacity/isolation_operator.html", {
        "tenant": tenant, "report": isolation_for_tenant(tenant=tenant, now=now, viewer_is_operator=True),
        "noisy": noisy, "figure": noisy_neighbours_chart(noisy),
    })


def _decide(request: HttpRequest, tenant_id: int, action, done: str, *, with_plan: bool = False,
            with_reason: bool = False) -> HttpResponse:
    tenant = get_object_or_404(Tenant.objects.select_related("plan"), pk=tenant_id)
    kwargs = {"tenant": tenant, "by": request.user, "base_url": request.build_absolute_uri("/")}
    approve = ApproveForm(request.POST) if with_plan else None
    reason = ReasonForm(request.POST) if with_reason else None
    for form in (approve, reason):
        if form is not None and not form.is_valid():
            return _detail(request, tenant, approve=approve, reason=reason, status=400)
        if form is not None:
            kwargs.update(form.cleaned_data)
    try:
        tenant = action(**kwargs)
    except TenantError as exc:
        messages.error(request, str(exc))
        return _detail(request, tenant, status=409)
    messages.success(request, f"{tenant.name} {done}; its admins were told by e-mail.")
    return redirect("onboarding:detail", tenant_id=tenant.pk)


@operator_admin_required
@require_POST
def approve(request: HttpRequest, tenant_id: int) -> HttpResponse:
    return _decide(request, tenant_id, tenant_approve, "approved", with_plan=True)


@operator_admin_required
@require_POST
def reject(request: HttpRequest, tenant_id: int) -> HttpResponse:
    return _decide(request, tenant_id, tenant_reject, "rejected", with_reason=True)


@operator_admin_required
@require_POST
def suspend(request: HttpRequest, tenant_id: int) -> HttpResponse:
    return _decide(request, tenant_id, tenant_suspend, "suspended", with_reason=True)


@operator_admin_required
@require_POST
def reactivate(request: HttpRequest, tenant_id: int) -> HttpResponse:
    return _decide(request, tenant_id, tenant_reactivate, "reactivated")


@operator_required
def plan_list(request: HttpRequest) -> HttpResponse:
    return render(request, "tenants/operator/plans.html", {"plans": plans()})


@operator_admin_required
def plan_edit(request: HttpRequest, plan_id: int | None = None) -> HttpResponse:
    plan = get_object_or_404(Plan, pk=plan_id) if plan_id is not None else None
    form = PlanForm(request.POST or None, instance=plan)
    if request.method == "POST":
        if form.is_valid():
            saved = plan_save(plan=form.save(commit=False), by=request.user)
            messages.success(request, f"Plan “{saved.name}” saved.")
            return redirect("onboarding:plans")
        return render(request, "tenants/operator/plan_form.html", {"form": form, "plan": plan}, status=400)
    return render(request, "tenants/operator/plan_form.html", {"form": form, "plan": plan})
