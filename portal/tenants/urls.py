"""The tenant portal: /tenant/<slug>/... Every route with a slug is tenant-scoped (portal/tenants/access.py);
tests/test_isolation.py fails for any route here it has no parameters for."""

from django.urls import path

from portal.tenants import views

app_name = "tenants"

urlpatterns = [
    path("", views.home, name="home"),
    path("<slug:tenant_slug>/", views.overview, name="overview"),
    path("<slug:tenant_slug>/usage/", views.usage, name="usage"),
    path("<slug:tenant_slug>/deployments/<int:deployment_id>/", views.deployment, name="deployment"),
    path("<slug:tenant_slug>/members/", views.members, name="members"),
    path("<slug:tenant_slug>/members/invite/", views.member_invite, name="member_invite"),
    path("<slug:tenant_slug>/members/<int:membership_id>/role/", views.member_role, name="member_role"),
    path("<slug:tenant_slug>/members/<int:membership_id>/remove/", views.member_remove, name="member_remove"),
    path("<slug:tenant_slug>/invitations/<int:invitation_id>/withdraw/", views.invitation_withdraw,
         name="invitation_withdraw"),
    path("<slug:tenant_slug>/api-keys/", views.api_keys, name="api_keys"),
    path("<slug:tenant_slug>/api-keys/<int:key_id>/revoke/", views.api_key_withdraw, name="api_key_revoke"),
    path("<slug:tenant_slug>/capacity/", views.capacity, name="capacity"),
    path("<slug:tenant_slug>/capacity/request/", views.capacity_request_new, name="capacity_request_new"),
    path("<slug:tenant_slug>/capacity/<int:request_id>/", views.capacity_request, name="capacity_request"),
    path("<slug:tenant_slug>/isolation/", views.isolation, name="isolation"),
]
