from django.contrib import messages
from django.db import IntegrityError
from django.forms.models import model_to_dict
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from portal.accounts.access import operator_admin_required, operator_required
from portal.fleet.models import Site
from portal.params import query_params
from portal.standards.forms import DriftFilterForm, PolicyForm, StackForm
from portal.standards.models import COMPONENTS, VERSION_FIELDS
from portal.standards.selectors import (
    current_baseline,
    fleet_drift,
    fleet_versions,
    placement_policy,
    policy_history,
    site_compliance,
    stack_history,
)
from portal.standards.services import baseline_set, placement_policy_set


def _stack_page(request: HttpRequest, *, form: StackForm | None = None, policy_form: PolicyForm | None = None,
                status: int = 200) -> HttpResponse:
    stack, policy = current_baseline(), placement_policy()
    excluding = bool(policy and policy.exclude_off_stack)
    context = {
        "stack": stack,
        "form": form or StackForm(initial=model_to_dict(stack, fields=VERSION_FIELDS) if stack else {}),
        "policy": policy,
        "excluding": excluding,
        "policy_form": policy_form or PolicyForm(initial={"exclusion": "on" if excluding else "off"}),
        "policy_history": policy_history(),
        "history": stack_history(),
        "components": COMPONENTS,
        "versions": fleet_versions(),
        "sites": site_compliance(),
        "drift": fleet_drift(),
    }
    return render(request, "standards/stack.html", context, status=status)


@operator_required
def stack_page(request: HttpRequest) -> HttpResponse:
    """The certified stack in force, each site's compliance, the placement policy and what it excludes, the
    stack's history and what the fleet runs; operator admins change the stack and the policy here."""
    return _stack_page(request)


@operator_admin_required
@require_POST
def stack_save(request: HttpRequest) -> HttpResponse:
    form = StackForm(request.POST)
    if not form.is_valid():
        return _stack_page(request, form=form, status=400)
    try:
        stack = baseline_set(by=request.user, **form.cleaned_data)
    except IntegrityError:  # a stack of that name was put in force between the form's check and the insert
        form.add_error("name", "A certified stack with this name already exists.")
        return _stack_page(request, form=form, status=400)
    messages.success(request, f"Certified stack {stack.name} in force.")
    return redirect("standards:drift")


@operator_admin_required
@require_POST
def policy_save(request: HttpRequest) -> HttpResponse:
    form = PolicyForm(request.POST)
    if not form.is_valid():
        return _stack_page(request, policy_form=form, status=400)
    on = form.cleaned_data["exclusion"] == "on"
    placement_policy_set(by=request.user, exclude_off_stack=on, note=form.cleaned_data["note"])
    messages.success(request, "New placements now skip nodes off the certified stack." if on else
                     "New placements may use nodes off the certified stack.")
    return redirect("standards:stack")


@operator_required
def drift_page(request: HttpRequest) -> HttpResponse:
    site = query_params(request, DriftFilterForm)["site"]
    policy = placement_policy()
    context = {"drift": fleet_drift(site_id=site.pk if site else None), "site": site, "sites": Site.objects.all(),
               "site_compliance": site_compliance(), "excluding": bool(policy and policy.exclude_off_stack)}
    template = "standards/drift.html#report" if request.htmx else "standards/drift.html"
    return render(request, template, context)
