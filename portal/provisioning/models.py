from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

DEFAULT_INSTALL_DIR = "/opt/tokenmill-agent"


class SshCredential(models.Model):
    """How the portal logs in to nodes: a private key uploaded once (stored Fernet-encrypted, never shown again)
    or the path of a key file on the portal host."""

    name = models.CharField(max_length=100, unique=True)
    private_key_encrypted = models.TextField(blank=True, help_text="Fernet token of the OpenSSH private key")
    key_path = models.CharField(max_length=500, blank=True)
    public_key = models.TextField(help_text="OpenSSH public key line, for the nodes' authorized_keys")
    fingerprint = models.CharField(max_length=80)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                   related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=(Q(private_key_encrypted="") & ~Q(key_path=""))
                | (~Q(private_key_encrypted="") & Q(key_path="")),
                name="sshcredential_key_or_path",
            )
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def source(self) -> str:
        return f"file {self.key_path}" if self.key_path else "uploaded (encrypted)"


class KnownHost(models.Model):
    """The SSH host key pinned for one host and port: confirmed by an operator from the fingerprint shown in the
    browser, or taken from an uploaded known_hosts file. Connections present exactly this key or fail."""

    class Source(models.TextChoices):
        CONFIRMED = "confirmed", "Confirmed in the browser"
        KNOWN_HOSTS = "known_hosts", "Uploaded known_hosts"

    host = models.CharField(max_length=253)
    port = models.PositiveIntegerField(validators=[MinValueValidator(1), MaxValueValidator(65535)])
    key_type = models.CharField(max_length=64)
    key_base64 = models.TextField()
    fingerprint = models.CharField(max_length=80)
    source = models.CharField(max_length=16, choices=Source.choices)
    added_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                 related_name="+")
    added_at = models.DateTimeField()

    class Meta:
        ordering = ["host", "port"]
        constraints = [models.UniqueConstraint(fields=["host", "port"], name="knownhost_host_port_unique")]

    def __str__(self) -> str:
        return f"{self.host}:{self.port} {self.fingerprint}"


class JobKind(models.TextChoices):
    INSTALL = "install", "Install agent"
    BURN_IN = "burn_in", "Acceptance test"
    DECOMMISSION = "decommission", "Decommission"


class JobStatus(models.TextChoices):
    HOST_KEY = "host_key", "Awaiting host key confirmation"
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    DONE = "done", "Done"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


ACTIVE_STATUSES = (JobStatus.HOST_KEY, JobStatus.QUEUED, JobStatus.RUNNING)
FINISHED_STATUSES = (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


class ProvisioningJob(models.Model):
    """Bringing one node online over SSH (or taking it out): an ordered list of steps, retried from the first step
    not yet done."""

    kind = models.CharField(max_length=16, choices=JobKind.choices, default=JobKind.INSTALL)
    status = models.CharField(max_length=16, choices=JobStatus.choices, default=JobStatus.HOST_KEY)
    site = models.ForeignKey("fleet.Site", on_delete=models.PROTECT, related_name="+")
    host = models.CharField(max_length=253)
    port = models.PositiveIntegerField(default=22, validators=[MinValueValidator(1), MaxValueValidator(65535)])
    username = models.CharField(max_length=64, default="root")
    node_name = models.CharField(max_length=253, help_text="Hostname the node reports to the portal")
    credential = models.ForeignKey(SshCredential, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    install_dir = models.CharField(max_length=255, default=DEFAULT_INSTALL_DIR)
    simulate_gpus = models.PositiveSmallIntegerField(default=0, validators=[MaxValueValidator(64)],
                                                     help_text="0: the node's real GPUs")
    portal_url = models.CharField(max_length=500, help_text="Portal URL as the node reaches it")
    skip_ssh = models.BooleanField(default=False, help_text="Decommission without touching the node")
    # Host key the server offered on first contact, shown to the operator until confirmed or rejected.
    offered_key_type = models.CharField(max_length=64, blank=True)
    offered_key_base64 = models.TextField(blank=True)
    offered_fingerprint = models.CharField(max_length=80, blank=True)
    init_system = models.CharField(max_length=16, blank=True, help_text="systemd, or none (detached process)")
    facts = models.JSONField(default=dict, blank=True, help_text="Preflight findings")
    enrollment_token = models.ForeignKey("fleet.EnrollmentToken", on_delete=models.SET_NULL, null=True, blank=True,
                                         related_name="+")
    node = models.ForeignKey("fleet.Node", on_delete=models.SET_NULL, null=True, blank=True,
                             related_name="provisioning_jobs")
    error = models.TextField(blank=True)
    attempt = models.PositiveIntegerField(default=0)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                   related_name="+")
    created_at = models.DateTimeField()
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        indexes = [models.Index(fields=["status"]), models.Index(fields=["host", "port"])]
        # Two jobs driving one node at once would undo each other's steps: the database refuses the second.
        constraints = [
            models.UniqueConstraint(fields=["node"], condition=Q(status__in=ACTIVE_STATUSES, node__isnull=False),
                                    name="provisioningjob_one_active_per_node"),
            models.UniqueConstraint(fields=["host", "port"], condition=Q(status__in=ACTIVE_STATUSES) & ~Q(host=""),
                                    name="provisioningjob_one_active_per_host"),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} {self.target}"

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.username}@{host}:{self.port}"

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    @property
    def offered_key_file(self) -> str:
        """Where OpenSSH keeps the offered key on the node, for the operator to compare fingerprints."""
        kind = next((k for k in ("ed25519", "ecdsa", "rsa") if k in self.offered_key_type), "rsa")
        return f"/etc/ssh/ssh_host_{kind}_key.pub"


class StepStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    DONE = "done", "Done"
    SKIPPED = "skipped", "Done earlier"
    WARNING = "warning", "Done with warnings"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


COMPLETED_STEP_STATUSES = (StepStatus.DONE, StepStatus.SKIPPED, StepStatus.WARNING)


class ProvisioningStep(models.Model):
    """One step of one attempt of a job, with what it printed and how long it took."""

    job = models.ForeignKey(ProvisioningJob, on_delete=models.CASCADE, related_name="steps")
    attempt = models.PositiveIntegerField()
    position = models.PositiveSmallIntegerField()
    key = models.CharField(max_length=32)
    title = models.CharField(max_length=100)
    status = models.CharField(max_length=16, choices=StepStatus.choices, default=StepStatus.PENDING)
    output = models.TextField(blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["job_id", "attempt", "position"]
        constraints = [
            models.UniqueConstraint(fields=["job", "attempt", "key"], name="provisioningstep_job_attempt_key_unique")
        ]

    def __str__(self) -> str:
        return f"{self.job_id}#{self.attempt} {self.key}: {self.status}"

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()
