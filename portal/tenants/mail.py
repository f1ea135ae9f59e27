"""The tenant mails: e-mail verification, invitations, and each onboarding decision (to the tenant's admins)."""

from django.conf import settings
from django.core.mail import send_mail
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone

from portal.accounts.models import User
from portal.health.models import TenantNotice
from portal.tenants.models import Invitation, MemberRole, Tenant
from portal.tenants.tokens import invitation_token, verification_token

STATUS_SUBJECTS = {
    "approve": "{tenant} is approved on Tokenmill",
    "reject": "Your Tokenmill sign-up for {tenant}",
    "suspend": "{tenant} is suspended on Tokenmill",
    "reactivate": "{tenant} is active again on Tokenmill",
}
KINDS = ("verify", "signup_existing", "invitation", "notice", *STATUS_SUBJECTS)


def _absolute(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + path


def _send(subject: str, template: str, context: dict, recipients: list[str]) -> int:
    if not recipients:
        return 0
    body = render_to_string(f"tenants/emails/{template}.txt", context)
    return send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, recipients)


def mail_verification(*, user: User, base_url: str) -> int:
    link = _absolute(base_url, reverse("signup:verify", args=[verification_token(user=user)]))
    tenant = Tenant.objects.filter(memberships__user=user, memberships__role=MemberRole.ADMIN).first()
    return _send("Verify your e-mail address for Tokenmill", "verify",
                 {"user": user, "tenant": tenant, "link": link}, [user.email])


def mail_signup_existing(*, user: User, base_url: str) -> int:
    """Someone signed up with an address that already has an account: tell its owner, not the page."""
    return _send("Your Tokenmill account", "signup_existing", {
        "user": user, "login": _absolute(base_url, reverse("accounts:login")),
        "reset": _absolute(base_url, reverse("accounts:password_reset")),
    }, [user.email])


def mail_invitation(*, invitation: Invitation, base_url: str) -> int:
    link = _absolute(base_url, reverse("signup:invitation", args=[invitation_token(invitation=invitation)]))
    return _send(f"You are invited to {invitation.tenant} on Tokenmill", "invitation",
                 {"invitation": invitation, "link": link}, [invitation.email])


def mail_status(*, tenant: Tenant, kind: str, base_url: str) -> int:
    admins = User.objects.filter(memberships__tenant=tenant, memberships__role=MemberRole.ADMIN).order_by("pk")
    context = {"tenant": tenant, "login": _absolute(base_url, reverse("accounts:login")),
               "portal": _absolute(base_url, reverse("tenants:overview", args=[tenant.slug]))}
    return _send(STATUS_SUBJECTS[kind].format(tenant=tenant), kind, context, [u.email for u in admins])


def mail_notice(*, notice: TenantNotice, base_url: str) -> int:
    """A health incident on a unit the tenant holds, to its admins; the notice is marked mailed."""
    tenant = notice.tenant
    admins = User.objects.filter(memberships__tenant=tenant, memberships__role=MemberRole.ADMIN).order_by("pk")
    sent = _send(f"{notice.title} ({tenant})", "notice", {
        "notice": notice, "tenant": tenant,
        "portal": _absolute(base_url, reverse("tenants:overview", args=[tenant.slug])),
    }, [u.email for u in admins])
    TenantNotice.objects.filter(pk=notice.pk).update(mailed_at=timezone.now())
    return sent


def mail_send(*, kind: str, object_id: int, base_url: str) -> int:
    """Send one tenant mail; the number of messages sent (0 when its object is gone)."""
    if kind == "verify":
        user = User.objects.filter(pk=object_id).first()
        return mail_verification(user=user, base_url=base_url) if user else 0
    if kind == "signup_existing":
        user = User.objects.filter(pk=object_id).first()
        return mail_signup_existing(user=user, base_url=base_url) if user else 0
    if kind == "invitation":
        invitation = Invitation.objects.select_related("tenant", "invited_by").filter(pk=object_id).first()
        return mail_invitation(invitation=invitation, base_url=base_url) if invitation and invitation.is_open else 0
    if kind == "notice":
        notice = TenantNotice.objects.select_related("tenant", "incident").filter(pk=object_id).first()
        return mail_notice(notice=notice, base_url=base_url) if notice and notice.mailed_at is None else 0
    if kind in STATUS_SUBJECTS:
        tenant = Tenant.objects.select_related("plan").filter(pk=object_id).first()
        return mail_status(tenant=tenant, kind=kind, base_url=base_url) if tenant else 0
    raise ValueError(f"unknown tenant mail {kind!r}")
