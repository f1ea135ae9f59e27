from django import forms
from django.conf import settings
from django.contrib.auth import forms as auth_forms
from django.core.mail import send_mail
from django.template.loader import render_to_string
from django.urls import reverse

from portal.accounts.models import User
from portal.accounts.throttle import login_failed, login_lock, login_succeeded
from portal.ratelimit import client_address, rate_limit_hit

RESET_MAILS_PER_HOUR = 5


class LoginForm(auth_forms.AuthenticationForm):
    """Django's log-in form with throttling per account and per address (portal/accounts/throttle.py)."""

    def __init__(self, request=None, *args, **kwargs) -> None:
        super().__init__(request, *args, **kwargs)
        self.fields["username"].label = "E-mail or username"

    def clean(self) -> dict:
        username = self.cleaned_data.get("username") or ""
        address = client_address(self.request) if self.request else "unknown"
        lock = login_lock(username=username, address=address)
        if lock is not None:
            raise forms.ValidationError(lock.message, code="throttled")
        try:
            cleaned = super().clean()
        except forms.ValidationError as exc:
            if exc.code == "invalid_login":
                lock = login_failed(username=username, address=address)
                if lock is not None:
                    raise forms.ValidationError(lock.message, code="throttled") from None
            raise
        login_succeeded(username=username)
        return cleaned


class PasswordResetForm(auth_forms.PasswordResetForm):
    """Answers the same whether or not an account uses the address (the page never tells); the mail says what
    happened. Mails to one address, and from one client address, are limited per hour, so the form cannot be used
    to flood a mailbox."""

    def save(self, *, request=None, **kwargs) -> None:
        email = self.cleaned_data["email"]
        address = client_address(request) if request else "unknown"
        if any(rate_limit_hit(scope=f"password-reset-{scope}", ident=ident, limit=RESET_MAILS_PER_HOUR,
                              window_s=3600) for scope, ident in (("to", email.lower()), ("from", address))):
            return
        if any(True for _ in self.get_users(email)):
            super().save(request=request, **kwargs)
            return
        inactive = User.objects.filter(email__iexact=email, is_active=False).exists()
        base = request.build_absolute_uri("/").rstrip("/") if request else ""
        body = render_to_string("accounts/password_reset_unknown.txt", {
            "email": email, "inactive": inactive, "signup": base + reverse("signup:signup"),
            "resend": base + reverse("signup:resend"),
        })
        send_mail("Password reset on Tokenmill", body, settings.DEFAULT_FROM_EMAIL, [email])
