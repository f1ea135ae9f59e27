"""Who holds which GPU capacity, and what runs on it.

An Allocation gives a tenant a whole GPU or one MIG instance over [starts_at, ends_at) (open-ended when ends_at is
null). Each allocation covers a slot range of its GPU: the whole GPU covers every slot, a MIG instance only its
own. The database refuses two allocations of the same GPU whose slots and times overlap (an exclusion constraint on
PostgreSQL, triggers on SQLite: migration 0002), so one unit is never held by two tenants at once.
"""

from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q

WHOLE_GPU_SLOTS = (0, 1000)


GPU_SLICES = 7  # compute slices of a MIG-capable GPU (A100, H100)


def unit_share(mig_slices: int | None) -> Decimal:
    """The share of a GPU's compute a unit is, wherever capacity is counted or costed: a whole GPU (no MIG
    instance) 1, a MIG instance its slices out of 7."""
    return Decimal(mig_slices) / GPU_SLICES if mig_slices is not None else Decimal(1)


class Allocation(models.Model):
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="allocations")
    gpu = models.ForeignKey("fleet.Gpu", on_delete=models.PROTECT, related_name="allocations")
    mig_instance = models.ForeignKey(
        "fleet.MigInstance", on_delete=models.PROTECT, null=True, blank=True, related_name="allocations"
    )
    slot_lo = models.PositiveIntegerField(help_text="First slot covered: 0 for a whole GPU, the GI id for MIG")
    slot_hi = models.PositiveIntegerField(help_text="One past the last slot covered")
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                   related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    request = models.ForeignKey("capacity.CapacityRequest", on_delete=models.SET_NULL, null=True, blank=True,
                                related_name="allocations")

    class Meta:
        ordering = ["-starts_at"]
        constraints = [
            models.CheckConstraint(condition=Q(ends_at__isnull=True) | Q(ends_at__gt=models.F("starts_at")),
                                   name="allocation_ends_after_start"),
            models.CheckConstraint(condition=Q(slot_hi__gt=models.F("slot_lo")), name="allocation_slots_nonempty"),
        ]
        indexes = [models.Index(fields=["gpu", "starts_at"]), models.Index(fields=["tenant", "starts_at"])]

    def __str__(self) -> str:
        unit = self.mig_instance.profile if self.mig_instance_id else "whole GPU"
        return f"{self.tenant} holds {unit} of GPU {self.gpu_id} from {self.starts_at:%Y-%m-%d %H:%M}"

    @property
    def share(self) -> Decimal:
        """Share of the GPU's compute it holds (unit_share)."""
        return unit_share(self.mig_instance.slices if self.mig_instance_id else None)

    @property
    def gpu_share(self) -> float:
        return float(self.share)


class RequestStatus(models.TextChoices):
    OPEN = "open", "Open"
    FULFILLED = "fulfilled", "Fulfilled"
    DECLINED = "declined", "Declined"
    CANCELLED = "cancelled", "Cancelled"


class CapacityRequest(models.Model):
    """A tenant asks for capacity; an operator fulfils it with allocations (helped by the placement proposal)."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="capacity_requests")
    model_name = models.CharField(max_length=200, help_text="The model to serve, e.g. meta-llama/Llama-3.1-8B")
    gpu_type = models.CharField(max_length=128, help_text="GPU model name, e.g. NVIDIA H100 80GB HBM3")
    count = models.PositiveIntegerField(default=1, help_text="Whole GPUs, or MIG instances of mig_profile")
    mig_profile = models.CharField(max_length=32, blank=True, help_text="e.g. 3g.40gb; blank for whole GPUs")
    starts_at = models.DateTimeField()
    note = models.TextField(blank=True)
    status = models.CharField(max_length=16, choices=RequestStatus.choices, default=RequestStatus.OPEN)
    decision_note = models.TextField(blank=True)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                     related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    decided_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                   related_name="+")

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        unit = f"{self.count} x {self.mig_profile}" if self.mig_profile else f"{self.count} GPU(s)"
        return f"{self.tenant}: {unit} {self.gpu_type} for {self.model_name}"


# The engine settings an operator records with a deployment (what the engine does not export itself), as the
# deployment form, the economics ranking and the tokens-per-dollar advisor name them.
ENGINE_SETTINGS = {"precision": "Weights", "kv_cache_dtype": "KV cache", "speculative_decoding": "Speculative decoding",
                   "max_batch_size": "Max batch size"}


class Deployment(models.Model):
    """A tenant's model served by an engine on allocated units, scraped at its metrics endpoint on the node.
    Usage from that endpoint belongs to the tenant from active_from until ended_at."""

    class Engine(models.TextChoices):
        VLLM = "vllm", "vLLM"
        TGI = "tgi", "TGI"
        TRITON = "triton", "Triton / TensorRT-LLM"
        SGLANG = "sglang", "SGLang"

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="deployments")
    name = models.CharField(max_length=120)
    model_name = models.CharField(max_length=200)
    engine = models.CharField(max_length=16, choices=Engine.choices)
    node = models.ForeignKey("fleet.Node", on_delete=models.PROTECT, related_name="deployments")
    metrics_url = models.URLField(max_length=500)
    allocations = models.ManyToManyField(Allocation, related_name="deployments", blank=True)
    settings = models.JSONField(default=dict, blank=True,
                                help_text="Engine settings: precision/quantization, speculative decoding, KV dtype")
    active_from = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["tenant__name", "name"]
        constraints = [
            models.UniqueConstraint(fields=["node", "metrics_url"], condition=Q(ended_at__isnull=True),
                                    name="deployment_live_endpoint_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.model_name})"


class Quota(models.Model):
    """Per-tenant limits shown against use; exceeding one raises an alert."""

    tenant = models.OneToOneField("tenants.Tenant", on_delete=models.CASCADE, related_name="quota")
    tokens_per_minute = models.PositiveBigIntegerField(null=True, blank=True)
    gpus = models.PositiveIntegerField(null=True, blank=True, help_text="Whole-GPU equivalents (MIG: slices/7)")

    def __str__(self) -> str:
        return f"Quota of {self.tenant}"
