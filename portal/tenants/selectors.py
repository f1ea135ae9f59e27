from django.db.models import QuerySet

from portal.accounts.models import User
from portal.tenants.models import Membership


def memberships_for_user(*, user: User) -> QuerySet[Membership]:
    return Membership.objects.filter(user=user).select_related("tenant").order_by("tenant__name")
