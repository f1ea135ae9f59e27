"""Writes for tenants: sign-up and e-mail verification, onboarding by operators (approve, reject, suspend,
reactivate), plans, members and invitations, API keys and capacity requests. Every operator and tenant-admin action
is audit-recorded inside its transaction; mail goes out through a Celery task once the transaction commits."""

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial

from django.contrib.auth.password_validation import validate_password
from django.core import signing
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.text import slugify

from portal.accounts.models import User
from portal.audit.services import audit_record
from portal.capacity.models import CapacityRequest
from portal.capacity.services import CapacityError, capacity_request_create, quota_set
from portal.keys import issue_key, key_matches, key_prefix
from portal.tenants.models import ApiKey, Invitation, MemberRole, Membership, Plan, Tenant, TenantStatus
from portal.tenants.tasks import tenant_mail_send
from portal.tenants.tokens import invitation_data, verification_data

API_KEY_KIND = "tmk"
LAST_USED_RESOLUTION = timedelta(minutes=1)


class TenantError(Exception):
    """A tenant change that cannot be made. `field` names the form field at fault, if any; the message is safe to
    show."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _mail(kind: str, object_id: int, base_url: str) -> None:
    transaction.on_commit(partial(tenant_mail_send.delay, kind=kind, object_id=object_id, base_url=base_url),
                          robust=True)


def _tenant_state(tenant: Tenant) -> dict:
    return {"status": tenant.status, "plan": tenant.plan.name if tenant.plan_id else None,
            "reason": tenant.status_reason}


# Sign-up and verification ----------------------------------------------------------------------------------------


def organization_slug(name: str) -> str:
    return slugify(name)[:64].strip("-")


def signup_organization_problem(*, organization: str) -> str | None:
    """What blocks a sign-up with this organization name, if anything. (Whether an e-mail address has an account
    is never said on a page: signup_create mails its owner instead.)"""
    slug = organization_slug(organization)
    if not slug:
        return "The organization name needs letters or digits."
    if Tenant.objects.filter(name__iexact=organization.strip()).exists() or Tenant.objects.filter(slug=slug).exists():
        return "An organization with this name is already registered."
    return None


def _existing_account(email: str) -> User | None:
    return User.objects.filter(Q(email__iexact=email) | Q(username__iexact=email)).order_by("pk").first()


def signup_password_problems(*, password: str, email: str, admin_name: str) -> list[str]:
    first, _, last = admin_name.strip().partition(" ")
    try:
        validate_password(password, user=User(username=email, email=email, first_name=first, last_name=last))
    except ValidationError as exc:
        return list(exc.messages)
    return []


def signup_create(
    *, organization: str, admin_name: str, email: str, password: str, intended_models: str,
    expected_tokens_per_month: int | None, requested_capacity: str, base_url: str,
) -> Tenant | None:
    """Create a pending tenant, its admin (inactive until the e-mail is verified) and their membership, all or none,
    and mail the verification link. When the address already has an account, nothing is created and its owner is
    mailed instead (None): the caller answers both cases alike, so the page never tells who is a customer."""
    email = email.strip().lower()
    organization = organization.strip()
    problem = signup_organization_problem(organization=organization)
    if problem:
        raise TenantError(problem, field="organization")
    if (existing := _existing_account(email)) is not None:
        _mail("signup_existing", existing.pk, base_url)
        return None
    first, _, last = admin_name.strip().partition(" ")
    try:
        with transaction.atomic():
            tenant = Tenant.objects.create(
                name=organization, slug=organization_slug(organization), status=TenantStatus.PENDING,
                intended_models=intended_models.strip(), expected_tokens_per_month=expected_tokens_per_month,
                requested_capacity=requested_capacity.strip(),
            )
            user = User.objects.create_user(username=email, email=email, password=password, first_name=first[:150],
                                            last_name=last[:150], is_active=False)
            Membership.objects.create(user=user, tenant=tenant, role=MemberRole.ADMIN)
            audit_record(actor=user, action="tenant.signup", target=tenant, tenant=tenant, after={
                **_tenant_state(tenant), "admin": email, "intended_models": tenant.intended_models,
                "expected_tokens_per_month": expected_tokens_per_month,
                "requested_capacity": tenant.requested_capacity,
            })
            _mail("verify", user.pk, base_url)
    except IntegrityError:
        # Someone registered the same name or e-mail between the check and the insert.
        if (existing := _existing_account(email)) is not None:
            _mail("signup_existing", existing.pk, base_url)
            return None
        problem = signup_organization_problem(organization=organization) or "The sign-up clashed with another; retry."
        raise TenantError(problem, field="organization") from None
    return tenant


def signup_verify(*, token: str, now: datetime | None = None) -> User:
    """Activate the login of the admin who signed up; the tenant stays pending until an operator approves it.
    A link already used answers with the (active) user again."""
    now = now or timezone.now()
    try:
        data = verification_data(token)
    except signing.SignatureExpired:
        raise TenantError("This verification link has expired: ask for a new one below.") from None
    except signing.BadSignature:
        raise TenantError("This verification link is not valid.") from None
    with transaction.atomic():
        user = User.objects.select_for_update().filter(pk=data.get("user"), email=data.get("email")).first()
        if user is None:
            raise TenantError("This verification link is not valid.")
        unverified = Tenant.objects.filter(memberships__user=user, memberships__role=MemberRole.ADMIN,
                                           email_verified_at__isnull=True)
        if user.is_active and not unverified.exists():
            return user
        if not unverified.exists():
            raise TenantError("This verification link is not valid.")
        for tenant in unverified:
            audit_record(actor=user, action="tenant.verify_email", target=tenant, tenant=tenant,
                         before={"email_verified_at": None}, after={"email_verified_at": now})
        unverified.update(email_verified_at=now)
        user.is_active = True
        user.save(update_fields=["is_active"])
    return user


def verification_resend(*, email: str, base_url: str) -> bool:
    """Mail a fresh link to an admin whose sign-up is still unverified. The caller answers the same either way."""
    user = User.objects.filter(email__iexact=email.strip(), is_active=False).first()
    if user is None or not Tenant.objects.filter(memberships__user=user, email_verified_at__isnull=True).exists():
        return False
    _mail("verify", user.pk, base_url)
    return True


# Onboarding by operators -----------------------------------------------------------------------------------------


def _set_status(*, tenant: Tenant, by: User, action: str, allowed_from: tuple[str, ...], status: str,
                reason: str = "", plan: Plan | None = None, base_url: str) -> Tenant:
    with transaction.atomic():
        tenant = Tenant.objects.select_for_update(of=("self",)).select_related("plan").get(pk=tenant.pk)
        if tenant.status not in allowed_from:
            raise TenantError(f"{tenant} is {tenant.get_status_display().lower()}")
        before = _tenant_state(tenant)
        tenant.status, tenant.status_reason, tenant.status_changed_at = status, reason.strip(), timezone.now()
        fields = ["status", "status_reason", "status_changed_at"]
        if plan is not None:
            tenant.plan = plan
            fields.append("plan")
        tenant.save(update_fields=fields)
        after = _tenant_state(tenant)
        if plan is not None:
            quota = quota_set(tenant=tenant, tokens_per_minute=plan.tokens_per_minute, gpus=plan.gpus)
            after.update(quota_tokens_per_minute=quota.tokens_per_minute, quota_gpus=quota.gpus)
        audit_record(actor=by, action=action, target=tenant, tenant=tenant, before=before, after=after)
        _mail(action.removeprefix("tenant."), tenant.pk, base_url)
    return tenant


def tenant_approve(*, tenant: Tenant, plan: Plan, by: User, base_url: str) -> Tenant:
    """Activate a pending sign-up on a plan; its quota is set from the plan."""
    if tenant.email_verified_at is None:
        raise TenantError("The admin has not verified their e-mail address yet.")
    return _set_status(tenant=tenant, by=by, action="tenant.approve", allowed_from=(TenantStatus.PENDING,),
                       status=TenantStatus.ACTIVE, plan=plan, base_url=base_url)


def tenant_reject(*, tenant: Tenant, reason: str, by: User, base_url: str) -> Tenant:
    return _set_status(tenant=tenant, by=by, action="tenant.reject", allowed_from=(TenantStatus.PENDING,),
                       status=TenantStatus.REJECTED, reason=reason, base_url=base_url)


def tenant_suspend(*, tenant: Tenant, reason: str, by: User, base_url: str) -> Tenant:
    return _set_status(tenant=tenant, by=by, action="tenant.suspend", allowed_from=(TenantStatus.ACTIVE,),
                       status=TenantStatus.SUSPENDED, reason=reason, base_url=base_url)


def tenant_reactivate(*, tenant: Tenant, by: User, base_url: str) -> Tenant:
    return _set_status(tenant=tenant, by=by, action="tenant.reactivate", allowed_from=(TenantStatus.SUSPENDED,),
                       status=TenantStatus.ACTIVE, base_url=base_url)


_PLAN_FIELDS = ["name", "tokens_per_minute", "gpus", "description"]


def plan_save(*, plan: Plan, by: User) -> Plan:
    """Create or update a plan (a ModelForm's unsaved instance). Tenants already on it keep their quotas until an
    operator sets them again."""
    with transaction.atomic():
        before = None
        if plan.pk:
            old = Plan.objects.select_for_update().get(pk=plan.pk)
            before = {f: getattr(old, f) for f in _PLAN_FIELDS}
        action = "plan.update" if plan.pk else "plan.create"
        plan.save()
        audit_record(actor=by, action=action, target=plan, before=before,
                     after={f: getattr(plan, f) for f in _PLAN_FIELDS})
    return plan


# Members and invitations -----------------------------------------------------------------------------------------


def invitation_create(*, tenant: Tenant, email: str, role: str, by: User, base_url: str) -> Invitation:
    email = email.strip().lower()
    if Membership.objects.filter(tenant=tenant, user__email__iexact=email).exists():
        raise TenantError("This person is already a member.", field="email")
    try:
        with transaction.atomic():
            invitation = Invitation.objects.create(tenant=tenant, email=email, role=role, invited_by=by)
            audit_record(actor=by, action="invitation.create", target=invitation, tenant=tenant,
                         after={"email": email, "role": role})
            _mail("invitation", invitation.pk, base_url)
    except IntegrityError:
        raise TenantError("This address already has an open invitation.", field="email") from None
    return invitation


def invitation_revoke(*, invitation: Invitation, by: User) -> Invitation:
    with transaction.atomic():
        invitation = Invitation.objects.select_for_update().get(pk=invitation.pk)
        if not invitation.is_open:
            raise TenantError("The invitation is no longer open.")
        invitation.revoked_at = timezone.now()
        invitation.save(update_fields=["revoked_at"])
        audit_record(actor=by, action="invitation.revoke", target=invitation, tenant=invitation.tenant,
                     before={"email": invitation.email, "role": invitation.role, "open": True}, after={"open": False})
    return invitation


def invitation_for_token(*, token: str) -> Invitation:
    """The open invitation a link carries; TenantError when the link is forged, expired or used."""
    try:
        data = invitation_data(token)
    except signing.SignatureExpired:
        raise TenantError("This invitation has expired: ask for a new one.") from None
    except signing.BadSignature:
        raise TenantError("This invitation link is not valid.") from None
    invitation = Invitation.objects.select_related("tenant").filter(pk=data.get("invitation")).first()
    if invitation is None or invitation.revoked_at is not None:
        raise TenantError("This invitation has been withdrawn.")
    if invitation.accepted_at is not None:
        raise TenantError("This invitation has already been accepted.")
    if invitation.tenant.status == TenantStatus.REJECTED:
        raise TenantError("This invitation is no longer valid.")
    return invitation


def _accept(invitation: Invitation, user: User) -> Membership:
    invitation = Invitation.objects.select_for_update().get(pk=invitation.pk)
    if not invitation.is_open:
        raise TenantError("This invitation is no longer open.")
    membership, created = Membership.objects.get_or_create(user=user, tenant=invitation.tenant,
                                                           defaults={"role": invitation.role})
    invitation.accepted_at, invitation.accepted_by = timezone.now(), user
    invitation.save(update_fields=["accepted_at", "accepted_by"])
    audit_record(actor=user, action="invitation.accept", target=invitation, tenant=invitation.tenant,
                 after={"user": user.get_username(), "role": membership.role, "new_member": created})
    return membership


def invitation_accept(*, invitation: Invitation, user: User) -> Membership:
    """An existing user, signed in as the invited address, joins the tenant."""
    if user.email.lower() != invitation.email.lower():
        raise TenantError(f"This invitation is for {invitation.email}: sign in as that address to accept it.")
    with transaction.atomic():
        return _accept(invitation, user)


def invitation_accept_new_user(*, invitation: Invitation, name: str, password: str) -> Membership:
    """Create the invited person's account (the link proved the address) and their membership."""
    if User.objects.filter(email__iexact=invitation.email).exists():
        raise TenantError("An account with this address exists: sign in to accept.")
    first, _, last = name.strip().partition(" ")
    try:
        with transaction.atomic():
            user = User.objects.create_user(username=invitation.email, email=invitation.email, password=password,
                                            first_name=first[:150], last_name=last[:150])
            return _accept(invitation, user)
    except IntegrityError:
        raise TenantError("An account with this address exists: sign in to accept.") from None


def _admins_left(tenant: Tenant, without: Membership) -> int:
    Tenant.objects.select_for_update().filter(pk=tenant.pk).first()  # serialise admin changes per tenant
    return Membership.objects.filter(tenant=tenant, role=MemberRole.ADMIN).exclude(pk=without.pk).count()


def membership_set_role(*, membership: Membership, role: str, by: User) -> Membership:
    with transaction.atomic():
        membership = Membership.objects.select_for_update().select_related("user", "tenant").get(pk=membership.pk)
        if membership.role == role:
            return membership
        if membership.role == MemberRole.ADMIN and _admins_left(membership.tenant, membership) == 0:
            raise TenantError("The last admin cannot be demoted: make someone else admin first.", field="role")
        before = {"user": membership.user.get_username(), "role": membership.role}
        membership.role = role
        membership.save(update_fields=["role"])
        audit_record(actor=by, action="membership.role", target=membership, tenant=membership.tenant,
                     before=before, after={"user": membership.user.get_username(), "role": role})
    return membership


def membership_remove(*, membership: Membership, by: User) -> None:
    with transaction.atomic():
        membership = Membership.objects.select_for_update().select_related("user", "tenant").get(pk=membership.pk)
        if membership.role == MemberRole.ADMIN and _admins_left(membership.tenant, membership) == 0:
            raise TenantError("The last admin cannot be removed: make someone else admin first.")
        audit_record(actor=by, action="membership.remove", target=membership, tenant=membership.tenant,
                     before={"user": membership.user.get_username(), "role": membership.role})
        membership.delete()


# API keys ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedApiKey:
    key: ApiKey
    value: str


def api_key_create(*, tenant: Tenant, name: str, by: User) -> IssuedApiKey:
    """A new key; its value is returned once and only its prefix and HMAC are stored."""
    if not tenant.is_active:
        raise TenantError(f"{tenant} is {tenant.get_status_display().lower()}: no API keys until it is active.")
    issued = issue_key(kind=API_KEY_KIND)
    with transaction.atomic():
        key = ApiKey.objects.create(tenant=tenant, name=name.strip(), prefix=issued.prefix, digest=issued.digest,
                                    created_by=by)
        audit_record(actor=by, action="apikey.create", target=key, tenant=tenant,
                     after={"name": key.name, "prefix": key.prefix})
    return IssuedApiKey(key=key, value=issued.value)


def api_key_revoke(*, key: ApiKey, by: User) -> ApiKey:
    with transaction.atomic():
        key = ApiKey.objects.select_for_update().select_related("tenant").get(pk=key.pk)
        if key.revoked_at is not None:
            raise TenantError("The key is already revoked.")
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
        audit_record(actor=by, action="apikey.revoke", target=key, tenant=key.tenant,
                     before={"name": key.name, "prefix": key.prefix, "revoked": False}, after={"revoked": True})
    return key


_NO_DIGEST = "0" * 64


def api_key_authenticate(*, value: str, now: datetime | None = None) -> ApiKey | None:
    """The live key matching a presented bearer value, of an active tenant; None otherwise. Marks it used (at most
    one write a minute)."""
    now = now or timezone.now()
    prefix = key_prefix(value, kind=API_KEY_KIND)
    key = (ApiKey.objects.select_related("tenant").filter(prefix=prefix, revoked_at__isnull=True).first()
           if prefix else None)
    matches = key_matches(value, key.digest if key else _NO_DIGEST)  # hash even when no row: constant time
    if key is None or not matches:
        return None
    if not key.tenant.is_active:
        return None
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return key


# Capacity requests ------------------------------------------------------------------------------------------------


def tenant_capacity_request_submit(
    *, tenant: Tenant, by: User, model_name: str, gpu_type: str, count: int, mig_profile: str, starts_at: datetime,
    note: str,
) -> CapacityRequest:
    if not tenant.is_active:
        raise TenantError(f"{tenant} is {tenant.get_status_display().lower()}: capacity can be requested once "
                          "it is active.")
    with transaction.atomic():
        try:
            request = capacity_request_create(tenant=tenant, by=by, model_name=model_name, gpu_type=gpu_type,
                                              count=count, mig_profile=mig_profile, starts_at=starts_at, note=note)
        except CapacityError as exc:
            raise TenantError(str(exc)) from None
        audit_record(actor=by, action="capacity_request.create", target=request, tenant=tenant, after={
            "model_name": model_name, "gpu_type": gpu_type, "count": count, "mig_profile": mig_profile,
            "starts_at": starts_at, "note": note,
        })
    return request
