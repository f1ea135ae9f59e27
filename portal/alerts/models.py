from django.conf import settings
from django.db import models
from django.db.models import Q


class Severity(models.TextChoices):
    CRITICAL = "critical", "Critical"
    WARNING = "warning", "Warning"
    INFO = "info", "Info"


class Alert(models.Model):
    """Something an operator must look at. One open alert per key, however often its cause repeats."""

    key = models.CharField(max_length=200, help_text="What makes two causes the same alert, e.g. xid:79:GPU-...")
    kind = models.CharField(max_length=24)
    severity = models.CharField(max_length=16, choices=Severity.choices)
    title = models.CharField(max_length=200)
    detail = models.TextField(blank=True)
    node = models.ForeignKey("fleet.Node", on_delete=models.CASCADE, null=True, blank=True, related_name="alerts")
    gpu = models.ForeignKey("fleet.Gpu", on_delete=models.CASCADE, null=True, blank=True, related_name="alerts")
    opened_at = models.DateTimeField()
    last_seen_at = models.DateTimeField()
    occurrences = models.PositiveIntegerField(default=1)
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    acknowledged_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )

    class Meta:
        ordering = ["-opened_at"]
        constraints = [
            models.UniqueConstraint(fields=["key"], condition=Q(resolved_at__isnull=True), name="alert_open_key_unique")
        ]
        indexes = [models.Index(fields=["resolved_at", "-opened_at"])]

    def __str__(self) -> str:
        return self.title
