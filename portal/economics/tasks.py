from datetime import datetime, timedelta

from celery import shared_task

from portal.economics.services import cost_hours_attribute


@shared_task(acks_late=True)
def reattribute_costs(start_iso: str, end_iso: str) -> int:
    """Re-attribute the past hours an allocation change touched (capped at 31 days back)."""
    start, end = datetime.fromisoformat(start_iso), datetime.fromisoformat(end_iso)
    start = max(start, end - timedelta(days=31)).replace(minute=0, second=0, microsecond=0)
    hours = []
    while start < end:
        hours.append(start)
        start += timedelta(hours=1)
    return cost_hours_attribute(hours=hours)
