from datetime import timedelta

from celery import shared_task
from django.utils import timezone

from portal.alerts.models import AlertDelivery
from portal.alerts.services import alert_deliver

MAX_RETRIES = 6


@shared_task(bind=True, acks_late=True, max_retries=MAX_RETRIES)
def deliver_alert(self, alert_id: int, channel_id: int) -> str | None:
    """Send one alert to one channel; a failure is retried with exponential backoff (30 s, 1 min, ... 16 min)."""
    delivery = alert_deliver(alert_id=alert_id, channel_id=channel_id)
    if delivery is not None and delivery.status == AlertDelivery.Status.FAILED:
        raise self.retry(countdown=30 * 2**self.request.retries)
    return delivery.status if delivery else None


@shared_task(acks_late=True)
def requeue_stale_deliveries() -> int:
    """Deliveries still pending (the broker was down when their alert opened) get their task queued again.
    alert_deliver claims a delivery before sending, so a delivery is never sent twice."""
    stale = AlertDelivery.objects.filter(
        status=AlertDelivery.Status.PENDING, at__lt=timezone.now() - timedelta(minutes=5)
    ).values_list("alert_id", "channel_id")
    for alert_id, channel_id in stale:
        deliver_alert.delay(alert_id, channel_id)
    return len(stale)
