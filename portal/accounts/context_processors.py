from django.http import HttpRequest

from portal.tenants.selectors import memberships_for_user


def roles(request: HttpRequest) -> dict:
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    return {"user_memberships": memberships_for_user(user=user)}
