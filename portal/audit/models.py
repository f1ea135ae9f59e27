from django.conf import settings
from django.db import models


class AuditEntry(models.Model):
    """Who did what, when, to which object, with the state before and after. Written by services, never edited."""

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                              related_name="+")
    actor_label = models.CharField(max_length=150, help_text="The actor's username at the time (kept if deleted)")
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.SET_NULL, null=True, blank=True, related_name="+",
                               help_text="The tenant the action concerns, if any")
    action = models.CharField(max_length=64, help_text="e.g. tenant.approve, allocation.create, apikey.revoke")
    target = models.CharField(max_length=200, help_text="The object acted on, as text")
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["tenant", "-at"]), models.Index(fields=["action", "-at"])]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M} {self.actor_label} {self.action} {self.target}"
