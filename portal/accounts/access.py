"""Who may see what. Every view declares one of these; tests/test_access.py walks every URL to check."""

from collections.abc import Callable
from functools import wraps

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse

View = Callable[..., HttpResponse]


def operator_required(view: View) -> View:
    """Operators of either role (viewer or admin) may read."""

    @login_required
    @wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if not request.user.is_operator:
            raise PermissionDenied("Operators only")
        return view(request, *args, **kwargs)

    wrapper.access = "operator"
    return wrapper


def operator_admin_required(view: View) -> View:
    """Only operator admins may change the factory."""

    @login_required
    @wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if not request.user.is_operator_admin:
            raise PermissionDenied("Operator admins only")
        return view(request, *args, **kwargs)

    wrapper.access = "operator_admin"
    return wrapper


def public(view: View) -> View:
    view.access = "public"
    return view


def authenticated(view: View) -> View:
    wrapped = login_required(view)
    wrapped.access = "authenticated"
    return wrapped
