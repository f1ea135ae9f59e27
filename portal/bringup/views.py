from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from portal.accounts.access import operator_admin_required, operator_required
from portal.bringup import services
from portal.bringup.charts import timeline_figure
from portal.bringup.forms import PlanForm, PlanLineForm, PlannedNodesForm
from portal.bringup.models import BringUpPlan
from portal.bringup.selectors import site_bringup
from portal.fleet.models import Site
from portal.formerrors import form_errors_text
from portal.health.selectors import open_cordons
from portal.provisioning.selectors import latest_jobs


@operator_required
def site_page(request: HttpRequest, slug: str) -> HttpResponse:
    site = get_object_or_404(Site, slug=slug)
    bringup = site_bringup(site=site)
    plan = bringup.plan if bringup else None
    nodes = bringup.nodes if bringup else list(site.nodes.order_by("hostname").prefetch_related(
        "lifecycle_changes"))
    jobs = latest_jobs(node_ids=[n.pk for n in nodes])
    for node in nodes:
        node.latest_job = jobs.get(node.pk)
    return render(request, "bringup/site.html", {
        "site": site, "bringup": bringup, "nodes": nodes,
        "timeline": timeline_figure(bringup) if bringup and bringup.nodes else None,
        "cordons": list(open_cordons(node_ids=[n.pk for n in nodes])),
        "plan_form": PlanForm(initial={"started_on": plan.started_on, "target_days": plan.target_days,
                                       "soak_minutes": plan.soak_minutes, "note": plan.note} if plan else None),
        "line_form": PlanLineForm(), "nodes_form": PlannedNodesForm(lines=plan.lines.all() if plan else ()),
    })


@operator_admin_required
@require_POST
def plan_save(request: HttpRequest, slug: str) -> HttpResponse:
    site = get_object_or_404(Site, slug=slug)
    form = PlanForm(request.POST)
    if not form.is_valid():
        return _refused(request, site, form)
    services.plan_set(site=site, by=request.user, **form.cleaned_data)
    messages.success(request, f"Bring-up plan of {site} saved.")
    return redirect("bringup:site", slug=site.slug)


@operator_admin_required
@require_POST
def line_save(request: HttpRequest, slug: str) -> HttpResponse:
    plan = get_object_or_404(BringUpPlan.objects.select_related("site"), site__slug=slug)
    form = PlanLineForm(request.POST)
    if not form.is_valid():
        return _refused(request, plan.site, form)
    line = services.plan_line_set(plan=plan, by=request.user, **form.cleaned_data)
    messages.success(request, f"Planned {line}.")
    return redirect("bringup:site", slug=slug)


@operator_admin_required
@require_POST
def nodes_name(request: HttpRequest, slug: str) -> HttpResponse:
    plan = get_object_or_404(BringUpPlan.objects.select_related("site"), site__slug=slug)
    lines = list(plan.lines.all())
    form = PlannedNodesForm(request.POST, lines=lines)
    if form.is_valid():
        line = next(line for line in lines if line.pk == form.cleaned_data["line"])
        try:
            nodes = services.planned_nodes_name(plan=plan, line=line, hostnames=form.cleaned_data["hostnames"],
                                                by=request.user)
        except services.BringUpError as exc:
            form.add_error(exc.field, str(exc))
        else:
            messages.success(request, f"{len(nodes)} planned node(s) named: provision them by these hostnames.")
            return redirect("bringup:site", slug=slug)
    return _refused(request, plan.site, form)


def _refused(request: HttpRequest, site: Site, form) -> HttpResponse:
    """A form with errors: the page again, with a 400 and the fields named."""
    messages.error(request, f"Not saved: {form_errors_text(form)}")
    response = site_page(request, site.slug)
    response.status_code = 400
    return response
