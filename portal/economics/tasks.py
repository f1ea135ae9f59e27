from datetime import datetime, timedelta

from celery import shared_task

from portal.economics.selectors import attributed_through
from portal.economics.services import cost_hours_attribute
from portal.hours import hours_between


@shared_task(acks_late=True)
def reattribute_costs(start_iso: str, end_iso: str) -> int:
    """Re-attribute the past hours an allocation change touched (capped at 31 days back)."""
    start, end = datetime.fromisoformat(start_iso), datetime.fromisoformat(end_iso)
    # No further than the rollups have attributed: the hour still running is theirs, so every page stops at the
    # same moment.
    through = attributed_through()
    if through is None:
        return 0
    end = min(end, through)
    return cost_hours_attribute(hours=hours_between(max(start, end - timedelta(days=31)), end), now=through)


@shared_task(acks_late=True)
def reconcile_books() -> int:
    """Check this month's books (and last month's in its first days); a break raises the books alert."""
    from portal.economics.books import books_alert

    return books_alert()
