"""Public pages: self-service sign-up, e-mail verification, and accepting an invitation (signed links)."""

import math

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods

from portal.accounts.access import public
from portal.ratelimit import client_address, rate_limit_hit
from portal.tenants.forms import AcceptInvitationForm, ResendVerificationForm, SignupForm
from portal.tenants.selectors import account_exists
from portal.tenants.services import (
    TenantError,
    invitation_accept,
    invitation_accept_new_user,
    invitation_for_token,
    signup_create,
    signup_verify,
    verification_resend,
)

RATE_WINDOW_S = 3600


def _base_url(request: HttpRequest) -> str:
    return request.build_absolute_uri("/")


def _rate_limited(request: HttpRequest, template: str, context: dict) -> HttpResponse | None:
    wait = rate_limit_hit(scope="signup", ident=client_address(request), limit=settings.SIGNUP_RATE_LIMIT_PER_HOUR,
                          window_s=RATE_WINDOW_S)
    if wait is None:
        return None
    minutes = math.ceil(wait / 60)
    context = {**context, "rate_limited": f"Too many sign-ups from your address, try again in {minutes} minute"
                                          f"{'' if minutes == 1 else 's'}."}
    response = render(request, template, context, status=429)
    response["Retry-After"] = str(wait)
    return response


@public
@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    form = SignupForm(request.POST or None)
    if request.method == "POST":
        limited = _rate_limited(request, "tenants/signup.html", {"form": form})
        if limited:
            return limited
        if form.is_valid():
            data = form.cleaned_data
            try:
                signup_create(
                    organization=data["organization"], admin_name=data["admin_name"], email=data["email"],
                    password=data["password"], intended_models=data["intended_models"],
                    expected_tokens_per_month=data["expected_tokens_per_month"],
                    requested_capacity=data["requested_capacity"], base_url=_base_url(request),
                )
            except TenantError as exc:
                form.add_error(exc.field, str(exc))
            else:
                request.session["signup_email"] = data["email"]
                return redirect("signup:sent")
        return render(request, "tenants/signup.html", {"form": form}, status=400)
    return render(request, "tenants/signup.html", {"form": form})


@public
def sent(request: HttpRequest) -> HttpResponse:
    return render(request, "tenants/signup_sent.html", {"email": request.session.get("signup_email")})


@public
@require_http_methods(["GET", "POST"])
def verify(request: HttpRequest, token: str) -> HttpResponse:
    """GET asks to confirm (mail scanners follow links); POST verifies."""
    if request.method == "GET":
        return render(request, "tenants/verify.html", {"token": token})
    try:
        user = signup_verify(token=token)
    except TenantError as exc:
        return render(request, "tenants/verify.html", {"error": str(exc), "resend": ResendVerificationForm()},
                      status=400)
    messages.success(request, f"Your e-mail address is verified: log in as {user.email}.")
    return redirect(f"{reverse('accounts:login')}?next={reverse('tenants:home')}")


@public
@require_http_methods(["GET", "POST"])
def resend(request: HttpRequest) -> HttpResponse:
    form = ResendVerificationForm(request.POST or None)
    if request.method == "POST":
        limited = _rate_limited(request, "tenants/verify.html", {"resend": form})
        if limited:
            return limited
        if form.is_valid():
            verification_resend(email=form.cleaned_data["email"], base_url=_base_url(request))
            request.session["signup_email"] = form.cleaned_data["email"]
            return redirect("signup:sent")
        return render(request, "tenants/verify.html", {"resend": form}, status=400)
    return render(request, "tenants/verify.html", {"resend": form})


@public
@require_http_methods(["GET", "POST"])
def invitation(request: HttpRequest, token: str) -> HttpResponse:
    """Accept an invitation: as the signed-in user with the invited address, or by creating that account."""
    try:
        invite = invitation_for_token(token=token)
    except TenantError as exc:
        return render(request, "tenants/invitation.html", {"error": str(exc)}, status=400)
    user = request.user if request.user.is_authenticated else None
    has_account = user is not None or account_exists(email=invite.email)
    form = None if has_account else AcceptInvitationForm(request.POST or None, email=invite.email)
    context = {"invitation": invite, "form": form, "has_account": has_account,
               "login": f"{reverse('accounts:login')}?next={request.path}"}
    if request.method == "GET":
        return render(request, "tenants/invitation.html", context)
    try:
        if user is not None:
            membership = invitation_accept(invitation=invite, user=user)
        elif form is not None and form.is_valid():
            membership = invitation_accept_new_user(invitation=invite, name=form.cleaned_data["name"],
                                                    password=form.cleaned_data["password"])
            login(request, membership.user, backend="django.contrib.auth.backends.ModelBackend")
        else:
            return render(request, "tenants/invitation.html", context, status=400)
    except TenantError as exc:
        return render(request, "tenants/invitation.html", {**context, "error": str(exc)}, status=400)
    messages.success(request, f"You joined {membership.tenant.name} as {membership.get_role_display().lower()}.")
    return redirect("tenants:overview", tenant_slug=membership.tenant.slug)
