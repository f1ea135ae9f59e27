"""The health policy and what it does: XID rules, incidents, cordons and the notices tenants get.

A rule says what an XID means for sale (portal.health.catalog holds NVIDIA's defaults). Events of one XID on one
GPU group into one incident until the rule's quiet period passes without another. An incident whose rule cordons
opens a cordon: the GPU (or the node, or a MIG instance cordoned by hand) leaves placement until the node's
acceptance test passes again or an operator admin overrides it, audited.
"""

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

from portal.health.catalog import Action

DEFAULT_QUIET_MINUTES = 30


class HealthRule(models.Model):
    xid = models.PositiveIntegerField(unique=True, verbose_name="XID")
    title = models.CharField(max_length=200)
    nvidia_action = models.CharField(max_length=64, blank=True, help_text="NVIDIA's catalog action")
    action = models.CharField(max_length=16, choices=Action.choices)
    quiet_minutes = models.PositiveIntegerField(
        default=DEFAULT_QUIET_MINUTES, validators=[MinValueValidator(1), MaxValueValidator(7 * 24 * 60)],
        help_text="A burst of this XID is one incident; it closes after this long without another")
    note = models.CharField(max_length=300, blank=True)
    updated_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                   related_name="+")
    updated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["xid"]

    def __str__(self) -> str:
        return f"XID {self.xid}: {self.get_action_display()}"


class Incident(models.Model):
    """A burst of one XID on one GPU (or node), or an operator's manual cordon."""

    key = models.CharField(max_length=120, help_text="xid:<code>:gpu:<id>, xid:<code>:node:<id> or manual:<id>")
    node = models.ForeignKey("fleet.Node", on_delete=models.CASCADE, related_name="incidents")
    gpu = models.ForeignKey("fleet.Gpu", on_delete=models.CASCADE, null=True, blank=True, related_name="incidents")
    xid = models.PositiveIntegerField(null=True, blank=True)
    action = models.CharField(max_length=16, choices=Action.choices)
    title = models.CharField(max_length=200)
    opened_at = models.DateTimeField()
    last_event_at = models.DateTimeField()
    events = models.PositiveIntegerField(default=1)
    quiet_minutes = models.PositiveIntegerField(default=DEFAULT_QUIET_MINUTES)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-opened_at", "-pk"]
        constraints = [models.UniqueConstraint(fields=["key"], condition=Q(closed_at__isnull=True),
                                               name="incident_open_key_unique")]
        indexes = [models.Index(fields=["node", "-opened_at"]), models.Index(fields=["closed_at"])]

    def __str__(self) -> str:
        return self.title


class Cordon(models.Model):
    """A unit out of placement: the whole node (gpu and mig_instance null), one GPU, or one MIG instance."""

    node = models.ForeignKey("fleet.Node", on_delete=models.CASCADE, related_name="cordons")
    gpu = models.ForeignKey("fleet.Gpu", on_delete=models.CASCADE, null=True, blank=True, related_name="cordons")
    mig_instance = models.ForeignKey("fleet.MigInstance", on_delete=models.CASCADE, null=True, blank=True,
                                     related_name="cordons")
    scope_key = models.CharField(max_length=80, help_text="node:<id>, gpu:<id> or mig:<id>")
    incident = models.ForeignKey(Incident, on_delete=models.SET_NULL, null=True, blank=True,
                                 related_name="cordons")
    reason = models.CharField(max_length=300)
    started_at = models.DateTimeField()
    started_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                   related_name="+")
    ended_at = models.DateTimeField(null=True, blank=True)
    ended_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                 related_name="+")
    end_reason = models.CharField(max_length=300, blank=True)
    override = models.BooleanField(default=False, help_text="Ended by an admin without a passing acceptance test")

    class Meta:
        ordering = ["-started_at", "-pk"]
        constraints = [
            models.UniqueConstraint(fields=["scope_key"], condition=Q(ended_at__isnull=True),
                                    name="cordon_open_scope_unique"),
            models.CheckConstraint(condition=Q(mig_instance__isnull=True) | Q(gpu__isnull=False),
                                   name="cordon_mig_has_gpu"),
        ]
        indexes = [models.Index(fields=["ended_at"])]

    def __str__(self) -> str:
        return f"Cordon {self.scope_key}: {self.reason}"

    @property
    def scope(self) -> str:
        if self.mig_instance_id:
            return "MIG instance"
        return "GPU" if self.gpu_id else "node"


class TenantNotice(models.Model):
    """What a tenant is told about an incident on a unit it holds: shown in its portal and mailed to its admins."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="notices")
    incident = models.ForeignKey(Incident, on_delete=models.CASCADE, related_name="notices")
    unit = models.CharField(max_length=200, help_text="The unit it holds, as the tenant knows it")
    title = models.CharField(max_length=200)
    body = models.TextField()
    created_at = models.DateTimeField()
    mailed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        constraints = [models.UniqueConstraint(fields=["tenant", "incident"], name="notice_tenant_incident_unique")]

    def __str__(self) -> str:
        return self.title
