"""SLA pages: compliance per tenant (tenant-facing, through portal.tenants.access) and across tenants for
operators, and the policies operator admins edit."""

from datetime import timedelta

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from portal.accounts.access import operator_admin_required, operator_required
from portal.params import query_params
from portal.sla.charts import fleet_sli_chart, goodput_chart, sli_chart
from portal.sla.forms import RANGES, ObjectiveForm, PolicyForm, RangeForm, RemoveObjectiveForm
from portal.sla.goodput import tenant_goodput
from portal.sla.models import SlaPolicy, Sli
from portal.sla.selectors import Compliance, fleet_compliance, policies, tenant_compliance
from portal.sla.services import SlaError, sla_objective_remove, sla_objective_set, sla_policy_create
from portal.tenants.access import tenant_required
from portal.tenants.models import Membership, Tenant


def _days(request: HttpRequest) -> int:
    return query_params(request, RangeForm)["days"]


def _charts(compliance: Compliance) -> list[dict]:
    return [
        {"id": f"fig-sla-{s.objective.sli}", "status": s,
         "figure": sli_chart(s.objective.sli, compliance.series.get(s.objective.sli, []))}
        for s in compliance.statuses
    ]


def _compliance_page(request: HttpRequest, template: str, tenant: Tenant, extra: dict) -> HttpResponse:
    days = _days(request)
    now = timezone.now()
    compliance = tenant_compliance(tenant=tenant, since=now - timedelta(days=days))
    goodput = tenant_goodput(tenant=tenant, start=now - timedelta(days=days), end=now, now=now)
    return render(request, template, {
        "tenant": tenant, "compliance": compliance, "charts": _charts(compliance), "days": days, "ranges": RANGES,
        "goodput": goodput, "goodput_figure": goodput_chart(goodput.hours, goodput.targets) if goodput.hours else None,
        **extra,
    })


@tenant_required
def tenant_page(request: HttpRequest, membership: Membership) -> HttpResponse:
    return _compliance_page(request, "sla/tenant.html", membership.tenant, {"membership": membership})


@operator_required
def overview(request: HttpRequest) -> HttpResponse:
    days = _days(request)
    fleet = fleet_compliance(since=timezone.now() - timedelta(days=days))
    figures = []
    for sli in Sli:
        series = {c.tenant.name: c.series[sli] for c in fleet if c.series.get(sli)}
        if series:
            figures.append({"id": f"fig-fleet-{sli.value}", "title": sli.label, "figure": fleet_sli_chart(sli, series)})
    return render(request, "sla/overview.html", {"fleet": fleet, "figures": figures, "days": days, "ranges": RANGES,
                                                 "slis": list(Sli)})


@operator_required
def operator_tenant(request: HttpRequest, slug: str) -> HttpResponse:
    tenant = get_object_or_404(Tenant.objects.select_related("plan"), slug=slug)
    return _compliance_page(request, "sla/operator_tenant.html", tenant, {})


def _policies_page(request: HttpRequest, form: PolicyForm | None = None, status: int = 200) -> HttpResponse:
    return render(request, "sla/policies.html", {"policies": policies(), "form": form or PolicyForm()},
                  status=status)


@operator_required
def policy_list(request: HttpRequest) -> HttpResponse:
    return _policies_page(request)


@operator_admin_required
@require_POST
def policy_create(request: HttpRequest) -> HttpResponse:
    form = PolicyForm(request.POST)
    if form.is_valid():
        try:
            policy = sla_policy_create(name=form.cleaned_data["name"], plan=form.cleaned_data["plan"],
                                       tenant=form.cleaned_data["tenant"], by=request.user)
        except SlaError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, f"Policy {policy} created; add its objectives.")
            return redirect("sla:policy", policy_id=policy.pk)
    return _policies_page(request, form, status=400)


def _policy_page(request: HttpRequest, policy: SlaPolicy, form: ObjectiveForm | None = None,
                 status: int = 200) -> HttpResponse:
    return render(request, "sla/policy.html", {"policy": policy, "objectives": policy.objectives.all(),
                                               "form": form or ObjectiveForm()}, status=status)


@operator_required
def policy_detail(request: HttpRequest, policy_id: int) -> HttpResponse:
    return _policy_page(request, get_object_or_404(SlaPolicy, pk=policy_id))


@operator_admin_required
@require_POST
def objective_set(request: HttpRequest, policy_id: int) -> HttpResponse:
    policy = get_object_or_404(SlaPolicy, pk=policy_id)
    form = ObjectiveForm(request.POST)
    if not form.is_valid():
        return _policy_page(request, policy, form, status=400)
    data = form.cleaned_data
    objective = sla_objective_set(policy=policy, sli=data["sli"], target=data["target"], window=data["window"],
                                  credit_pct=data["credit_pct"], by=request.user)
    messages.success(request, f"Objective saved: {objective}.")
    return redirect("sla:policy", policy_id=policy.pk)


@operator_admin_required
@require_POST
def objective_remove(request: HttpRequest, policy_id: int) -> HttpResponse:
    policy = get_object_or_404(SlaPolicy, pk=policy_id)
    form = RemoveObjectiveForm(request.POST)
    if not form.is_valid():
        raise Http404("No such objective")
    sla_objective_remove(policy=policy, sli=form.cleaned_data["sli"], by=request.user)
    messages.success(request, "Objective removed.")
    return redirect("sla:policy", policy_id=policy.pk)
