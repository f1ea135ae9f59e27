from django.urls import path

from portal.health import views

app_name = "health"

urlpatterns = [
    path("", views.overview, name="overview"),
    path("rules/<int:xid>/", views.rule_save, name="rule_save"),
    path("cordons/<int:cordon_id>/override/", views.cordon_override, name="cordon_override"),
    path("nodes/<int:node_id>/cordon/", views.cordon_unit, name="cordon_unit"),
]
