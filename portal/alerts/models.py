from django.conf import settings
from django.db import models
from django.db.models import Q

from portal.fleet.models import HealthEventKind


class Severity(models.TextChoices):
    CRITICAL = "critical", "Critical"
    WARNING = "warning", "Warning"
    INFO = "info", "Info"


SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}


# Ingest and offline detection raise alerts of these health-event kinds (the others never page anyone), the
# pipeline, SLAs, quotas and billing of the others.
ALERT_KINDS = [
    *((kind.value, kind.label) for kind in HealthEventKind
      if kind not in (HealthEventKind.ECC_CORRECTED, HealthEventKind.NODE_ONLINE)),
    ("batches_set_aside", "Batches set aside"),
    ("agent_quarantine", "Agent quarantine"),
    ("unbillable_endpoint", "Unbillable deployment"),
    ("sla_breach", "SLA breach"),
    ("quota", "Quota"),
    ("billing", "Billing"),
    ("books", "Books"),
]


class AlertState(models.TextChoices):
    OPEN = "open", "Open"
    ACKNOWLEDGED = "acknowledged", "Acknowledged"
    RESOLVED = "resolved", "Resolved"


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

    @property
    def state(self) -> str:
        if self.resolved_at is not None:
            return AlertState.RESOLVED
        if self.acknowledged_at is not None:
            return AlertState.ACKNOWLEDGED
        return AlertState.OPEN

    @property
    def kind_label(self) -> str:
        return HealthEventKind(self.kind).label if self.kind in HealthEventKind.values else self.kind

    @property
    def xid_code(self) -> int | None:
        """The XID of an XID alert. Ingest keys them `xid:<code>:<gpu or node id>` and keeps no other copy."""
        if self.kind != HealthEventKind.XID:
            return None
        code = self.key.split(":")[1] if self.key.count(":") >= 2 else ""
        return int(code) if code.isdigit() else None


class NotificationChannel(models.Model):
    """Where new alerts are sent: an e-mail address or a webhook URL, for alerts at or above a severity."""

    class Kind(models.TextChoices):
        EMAIL = "email", "E-mail"
        WEBHOOK = "webhook", "Webhook"

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    target = models.CharField(max_length=500, help_text="E-mail address, or http(s) URL that receives a JSON POST")
    min_severity = models.CharField(
        max_length=16, choices=Severity.choices, default=Severity.CRITICAL, verbose_name="minimum severity"
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def accepts(self, severity: str) -> bool:
        return SEVERITY_RANK[Severity(severity)] >= SEVERITY_RANK[Severity(self.min_severity)]


class AlertDelivery(models.Model):
    """One alert sent to one channel. Unique per pair, so a retried or redelivered task never sends twice."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        SENDING = "sending", "Sending"
        SENT = "sent", "Sent"
        FAILED = "failed", "Failed"

    alert = models.ForeignKey(Alert, on_delete=models.CASCADE, related_name="deliveries")
    channel = models.ForeignKey(NotificationChannel, on_delete=models.CASCADE, related_name="deliveries")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    error = models.CharField(max_length=500, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    at = models.DateTimeField(help_text="When the latest attempt started (or the delivery was queued)")

    class Meta:
        ordering = ["-at"]
        constraints = [models.UniqueConstraint(fields=["alert", "channel"], name="alertdelivery_alert_channel_unique")]
