"""Tenant-facing billing pages, mounted at tenant/<tenant_slug>/billing/: every view is tenant_required."""

from django.urls import path

from portal.billing import tenant_views

app_name = "tenant_billing"

urlpatterns = [
    path("", tenant_views.invoice_list, name="list"),
    path("draft/", tenant_views.draft_refresh, name="draft_refresh"),
    path("<int:invoice_id>/", tenant_views.invoice_detail, name="invoice"),
    path("<int:invoice_id>/csv/", tenant_views.invoice_csv, name="invoice_csv"),
]
