"""Signed, expiring links: e-mail verification and invitations (django.core.signing with the SECRET_KEY).
Loading raises signing.SignatureExpired or signing.BadSignature."""

from datetime import timedelta

from django.core import signing

from portal.accounts.models import User
from portal.tenants.models import Invitation

VERIFY_SALT = "portal.tenants.verify-email"
INVITE_SALT = "portal.tenants.invitation"
VERIFY_MAX_AGE = timedelta(days=3)
INVITE_MAX_AGE = timedelta(days=7)


def verification_token(*, user: User) -> str:
    return signing.dumps({"user": user.pk, "email": user.email}, salt=VERIFY_SALT)


def verification_data(token: str) -> dict:
    return signing.loads(token, salt=VERIFY_SALT, max_age=VERIFY_MAX_AGE)


def invitation_token(*, invitation: Invitation) -> str:
    return signing.dumps({"invitation": invitation.pk}, salt=INVITE_SALT)


def invitation_data(token: str) -> dict:
    return signing.loads(token, salt=INVITE_SALT, max_age=INVITE_MAX_AGE)
