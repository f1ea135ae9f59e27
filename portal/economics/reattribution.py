"""Re-attribution of past hours, coalesced: each change that makes hours stale records their range, and one
background run at a time re-attributes the union of every range recorded (Zulip-style: one module per action).
A burst of changes (a seeded factory, a batch of backdated allocations) costs one run, not one per change."""

from datetime import datetime, timedelta

from django.core.cache import cache
from django.db import transaction
from django.utils import timezone

from portal.economics.models import PendingAttribution
from portal.economics.selectors import attributed_through
from portal.economics.services import cost_hours_attribute
from portal.hours import hours_between

# Set while a run is queued and not yet started, so further requests only add their range.
QUEUED_KEY = "economics:reattribution-queued"
# A range asked for is cut to its last 31 days (a mistyped year must not recompute a decade); how long ago it lies
# does not matter: the books re-attribute any past month.
REACH = timedelta(days=31)


def reattribution_request(*, start: datetime, end: datetime | None = None) -> None:
    """Record that [start, end) (end: now) needs re-attribution, and queue a run after commit unless one is
    already queued."""
    from portal.economics.tasks import reattribute_pending  # the task module imports this one

    now = timezone.now()
    end = min(end or now, now)
    if start >= end:
        return
    PendingAttribution.objects.create(start=max(start, end - REACH), end=end)

    def queue() -> None:
        if cache.add(QUEUED_KEY, True, timeout=3600):
            reattribute_pending.delay()

    transaction.on_commit(queue)


def reattribution_run() -> int:
    """Re-attribute every pending range up to where the rollups have attributed (the hour still running is
    theirs), then drop the ranges done. Returns the hours re-attributed."""
    cache.delete(QUEUED_KEY)  # from here on, a new request queues a run of its own
    through = attributed_through()
    with transaction.atomic():
        pending = list(PendingAttribution.objects.select_for_update().order_by("pk"))
        if not pending:
            return 0
        hours = set()
        if through is not None:
            for row in pending:
                hours.update(hours_between(row.start, min(row.end, through)))
            cost_hours_attribute(hours=sorted(hours), now=through)
        PendingAttribution.objects.filter(pk__in=[row.pk for row in pending]).delete()
    return len(hours)
