from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from portal.accounts.access import authenticated
from portal.tenants.selectors import memberships_for_user


@authenticated
def home(request: HttpRequest) -> HttpResponse:
    return render(request, "tenants/home.html", {"memberships": memberships_for_user(user=request.user)})
