from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from portal.accounts.access import operator_admin_required, operator_required
from portal.alerts.forms import AlertFilterForm, ChannelEnableForm, NotificationChannelForm
from portal.alerts.models import ALERT_KINDS, Alert, AlertState, NotificationChannel, Severity
from portal.alerts.selectors import alert_list, alert_state_counts, channel_list, recent_deliveries
from portal.alerts.services import (
    AlertActionError,
    alert_acknowledge,
    alert_resolve,
    notification_channel_create,
    notification_channel_delete,
    notification_channel_set_enabled,
)
from portal.params import cleaned_params, query_params
from portal.redirects import next_url

PAGE_SIZE = 50


@operator_required
def alerts_page(request: HttpRequest) -> HttpResponse:
    filters = query_params(request, AlertFilterForm)
    alerts = alert_list(
        state=filters["state"], severity=filters["severity"] or None, kind=filters["kind"] or None,
        alert_id=filters["alert"],
    )
    page = Paginator(alerts, PAGE_SIZE).get_page(filters["page"] or 1)
    context = {
        "page": page,
        "filters": filters,
        "counts": alert_state_counts(severity=filters["severity"] or None, kind=filters["kind"] or None),
        "states": [*AlertState.choices, ("all", "All")],
        "severities": Severity.choices,
        "kinds": ALERT_KINDS,
        "back": request.get_full_path(),
    }
    template = "alerts/list.html#table" if request.htmx else "alerts/list.html"
    return render(request, template, context)


def _act(request: HttpRequest, alert_id: int, action, done: str) -> HttpResponse:
    try:
        alert = action(alert_id=alert_id, by=request.user)
    except Alert.DoesNotExist:
        raise Http404("No such alert") from None
    except AlertActionError as exc:
        return HttpResponse(str(exc), status=409, content_type="text/plain")
    if request.htmx:
        response = render(request, "alerts/list.html#row", {"alert": alert, "back": request.POST.get("next", "")})
        response["HX-Trigger"] = "alerts-changed"  # the state tabs refetch their counts
        return response
    messages.success(request, f"{done}: {alert.title}")
    return redirect(next_url(request, "alerts:list"))


@operator_admin_required
@require_POST
def acknowledge(request: HttpRequest, alert_id: int) -> HttpResponse:
    return _act(request, alert_id, alert_acknowledge, "Acknowledged")


@operator_admin_required
@require_POST
def resolve(request: HttpRequest, alert_id: int) -> HttpResponse:
    return _act(request, alert_id, alert_resolve, "Resolved")


@operator_admin_required
def channels(request: HttpRequest) -> HttpResponse:
    """Notification channels: list and create. Webhook URLs often embed secrets, so viewers do not see them."""
    form = NotificationChannelForm(request.POST or None)
    status = 200
    if request.method == "POST":
        if form.is_valid():
            channel = notification_channel_create(**form.cleaned_data, created_by=request.user)
            messages.success(request, f"Channel “{channel.name}” created.")
            return redirect("alerts:channels")
        status = 400
    context = {"form": form, "channels": channel_list(), "deliveries": recent_deliveries()}
    return render(request, "alerts/channels.html", context, status=status)


@operator_admin_required
@require_POST
def channel_enable(request: HttpRequest, channel_id: int) -> HttpResponse:
    enabled = cleaned_params(request.POST, ChannelEnableForm)["enabled"]
    try:
        channel = notification_channel_set_enabled(channel_id=channel_id, enabled=enabled)
    except NotificationChannel.DoesNotExist:
        raise Http404("No such channel") from None
    messages.success(request, f"Channel “{channel.name}” {'enabled' if channel.enabled else 'disabled'}.")
    return redirect("alerts:channels")


@operator_admin_required
@require_POST
def channel_delete(request: HttpRequest, channel_id: int) -> HttpResponse:
    try:
        name = notification_channel_delete(channel_id=channel_id)
    except NotificationChannel.DoesNotExist:
        raise Http404("No such channel") from None
    messages.success(request, f"Channel “{name}” deleted.")
    return redirect("alerts:channels")
