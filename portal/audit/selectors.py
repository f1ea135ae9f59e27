from django.db.models import QuerySet

from portal.audit.models import AuditEntry


def audit_entries(*, tenant_id: int | None = None, action: str | None = None,
                  actor: str | None = None) -> QuerySet[AuditEntry]:
    """Entries newest first, optionally for one tenant, one action and/or one actor (by username)."""
    entries = AuditEntry.objects.select_related("tenant")
    if tenant_id is not None:
        entries = entries.filter(tenant_id=tenant_id)
    if action:
        entries = entries.filter(action=action)
    if actor:
        entries = entries.filter(actor_label=actor)
    return entries.order_by("-at", "-id")


def audit_actions() -> list[str]:
    return list(AuditEntry.objects.order_by("action").values_list("action", flat=True).distinct())
