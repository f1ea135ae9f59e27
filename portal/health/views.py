from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from portal.accounts.access import operator_admin_required, operator_required
from portal.fleet.models import Gpu, MigInstance, Node
from portal.formerrors import form_errors_text
from portal.health import selectors, services
from portal.health.forms import CordonForm, OverrideForm, RuleForm
from portal.health.models import Cordon


@operator_required
def overview(request: HttpRequest) -> HttpResponse:
    rules = selectors.rules()
    return render(request, "health/overview.html", {
        "cordons": list(selectors.open_cordons()),
        "incidents": list(selectors.incidents()[:50]),
        "rules": [(rule, RuleForm.for_rule(rule)) for rule in rules],
        "override_form": OverrideForm(),
    })


@operator_admin_required
@require_POST
def rule_save(request: HttpRequest, xid: int) -> HttpResponse:
    form = RuleForm(request.POST, prefix=f"xid{xid}")
    if not form.is_valid():
        messages.error(request, f"XID {xid} not saved: {form_errors_text(form)}")
        response = overview(request)
        response.status_code = 400
        return response
    rule = services.rule_set(xid=xid, by=request.user, **form.cleaned_data)
    messages.success(request, f"XID {xid}: {rule.get_action_display().lower()}, quiet {rule.quiet_minutes} min.")
    return redirect("health:overview")


@operator_admin_required
@require_POST
def cordon_override(request: HttpRequest, cordon_id: int) -> HttpResponse:
    cordon = get_object_or_404(Cordon.objects.select_related("node", "incident"), pk=cordon_id)
    form = OverrideForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Not overridden: give the reason.")
        return redirect("health:overview")
    try:
        services.cordon_override(cordon=cordon, reason=form.cleaned_data["reason"], by=request.user)
    except services.HealthError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Cordon of {cordon.node} {cordon.scope} ended by override (audited).")
    return redirect("health:overview")


@operator_admin_required
@require_POST
def cordon_unit(request: HttpRequest, node_id: int) -> HttpResponse:
    """Cordon by hand the node (unit "node"), one of its GPUs ("gpu:<id>") or one MIG instance ("mig:<id>")."""
    node = get_object_or_404(Node, pk=node_id)
    form = CordonForm(request.POST)
    if not form.is_valid():
        messages.error(request, f"Not cordoned: {form_errors_text(form)}")
        return redirect("fleet:node", node_id=node.pk)
    kind, _, pk = form.cleaned_data["unit"].partition(":")
    gpu = mig = None
    if kind == "mig":
        mig = get_object_or_404(MigInstance.objects.select_related("gpu"), pk=pk, gpu__node=node)
        gpu = mig.gpu
    elif kind == "gpu":
        gpu = get_object_or_404(Gpu, pk=pk, node=node)
    services.cordon_open(node=node, gpu=gpu, mig_instance=mig, at=timezone.now(),
                         reason=form.cleaned_data["reason"], by=request.user)
    messages.success(request, f"Cordoned on {node}: out of placement until its acceptance test passes.")
    return redirect("fleet:node", node_id=node.pk)
