import json
import urllib.request
from datetime import datetime, timedelta
from functools import partial
from urllib.error import HTTPError

from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.urls import reverse
from django.utils import timezone

from portal.accounts.models import User
from portal.alerts.models import SEVERITY_RANK, Alert, AlertDelivery, NotificationChannel, Severity

WEBHOOK_TIMEOUT_S = 5
# A delivery left "sending" this long belongs to a worker that died mid-send; another attempt may take it over.
SENDING_STALE_AFTER = timedelta(minutes=2)


class AlertActionError(Exception):
    """The action does not apply to the alert in its current state (the message is safe to show)."""


def alert_raise(
    *, key: str, kind: str, severity: str, title: str, at: datetime, detail: str = "",
    node_id: int | None = None, gpu_id: int | None = None,
) -> Alert:
    """Open an alert, or count one more occurrence on the open alert with the same key. Only a newly opened
    alert notifies the channels."""
    updated = Alert.objects.filter(key=key, resolved_at__isnull=True).update(
        occurrences=F("occurrences") + 1, last_seen_at=at
    )
    if updated:
        return Alert.objects.get(key=key, resolved_at__isnull=True)
    try:
        with transaction.atomic():
            alert = Alert.objects.create(
                key=key, kind=kind, severity=severity, title=title, detail=detail,
                node_id=node_id, gpu_id=gpu_id, opened_at=at, last_seen_at=at,
            )
    except IntegrityError:
        # Another process opened the same alert between our update and insert.
        Alert.objects.filter(key=key, resolved_at__isnull=True).update(occurrences=F("occurrences") + 1)
        return Alert.objects.get(key=key, resolved_at__isnull=True)
    alert_queue_notifications(alert=alert)
    return alert


def alert_resolve_key(*, key: str, by: User | None = None) -> int:
    """Resolve the open alert with this key (e.g. a node came back); returns how many were resolved."""
    return Alert.objects.filter(key=key, resolved_at__isnull=True).update(resolved_at=timezone.now(), resolved_by=by)


def alert_resolve_others(*, kind: str, keep: list[str]) -> int:
    """Resolve every open alert of `kind` but those keyed in `keep` (a check that re-raises what still holds)."""
    return Alert.objects.filter(kind=kind, resolved_at__isnull=True).exclude(key__in=keep).update(
        resolved_at=timezone.now())


def alert_queue_notifications(*, alert: Alert) -> list[int]:
    """Record a pending delivery for each enabled channel that takes the alert's severity, and queue its task for
    when the surrounding transaction commits (so no worker looks for an alert that was rolled back). Returns the
    channel ids."""
    from portal.alerts.tasks import deliver_alert  # tasks.py imports this module

    rank = SEVERITY_RANK[Severity(alert.severity)]
    accepted = [severity for severity, r in SEVERITY_RANK.items() if r <= rank]
    channel_ids = list(
        NotificationChannel.objects.filter(enabled=True, min_severity__in=accepted).values_list("pk", flat=True)
    )
    now = timezone.now()
    AlertDelivery.objects.bulk_create(
        [AlertDelivery(alert=alert, channel_id=channel_id, at=now) for channel_id in channel_ids],
        ignore_conflicts=True,
    )
    for channel_id in channel_ids:
        # robust: a broker hiccup must not fail the ingest or status change that raised the alert.
        transaction.on_commit(partial(deliver_alert.delay, alert.pk, channel_id), robust=True)
    return channel_ids


def alert_acknowledge(*, alert_id: int, by: User, now: datetime | None = None) -> Alert:
    """Record who acknowledged an open alert and when. Acknowledging it again keeps the first acknowledgement."""
    Alert.objects.filter(pk=alert_id, resolved_at__isnull=True, acknowledged_at__isnull=True).update(
        acknowledged_at=now or timezone.now(), acknowledged_by=by
    )
    alert = Alert.objects.select_related("node", "gpu", "acknowledged_by", "resolved_by").get(pk=alert_id)
    if alert.acknowledged_at is None:
        raise AlertActionError("This alert is already resolved; there is nothing to acknowledge.")
    return alert


def alert_resolve(*, alert_id: int, by: User, now: datetime | None = None) -> Alert:
    """Record who resolved an alert and when; its next occurrence opens a new alert. Resolving it again is a no-op."""
    Alert.objects.filter(pk=alert_id, resolved_at__isnull=True).update(
        resolved_at=now or timezone.now(), resolved_by=by
    )
    return Alert.objects.select_related("node", "gpu", "acknowledged_by", "resolved_by").get(pk=alert_id)


def alert_deliver(*, alert_id: int, channel_id: int) -> AlertDelivery | None:
    """Send one alert to one channel unless it was sent already; the outcome is recorded on its AlertDelivery
    (sent, or failed with the error). None when the alert or channel is gone or the channel was disabled since.

    The delivery row is claimed with a conditional update before sending, so two workers running the same task
    (a redelivered message) cannot both send. No transaction is held open during the network call."""
    channel = NotificationChannel.objects.filter(pk=channel_id, enabled=True).first()
    alert = Alert.objects.select_related("node", "gpu").filter(pk=alert_id).first()
    if channel is None or alert is None:
        return None
    now = timezone.now()
    delivery, _ = AlertDelivery.objects.get_or_create(alert=alert, channel=channel, defaults={"at": now})
    claimable = Q(status__in=[AlertDelivery.Status.PENDING, AlertDelivery.Status.FAILED]) | Q(
        status=AlertDelivery.Status.SENDING, at__lt=now - SENDING_STALE_AFTER
    )
    claimed = AlertDelivery.objects.filter(claimable, pk=delivery.pk).update(
        status=AlertDelivery.Status.SENDING, attempts=F("attempts") + 1, at=now
    )
    if not claimed:
        delivery.refresh_from_db()
        return delivery
    try:
        if channel.kind == NotificationChannel.Kind.EMAIL:
            _send_email(alert=alert, to=channel.target)
        else:
            _send_webhook(alert=alert, url=channel.target)
    except Exception as exc:
        # Whatever fails at the far end or in the mail backend is recorded and retried, never left "sending".
        status, error = AlertDelivery.Status.FAILED, _describe(exc)
    else:
        status, error = AlertDelivery.Status.SENT, ""
    AlertDelivery.objects.filter(pk=delivery.pk).update(status=status, error=error, at=timezone.now())
    delivery.refresh_from_db()
    return delivery


def notification_channel_create(
    *, name: str, kind: str, target: str, min_severity: str, enabled: bool, created_by: User | None
) -> NotificationChannel:
    return NotificationChannel.objects.create(
        name=name, kind=kind, target=target, min_severity=min_severity, enabled=enabled, created_by=created_by
    )


def notification_channel_set_enabled(*, channel_id: int, enabled: bool) -> NotificationChannel:
    """Enable or disable a channel; a disabled channel's queued deliveries are skipped, not sent."""
    channel = NotificationChannel.objects.get(pk=channel_id)
    if channel.enabled != enabled:
        channel.enabled = enabled
        channel.save(update_fields=["enabled"])
    return channel


def notification_channel_delete(*, channel_id: int) -> str:
    """Delete a channel with its delivery records; returns its name."""
    channel = NotificationChannel.objects.get(pk=channel_id)
    channel.delete()
    return channel.name


def alert_path(*, alert: Alert) -> str:
    return f"{reverse('alerts:list')}?alert={alert.pk}"


def alert_payload(*, alert: Alert) -> dict:
    """What a webhook receives (and what the e-mail says)."""
    return {
        "alert_id": alert.pk,
        "title": alert.title,
        "severity": alert.severity,
        "kind": alert.kind,
        "node": alert.node.hostname if alert.node else None,
        "gpu_index": alert.gpu.index if alert.gpu else None,
        "opened_at": alert.opened_at.isoformat(),
        "detail": alert.detail,
        "url": alert_path(alert=alert),
    }


def _send_email(*, alert: Alert, to: str) -> None:
    payload = alert_payload(alert=alert)
    body = "\n".join([
        alert.title,
        "",
        f"Severity: {alert.get_severity_display()}",
        f"Kind: {alert.kind_label}",
        f"Node: {payload['node'] or '-'}",
        f"GPU: {payload['gpu_index'] if payload['gpu_index'] is not None else '-'}",
        f"Opened (UTC): {alert.opened_at:%Y-%m-%d %H:%M:%S}",
        f"Detail: {alert.detail or '-'}",
        "",
        f"Open it in the portal: {payload['url']}",
    ])
    send_mail(f"[Tokenmill] {alert.severity.upper()}: {alert.title}", body, None, [to], fail_silently=False)


def _send_webhook(*, alert: Alert, url: str) -> None:
    request = urllib.request.Request(  # noqa: S310 (the channel form allows http and https URLs only)
        url, data=json.dumps(alert_payload(alert=alert)).encode(), method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "Tokenmill-alerts/1"},
    )
    with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_S) as response:  # noqa: S310 (as above)
        response.read()


def _describe(exc: Exception) -> str:
    if isinstance(exc, HTTPError):
        return f"HTTP {exc.code} {exc.reason}"[:500]
    return f"{type(exc).__name__}: {exc}"[:500]
