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
    path("sites/", include("portal.bringup.urls")),
    path("health/", include("portal.health.urls")),
    path("economics/", include("portal.economics.urls")),
    path("capacity/", include("portal.capacity.urls")),
    path("alerts/", include("portal.alerts.urls")),
    path("standards/", include("portal.standards.urls")),
    path("provisioning/", include("portal.provisioning.urls")),
    path("sla/", include("portal.sla.urls")),
    path("billing/", include("portal.billing.urls")),
    path("tenant/<slug:tenant_slug>/sla/", include("portal.sla.tenant_urls")),
    path("tenant/<slug:tenant_slug>/billing/", include("portal.billing.tenant_urls")),
    path("tenant/", include("portal.tenants.urls")),
    path("tenants/", include("portal.tenants.operator_urls")),
    path("signup/", include("portal.tenants.signup_urls")),
    path("audit/", include("portal.audit.urls")),
    path("api/v1/", api.urls),
    path("admin/", admin.site.urls),
]
