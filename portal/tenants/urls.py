from django.urls import path

from portal.tenants import views

app_name = "tenants"

urlpatterns = [
    path("", views.home, name="home"),
]
