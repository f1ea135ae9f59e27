from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from portal.accounts.access import operator_required
from portal.audit.forms import AuditFilterForm
from portal.audit.selectors import audit_actions, audit_entries
from portal.params import query_params

PAGE_SIZE = 50


@operator_required
def audit_log(request: HttpRequest) -> HttpResponse:
    """Every operator and tenant-admin action: who, what, when, before and after. Filter by tenant, action, actor."""
    filters = query_params(request, AuditFilterForm)
    form = AuditFilterForm(request.GET)
    entries = audit_entries(tenant_id=filters["tenant"].pk if filters["tenant"] else None,
                            action=filters["action"] or None, actor=filters["actor"] or None)
    page = Paginator(entries, PAGE_SIZE).get_page(filters["page"] or 1)
    context = {"page": page, "form": form, "filters": filters, "actions": audit_actions()}
    template = "audit/log.html#table" if request.htmx else "audit/log.html"
    return render(request, template, context)
