from django.urls import path

from portal.standards import views

app_name = "standards"

urlpatterns = [
    path("", views.stack_page, name="stack"),
    path("stack/", views.stack_save, name="stack_save"),
    path("policy/", views.policy_save, name="policy_save"),
    path("drift/", views.drift_page, name="drift"),
]
