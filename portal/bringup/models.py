"""A site's bring-up plan: the capacity it promises, by GPU model, and the day its 90-day clock started.

The nodes themselves are fleet.Node rows whose lifecycle runs planned → provisioning → burn-in → sellable; the
plan only says how many there will be, so the site page can tell how far the bring-up is and when it will end.
"""

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

DEFAULT_TARGET_DAYS = 90


class BringUpPlan(models.Model):
    site = models.OneToOneField("fleet.Site", on_delete=models.CASCADE, related_name="bringup_plan")
    started_on = models.DateField(help_text="Day the site's bring-up clock started")
    target_days = models.PositiveSmallIntegerField(
        default=DEFAULT_TARGET_DAYS, validators=[MinValueValidator(1), MaxValueValidator(3650)],
        help_text="Days from the start by which every planned GPU is sellable")
    soak_minutes = models.PositiveIntegerField(
        default=30, validators=[MaxValueValidator(7 * 24 * 60)],
        help_text="Minutes a node runs without a health event before it is accepted for sale")
    note = models.TextField(blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                   related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"Bring-up of {self.site}"


class PlannedCapacity(models.Model):
    """One line of a plan: so many nodes of so many GPUs of one model."""

    plan = models.ForeignKey(BringUpPlan, on_delete=models.CASCADE, related_name="lines")
    gpu_model = models.CharField(max_length=128, help_text="As NVML names it, e.g. NVIDIA H100 80GB HBM3")
    nodes = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    gpus_per_node = models.PositiveSmallIntegerField(validators=[MinValueValidator(1), MaxValueValidator(64)])

    class Meta:
        ordering = ["plan_id", "gpu_model"]
        constraints = [models.UniqueConstraint(fields=["plan", "gpu_model"], name="plannedcapacity_model_unique")]

    def __str__(self) -> str:
        return f"{self.nodes} x {self.gpus_per_node} {self.gpu_model}"

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node
