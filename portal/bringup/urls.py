from django.urls import path

from portal.bringup import views

app_name = "bringup"

urlpatterns = [
    path("<slug:slug>/", views.site_page, name="site"),
    path("<slug:slug>/plan/", views.plan_save, name="plan_save"),
    path("<slug:slug>/plan/lines/", views.line_save, name="line_save"),
    path("<slug:slug>/plan/nodes/", views.nodes_name, name="nodes_name"),
]
