from django.contrib import messages
from django.forms.models import model_to_dict
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from portal.accounts.access import operator_admin_required, operator_required
from portal.fleet.models import Site
from portal.params import query_params
from portal.standards.forms import VERSION_FIELDS, BaselineForm, DriftFilterForm
from portal.standards.models import Baseline
from portal.standards.selectors import baseline_history, current_baseline, fleet_drift, fleet_versions
from portal.standards.services import baseline_set


def _baseline_page(
    request: HttpRequest, form: BaselineForm, baseline: Baseline | None, status: int = 200
) -> HttpResponse:
    context = {
        "form": form,
        "baseline": baseline,
        "history": baseline_history(),
        "versions": fleet_versions(),
        "version_fields": VERSION_FIELDS,
    }
    return render(request, "standards/baseline.html", context, status=status)


@operator_required
def baseline_page(request: HttpRequest) -> HttpResponse:
    """The baseline in force, its history and what the fleet runs; operator admins change it here."""
    baseline = current_baseline()
    initial = model_to_dict(baseline, fields=VERSION_FIELDS) if baseline else {}
    return _baseline_page(request, BaselineForm(initial=initial), baseline)


@operator_admin_required
@require_POST
def baseline_save(request: HttpRequest) -> HttpResponse:
    form = BaselineForm(request.POST)
    if not form.is_valid():
        return _baseline_page(request, form, current_baseline(), status=400)
    baseline_set(by=request.user, **form.cleaned_data)
    messages.success(request, "New baseline in force.")
    return redirect("standards:drift")


@operator_required
def drift_page(request: HttpRequest) -> HttpResponse:
    site = query_params(request, DriftFilterForm)["site"]
    context = {"drift": fleet_drift(site_id=site.pk if site else None), "site": site, "sites": Site.objects.all()}
    template = "standards/drift.html#report" if request.htmx else "standards/drift.html"
    return render(request, template, context)
