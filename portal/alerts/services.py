from datetime import datetime

from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from portal.accounts.models import User
from portal.alerts.models import Alert


def alert_raise(
    *, key: str, kind: str, severity: str, title: str, at: datetime, detail: str = "",
    node_id: int | None = None, gpu_id: int | None = None,
) -> Alert:
    """Open an alert, or count one more occurrence on the open alert with the same key."""
    updated = Alert.objects.filter(key=key, resolved_at__isnull=True).update(
        occurrences=F("occurrences") + 1, last_seen_at=at
    )
    if updated:
        return Alert.objects.get(key=key, resolved_at__isnull=True)
    try:
        with transaction.atomic():
            return Alert.objects.create(
                key=key, kind=kind, severity=severity, title=title, detail=detail,
                node_id=node_id, gpu_id=gpu_id, opened_at=at, last_seen_at=at,
            )
    except IntegrityError:
        # Another process opened the same alert between our update and insert.
        Alert.objects.filter(key=key, resolved_at__isnull=True).update(occurrences=F("occurrences") + 1)
        return Alert.objects.get(key=key, resolved_at__isnull=True)


def alert_resolve_key(*, key: str, by: User | None = None) -> int:
    """Resolve the open alert with this key (e.g. a node came back); returns how many were resolved."""
    return Alert.objects.filter(key=key, resolved_at__isnull=True).update(resolved_at=timezone.now(), resolved_by=by)
