from django.urls import path

from portal.telemetry import views

app_name = "telemetry"

urlpatterns = [
    path("", views.metrics, name="metrics"),
]
