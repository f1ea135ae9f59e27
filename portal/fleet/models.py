from decimal import Decimal

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone


class Site(models.Model):
    """One factory (data center) and its cost model."""

    name = models.CharField(max_length=120, unique=True)
    slug = models.SlugField(max_length=64, unique=True)
    location = models.CharField(max_length=120, blank=True)
    currency = models.CharField(max_length=3, default="USD")
    gpu_capex = models.DecimalField(
        max_digits=12, decimal_places=2, validators=[MinValueValidator(Decimal(0))],
        help_text="Purchase cost of one GPU including its share of the server and network",
    )
    depreciation_months = models.PositiveIntegerField(default=48, validators=[MinValueValidator(1)])
    energy_price_kwh = models.DecimalField(max_digits=8, decimal_places=4, validators=[MinValueValidator(Decimal(0))])
    pue = models.DecimalField(max_digits=4, decimal_places=2, default=Decimal("1.30"),
                              validators=[MinValueValidator(Decimal(1))])
    other_opex_gpu_hour = models.DecimalField(
        max_digits=10, decimal_places=4, default=Decimal(0), validators=[MinValueValidator(Decimal(0))],
        help_text="Space, staff, network and support per GPU-hour",
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class NodeStatus(models.TextChoices):
    PENDING = "pending", "Pending first batch"
    ONLINE = "online", "Online"
    OFFLINE = "offline", "Offline"
    DECOMMISSIONED = "decommissioned", "Decommissioned"


class NodeLifecycle(models.TextChoices):
    """Where a node stands between the bring-up plan and retirement; only a sellable node's units are placed."""

    PLANNED = "planned", "Planned"
    PROVISIONING = "provisioning", "Provisioning"
    BURN_IN = "burn_in", "Burn-in"
    SELLABLE = "sellable", "Sellable"
    CORDONED = "cordoned", "Cordoned"
    RETIRED = "retired", "Retired"


class Node(models.Model):
    """One GPU server. Its identity is the credential its agent enrolled with (a planned node has none yet)."""

    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="nodes")
    hostname = models.CharField(max_length=253)
    status = models.CharField(max_length=16, choices=NodeStatus.choices, default=NodeStatus.PENDING)
    # A node enrolled outside a bring-up plan is sellable at once, as before lifecycles existed; a planned node
    # becomes sellable only when its acceptance test passes (fleet.services.node_lifecycle_set).
    lifecycle = models.CharField(max_length=16, choices=NodeLifecycle.choices, default=NodeLifecycle.SELLABLE)
    planned_gpu_model = models.CharField(max_length=128, blank=True, help_text="GPU model the plan expects")
    planned_gpus = models.PositiveSmallIntegerField(null=True, blank=True, help_text="GPUs the plan expects")
    created_at = models.DateTimeField(auto_now_add=True)
    # Inventory: the node is on the books from installed_at until it is decommissioned (retired_at); its GPUs'
    # hours count only inside both their own period and the node's (fleet.selectors.gpu_presence).
    installed_at = models.DateTimeField(default=timezone.now)
    retired_at = models.DateTimeField(null=True, blank=True)
    last_seen = models.DateTimeField(null=True, blank=True, help_text="Written at most once a minute")
    # Host facts, as the agent last reported them (they drive the version-drift view).
    os = models.CharField(max_length=128, blank=True)
    kernel = models.CharField(max_length=128, blank=True)
    driver_version = models.CharField(max_length=32, blank=True)
    cuda_driver_version = models.CharField(max_length=32, blank=True)
    nvml_version = models.CharField(max_length=32, blank=True)
    agent_version = models.CharField(max_length=32, blank=True)
    simulated = models.BooleanField(default=False)
    # The agent's quarantine, as its newest batch reported it: batches the portal refused for good, and the tokens
    # they hold (not billed until `tokenmill-agent requeue` sends them again).
    quarantined_batches = models.PositiveIntegerField(default=0)
    quarantined_tokens = models.PositiveBigIntegerField(default=0)
    # Desired agent configuration; config_version rises whenever it or the node's scrape targets change.
    interval_s = models.PositiveIntegerField(default=10, validators=[MinValueValidator(1)])
    sample_s = models.FloatField(default=1.0)
    config_version = models.PositiveIntegerField(default=1)

    class Meta:
        ordering = ["site__name", "hostname"]
        constraints = [models.UniqueConstraint(fields=["site", "hostname"], name="node_site_hostname_unique")]

    def __str__(self) -> str:
        return self.hostname


class NodeCredential(models.Model):
    """Bearer credential of a node's agent: `tmn_<prefix>_<secret>`, stored as prefix + HMAC-SHA256."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="credentials")
    prefix = models.CharField(max_length=16, unique=True)
    digest = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)


class EnrollmentToken(models.Model):
    """One-time, expiring token an agent trades for a node credential: `tme_<prefix>_<secret>`."""

    site = models.ForeignKey(Site, on_delete=models.CASCADE, related_name="enrollment_tokens")
    prefix = models.CharField(max_length=16, unique=True)
    digest = models.CharField(max_length=64)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    node = models.ForeignKey(Node, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    note = models.CharField(max_length=200, blank=True)


class Gpu(models.Model):
    """A physical GPU, identified by its NVML UUID. The current_* fields mirror the latest batch for the fleet grid."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="gpus")
    uuid = models.CharField(max_length=72, unique=True)
    installed_at = models.DateTimeField(default=timezone.now, help_text="Since when it is on the books: its first "
                                        "reported interval, or when an operator recorded it")
    retired_at = models.DateTimeField(null=True, blank=True, help_text="When its node was decommissioned")
    index = models.PositiveSmallIntegerField()
    name = models.CharField(max_length=128)
    pci_bus_id = models.CharField(max_length=32, blank=True)
    memory_total_mib = models.PositiveIntegerField(null=True, blank=True)
    power_limit_w = models.FloatField(null=True, blank=True)
    mig_mode = models.BooleanField(default=False)
    cc_mode = models.CharField(max_length=32, blank=True)
    current_util = models.FloatField(null=True, blank=True)
    current_power_w = models.FloatField(null=True, blank=True)
    current_temp_c = models.FloatField(null=True, blank=True)
    current_memory_used_mib = models.PositiveIntegerField(null=True, blank=True)
    current_at = models.DateTimeField(null=True, blank=True)
    ecc_uncorrected_total = models.PositiveBigIntegerField(null=True, blank=True)
    retired_pages = models.PositiveIntegerField(null=True, blank=True)
    remapped_rows_failure = models.BooleanField(null=True, blank=True)

    class Meta:
        ordering = ["node_id", "index"]

    def __str__(self) -> str:
        return f"{self.node_id}:{self.index} {self.name}"


class MigInstance(models.Model):
    gpu = models.ForeignKey(Gpu, on_delete=models.CASCADE, related_name="mig_instances")
    gi_id = models.PositiveSmallIntegerField()
    profile = models.CharField(max_length=32)
    uuid = models.CharField(max_length=80, blank=True)
    memory_total_mib = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["gpu_id", "gi_id"]
        constraints = [models.UniqueConstraint(fields=["gpu", "gi_id"], name="mig_gpu_gi_unique")]

    def __str__(self) -> str:
        return f"{self.profile} (GI {self.gi_id})"

    @staticmethod
    def profile_slices(profile: str) -> int:
        """Compute slices out of the GPU's 7 in a MIG profile (the number before 'g': "3g.40gb" holds 3)."""
        return int(profile.split("g", 1)[0])

    @property
    def slices(self) -> int:
        return self.profile_slices(self.profile)


class ScrapeTarget(models.Model):
    """An engine metrics endpoint the node's agent is told to scrape (desired configuration)."""

    class Engine(models.TextChoices):
        VLLM = "vllm", "vLLM"
        TGI = "tgi", "TGI"
        TRITON = "triton", "Triton / TensorRT-LLM"
        SGLANG = "sglang", "SGLang"

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="scrape_targets")
    url = models.URLField(max_length=500)
    engine = models.CharField(max_length=16, choices=Engine.choices)
    model = models.CharField(max_length=200, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["node", "url"], name="scrapetarget_node_url_unique")]


class ServingEndpoint(models.Model):
    """An (endpoint, model) pair as the agent observed it; usage rows hang off it."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="endpoints")
    url = models.CharField(max_length=500)
    model = models.CharField(max_length=200)
    engine = models.CharField(max_length=16, choices=ScrapeTarget.Engine.choices)
    version = models.CharField(max_length=64, blank=True)
    settings = models.JSONField(default=dict, blank=True)
    up = models.BooleanField(default=False)
    probe_latency_ms = models.FloatField(null=True, blank=True)
    running = models.FloatField(null=True, blank=True)
    waiting = models.FloatField(null=True, blank=True)
    kv_cache_usage = models.FloatField(null=True, blank=True)
    last_seen = models.DateTimeField(null=True, blank=True)
    token_families = models.JSONField(null=True, blank=True,
                                      help_text="Token counters the agent found (null: an agent too old to say)")
    unbillable_since = models.DateTimeField(
        null=True, blank=True, help_text="Answering without any token counter since: its tokens cannot be billed")

    class Meta:
        ordering = ["node_id", "url", "model"]
        constraints = [
            models.UniqueConstraint(fields=["node", "url", "model"], name="endpoint_node_url_model_unique")
        ]

    def __str__(self) -> str:
        return f"{self.model} @ {self.url}"


class NodeStatusChange(models.Model):
    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="status_changes")
    status = models.CharField(max_length=16, choices=NodeStatus.choices)
    at = models.DateTimeField()
    reason = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-at"]
        indexes = [models.Index(fields=["node", "-at"])]


class NodeLifecycleChange(models.Model):
    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="lifecycle_changes")
    lifecycle = models.CharField(max_length=16, choices=NodeLifecycle.choices)
    at = models.DateTimeField()
    reason = models.CharField(max_length=300, blank=True)
    by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                           related_name="+")

    class Meta:
        ordering = ["at", "pk"]
        indexes = [models.Index(fields=["node", "at"])]


class HealthEventKind(models.TextChoices):
    XID = "xid", "XID error"
    ECC_UNCORRECTED = "ecc_uncorrected", "Uncorrected ECC error"
    ECC_CORRECTED = "ecc_corrected", "Corrected ECC errors"
    REMAPPED_ROWS = "remapped_rows", "Row remapping"
    THERMAL_THROTTLE = "thermal_throttle", "Thermal throttling"
    POWER_THROTTLE = "power_throttle", "Power throttling"
    GPU_LOST = "gpu_lost", "GPU lost"
    NODE_OFFLINE = "node_offline", "Node offline"
    NODE_ONLINE = "node_online", "Node back online"


class HealthEvent(models.Model):
    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="health_events")
    gpu = models.ForeignKey(Gpu, on_delete=models.CASCADE, null=True, blank=True, related_name="health_events")
    kind = models.CharField(max_length=24, choices=HealthEventKind.choices)
    code = models.PositiveIntegerField(null=True, blank=True)
    detail = models.CharField(max_length=500, blank=True)
    at = models.DateTimeField()

    class Meta:
        ordering = ["-at"]
        indexes = [models.Index(fields=["node", "-at"]), models.Index(fields=["-at"])]
