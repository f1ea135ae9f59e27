from django.urls import path

from portal.fleet import views

app_name = "fleet"

urlpatterns = [
    path("", views.overview, name="overview"),
    path("nodes/<int:node_id>/", views.node_page, name="node"),
    path("enroll/", views.enroll, name="enroll"),
    path("batches/retry/", views.retry_set_aside, name="retry_set_aside"),
]
