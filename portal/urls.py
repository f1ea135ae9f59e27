from django.contrib import admin
from django.urls import include, path

from portal import views
from portal.api import api

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("metrics", include("portal.telemetry.urls")),
    path("accounts/", include("portal.accounts.urls")),
    path("fleet/", include("portal.fleet.urls")),
    path("tenant/", include("portal.tenants.urls")),
    path("api/v1/", api.urls),
    path("admin/", admin.site.urls),
]
