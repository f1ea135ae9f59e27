"""The one tenant-scoping path. Every tenant-facing view is wrapped in `tenant_required` (or
`tenant_admin_required`): it resolves the tenant from the URL's slug through the signed-in user's own membership
and answers 404 to anyone who is not a member, so another tenant's slug looks exactly like one that does not exist.
The view receives the membership; every selector it calls takes `membership.tenant`, never an id alone.
tests/test_isolation.py walks every URL of the `tenants` namespace to keep it that way."""

from collections.abc import Callable
from functools import wraps

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse

from portal.accounts.models import User
from portal.tenants.models import Membership

View = Callable[..., HttpResponse]


def resolve_membership(*, user: User, tenant_slug: str) -> Membership:
    """The user's membership of the tenant with this slug; Http404 when there is none."""
    membership = (Membership.objects.select_related("tenant", "tenant__plan")
                  .filter(user=user, tenant__slug=tenant_slug).first())
    if membership is None:
        raise Http404("No such organization")
    return membership


def _scoped(view: View, *, admin: bool) -> View:
    @login_required
    @wraps(view)
    def wrapper(request: HttpRequest, tenant_slug: str, *args, **kwargs) -> HttpResponse:
        membership = resolve_membership(user=request.user, tenant_slug=tenant_slug)
        if admin and not membership.is_admin:
            raise PermissionDenied("Organization admins only")
        return view(request, membership, *args, **kwargs)

    wrapper.access = "tenant_admin" if admin else "tenant"
    return wrapper


def tenant_required(view: View) -> View:
    """Members of the URL's tenant (either role) may read."""
    return _scoped(view, admin=False)


def tenant_admin_required(view: View) -> View:
    """Only the URL's tenant's admins may change it."""
    return _scoped(view, admin=True)
