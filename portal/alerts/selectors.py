from django.db.models import Count, Q, QuerySet

from portal.alerts.models import Alert, AlertDelivery, AlertState, NotificationChannel

STATE_FILTERS = {
    AlertState.OPEN: Q(resolved_at__isnull=True, acknowledged_at__isnull=True),
    AlertState.ACKNOWLEDGED: Q(resolved_at__isnull=True, acknowledged_at__isnull=False),
    AlertState.RESOLVED: Q(resolved_at__isnull=False),
}


def _filtered(*, severity: str | None, kind: str | None) -> QuerySet[Alert]:
    alerts = Alert.objects.all()
    if severity:
        alerts = alerts.filter(severity=severity)
    if kind:
        alerts = alerts.filter(kind=kind)
    return alerts


def alert_list(
    *, state: str | None = None, severity: str | None = None, kind: str | None = None, alert_id: int | None = None
) -> QuerySet[Alert]:
    """Alerts newest first with what a row shows; state None means every state."""
    alerts = _filtered(severity=severity, kind=kind)
    if state:
        alerts = alerts.filter(STATE_FILTERS[AlertState(state)])
    if alert_id:
        alerts = alerts.filter(pk=alert_id)
    return alerts.select_related("node", "gpu", "acknowledged_by", "resolved_by").order_by("-opened_at", "-pk")


def alert_state_counts(*, severity: str | None = None, kind: str | None = None) -> dict[str, int]:
    """How many alerts each state tab holds under the same severity and kind filters, in one query."""
    counts = _filtered(severity=severity, kind=kind).aggregate(
        **{state.value: Count("pk", filter=condition) for state, condition in STATE_FILTERS.items()}
    )
    counts["all"] = sum(counts.values())
    return counts


def channel_list() -> QuerySet[NotificationChannel]:
    return NotificationChannel.objects.select_related("created_by").order_by("name")


def recent_deliveries(*, limit: int = 20) -> QuerySet[AlertDelivery]:
    return AlertDelivery.objects.select_related("alert", "channel").order_by("-at", "-pk")[:limit]
