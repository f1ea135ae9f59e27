from django.urls import path

from portal.capacity import views

app_name = "capacity"

urlpatterns = [
    path("", views.overview, name="overview"),
    path("allocations/new/", views.allocation_new, name="allocation_new"),
    path("allocations/<int:allocation_id>/release/", views.allocation_release, name="allocation_release"),
    path("allocations/<int:allocation_id>/move/", views.allocation_replace, name="allocation_move"),
    path("requests/<int:request_id>/", views.request_detail, name="request"),
    path("requests/<int:request_id>/fulfil/", views.request_fulfil, name="request_fulfil"),
    path("requests/<int:request_id>/decline/", views.request_decline, name="request_decline"),
    path("deployments/", views.deployments, name="deployments"),
    path("deployments/<int:deployment_id>/end/", views.deployment_stop, name="deployment_end"),
]
