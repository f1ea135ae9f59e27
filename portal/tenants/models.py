from django.conf import settings
from django.db import models
from django.db.models import Q


class Plan(models.Model):
    """What an operator grants a tenant on approval: its quotas (issue #7 adds price book and SLA policy)."""

    name = models.CharField(max_length=80, unique=True)
    tokens_per_minute = models.PositiveBigIntegerField(null=True, blank=True,
                                                       help_text="Token quota per minute; blank for no limit")
    gpus = models.PositiveIntegerField(null=True, blank=True,
                                       help_text="Whole-GPU equivalents the tenant may hold; blank for no limit")
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class TenantStatus(models.TextChoices):
    PENDING = "pending", "Pending approval"
    ACTIVE = "active", "Active"
    SUSPENDED = "suspended", "Suspended"
    REJECTED = "rejected", "Rejected"


class Tenant(models.Model):
    """A customer organization sharing the factory. Signs up itself (pending), is approved on a plan by an
    operator (active), and may later be suspended and reactivated."""

    name = models.CharField(max_length=120, unique=True)
    slug = models.SlugField(max_length=64, unique=True)
    status = models.CharField(max_length=16, choices=TenantStatus.choices, default=TenantStatus.PENDING)
    created_at = models.DateTimeField(auto_now_add=True)
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, null=True, blank=True, related_name="tenants")
    intended_models = models.TextField(blank=True, help_text="The models the tenant means to serve (sign-up)")
    expected_tokens_per_month = models.PositiveBigIntegerField(null=True, blank=True)
    requested_capacity = models.TextField(blank=True, help_text="The capacity asked for at sign-up")
    email_verified_at = models.DateTimeField(null=True, blank=True,
                                             help_text="When the signing-up admin verified their e-mail")
    status_reason = models.TextField(blank=True, help_text="Why it was last rejected or suspended")
    status_changed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def is_active(self) -> bool:
        return self.status == TenantStatus.ACTIVE


class MemberRole(models.TextChoices):
    ADMIN = "admin", "Admin"
    MEMBER = "member", "Member"


class Membership(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=MemberRole.choices, default=MemberRole.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "tenant"], name="membership_user_tenant_unique")]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} ({self.role})"

    @property
    def is_admin(self) -> bool:
        return self.role == MemberRole.ADMIN


class Invitation(models.Model):
    """A tenant admin invites someone by e-mail; the signed link in the mail lets them join with a role."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="invitations")
    email = models.EmailField()
    role = models.CharField(max_length=16, choices=MemberRole.choices, default=MemberRole.MEMBER)
    invited_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                   related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                    related_name="+")
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "email"],
                                    condition=Q(accepted_at__isnull=True, revoked_at__isnull=True),
                                    name="invitation_open_tenant_email_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.email} invited to {self.tenant} ({self.role})"

    @property
    def is_open(self) -> bool:
        return self.accepted_at is None and self.revoked_at is None


class ApiKey(models.Model):
    """Bearer key for the tenant JSON API: `tmk_<prefix>_<secret>`, stored as prefix + HMAC-SHA256 (portal.keys)."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=80)
    prefix = models.CharField(max_length=16, unique=True)
    digest = models.CharField(max_length=64)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                   related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, help_text="Written at most once a minute")
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["revoked_at", "-created_at"]

    def __str__(self) -> str:
        return f"{self.name} (tmk_{self.prefix}_…)"
