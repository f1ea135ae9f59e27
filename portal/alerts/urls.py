from django.urls import path

from portal.alerts import views

app_name = "alerts"

urlpatterns = [
    path("", views.alerts_page, name="list"),
    path("<int:alert_id>/acknowledge/", views.acknowledge, name="acknowledge"),
    path("<int:alert_id>/resolve/", views.resolve, name="resolve"),
    path("channels/", views.channels, name="channels"),
    path("channels/<int:channel_id>/enable/", views.channel_enable, name="channel_enable"),
    path("channels/<int:channel_id>/delete/", views.channel_delete, name="channel_delete"),
]
