from django.urls import path

from portal.standards import views

app_name = "standards"

urlpatterns = [
    path("", views.baseline_page, name="baseline"),
    path("baseline/", views.baseline_save, name="baseline_save"),
    path("drift/", views.drift_page, name="drift"),
]
