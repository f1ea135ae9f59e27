from django.urls import path

from portal.economics import views

app_name = "economics"

urlpatterns = [
    path("", views.fleet_economics, name="fleet"),
    path("what-if/", views.what_if, name="what_if"),
    path("pnl/", views.pnl, name="pnl"),
]
