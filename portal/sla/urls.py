from django.urls import path

from portal.sla import views

app_name = "sla"

urlpatterns = [
    path("", views.overview, name="overview"),
    path("tenants/<slug:slug>/", views.operator_tenant, name="tenant"),
    path("policies/", views.policy_list, name="policies"),
    path("policies/new/", views.policy_create, name="policy_create"),
    path("policies/<int:policy_id>/", views.policy_detail, name="policy"),
    path("policies/<int:policy_id>/objectives/", views.objective_set, name="objective_set"),
    path("policies/<int:policy_id>/objectives/remove/", views.objective_remove, name="objective_remove"),
]
