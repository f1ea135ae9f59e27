from celery import shared_task

from portal.economics.reattribution import reattribution_run


@shared_task(acks_late=True)
def reattribute_pending() -> int:
    """Re-attribute the union of every pending range (economics.reattribution); a no-op when none is left."""
    return reattribution_run()


@shared_task(acks_late=True)
def reconcile_books() -> int:
    """Check this month's books (and last month's in its first days); a break raises the books alert."""
    from portal.economics.books import books_alert

    return books_alert()
