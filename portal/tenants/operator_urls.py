from django.urls import path

from portal.tenants import operator_views

app_name = "onboarding"

urlpatterns = [
    path("", operator_views.tenant_list, name="list"),
    path("<int:tenant_id>/", operator_views.tenant_detail, name="detail"),
    path("<int:tenant_id>/isolation/", operator_views.tenant_isolation, name="isolation"),
    path("<int:tenant_id>/approve/", operator_views.approve, name="approve"),
    path("<int:tenant_id>/reject/", operator_views.reject, name="reject"),
    path("<int:tenant_id>/suspend/", operator_views.suspend, name="suspend"),
    path("<int:tenant_id>/reactivate/", operator_views.reactivate, name="reactivate"),
    path("plans/", operator_views.plan_list, name="plans"),
    path("plans/new/", operator_views.plan_edit, name="plan_new"),
    path("plans/<int:plan_id>/", operator_views.plan_edit, name="plan_edit"),
]
