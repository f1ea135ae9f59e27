"""Tenant-facing SLA pages, mounted at tenant/<tenant_slug>/sla/: every view is tenant_required."""

from django.urls import path

from portal.sla import views

app_name = "tenant_sla"

urlpatterns = [
    path("", views.tenant_page, name="compliance"),
]
