"""Service-level agreements: what a plan (or one tenant) is promised, and how each window measured up.

An SlaPolicy belongs to a plan, or to one tenant as an override that replaces its plan's policy as a whole. Each
SlaObjective names one indicator (SLI), its target, the rolling window it is measured over and the share of the
month's charges credited when the month misses it. SlaEvaluation is one measurement: unique per (tenant, SLI,
window end), so re-running an evaluation writes nothing new. SlaBreach is one episode of consecutive failing
windows, from the first failing window to the first compliant one.
"""

from decimal import Decimal

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q


class Sli(models.TextChoices):
    TTFT_P95 = "ttft_p95", "Time to first token p95"
    ITL_P95 = "itl_p95", "Inter-token latency p95"
    E2E_P99 = "e2e_p99", "End-to-end latency p99"
    AVAILABILITY = "availability", "Availability"
    ERROR_RATE = "error_rate", "Error rate"


# Quantile SLIs: (histogram field of the usage tiers, quantile).
QUANTILE_SLIS = {Sli.TTFT_P95: ("ttft", 0.95), Sli.ITL_P95: ("itl", 0.95), Sli.E2E_P99: ("e2e", 0.99)}
SLI_UNITS = {Sli.TTFT_P95: "s", Sli.ITL_P95: "s", Sli.E2E_P99: "s", Sli.AVAILABILITY: "%", Sli.ERROR_RATE: "%"}
HIGHER_IS_BETTER = frozenset({Sli.AVAILABILITY})


def sli_met(sli: str, value: float, target: Decimal) -> bool:
    """Whether a measured value meets the target: at least the target for availability, at most for the rest."""
    return value >= float(target) if sli in HIGHER_IS_BETTER else value <= float(target)


class Window(models.IntegerChoices):
    HOUR = 3600, "1 hour"
    DAY = 86400, "1 day"
    WEEK = 7 * 86400, "7 days"
    MONTH = 30 * 86400, "30 days"


class SlaPolicy(models.Model):
    name = models.CharField(max_length=120)
    plan = models.OneToOneField("tenants.Plan", on_delete=models.CASCADE, null=True, blank=True,
                                related_name="sla_policy")
    tenant = models.OneToOneField("tenants.Tenant", on_delete=models.CASCADE, null=True, blank=True,
                                  related_name="sla_override",
                                  help_text="Set for a per-tenant override of its plan's policy")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "SLA policies"
        constraints = [
            models.CheckConstraint(condition=Q(plan__isnull=True) ^ Q(tenant__isnull=True),
                                   name="slapolicy_plan_xor_tenant"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def scope(self) -> str:
        return f"override for {self.tenant}" if self.tenant_id else f"plan {self.plan}"


class SlaObjective(models.Model):
    policy = models.ForeignKey(SlaPolicy, on_delete=models.CASCADE, related_name="objectives")
    sli = models.CharField(max_length=16, choices=Sli.choices)
    target = models.DecimalField(max_digits=12, decimal_places=4, validators=[MinValueValidator(Decimal(0))],
                                 help_text="Seconds for latencies, percent for availability and error rate")
    window = models.PositiveIntegerField(choices=Window.choices, default=Window.HOUR)
    credit_pct = models.DecimalField(max_digits=5, decimal_places=2, default=Decimal(0),
                                     validators=[MinValueValidator(Decimal(0)), MaxValueValidator(Decimal(100))],
                                     help_text="Percent of the month's charges credited when the month misses it")

    class Meta:
        ordering = ["policy", "sli"]
        constraints = [models.UniqueConstraint(fields=["policy", "sli"], name="slaobjective_policy_sli_unique")]

    def __str__(self) -> str:
        return f"{self.get_sli_display()} {'≥' if self.sli in HIGHER_IS_BETTER else '≤'} {self.target_label}"

    @property
    def unit(self) -> str:
        return SLI_UNITS[Sli(self.sli)]

    @property
    def target_label(self) -> str:
        return f"{self.target.normalize():f} {self.unit}"


class SlaEvaluation(models.Model):
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="sla_evaluations")
    sli = models.CharField(max_length=16, choices=Sli.choices)
    window_end = models.DateTimeField()
    window_seconds = models.PositiveIntegerField()
    target = models.DecimalField(max_digits=12, decimal_places=4)
    value = models.FloatField(null=True, help_text="Null when the window saw no traffic (or no probes)")
    compliant = models.BooleanField(null=True)
    samples = models.BigIntegerField(default=0, help_text="Requests (latency, errors) or probes (availability)")
    # A health incident on a unit the tenant held during the window (sla.services.sla_windows_mark): the window
    # is still counted, and shown with its cause.
    incident = models.ForeignKey("health.Incident", on_delete=models.SET_NULL, null=True, blank=True,
                                 related_name="+")
    evaluated_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["window_end", "sli"]
        constraints = [models.UniqueConstraint(fields=["tenant", "sli", "window_end"],
                                               name="slaevaluation_tenant_sli_end_unique")]
        indexes = [models.Index(fields=["window_end"])]

    def __str__(self) -> str:
        return f"{self.tenant} {self.sli} @ {self.window_end:%Y-%m-%d %H:%M}: {self.value}"


class SlaBreach(models.Model):
    """Consecutive failing windows of one SLI of one tenant: an event shown on the compliance pages."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="sla_breaches")
    sli = models.CharField(max_length=16, choices=Sli.choices)
    target = models.DecimalField(max_digits=12, decimal_places=4)
    started_at = models.DateTimeField(help_text="End of the first failing window")
    last_failed_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True, help_text="End of the first compliant window after it")
    windows = models.PositiveIntegerField(default=1)
    worst_value = models.FloatField()

    class Meta:
        ordering = ["-started_at"]
        constraints = [models.UniqueConstraint(fields=["tenant", "sli"], condition=Q(ended_at__isnull=True),
                                               name="slabreach_open_unique")]

    def __str__(self) -> str:
        return f"{self.tenant} {self.get_sli_display()} breach from {self.started_at:%Y-%m-%d %H:%M}"

    @property
    def unit(self) -> str:
        return SLI_UNITS[Sli(self.sli)]
