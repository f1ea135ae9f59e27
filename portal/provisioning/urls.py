from django.urls import path

from portal.provisioning import views

app_name = "provisioning"

urlpatterns = [
    path("", views.index, name="index"),
    path("new/", views.new, name="new"),
    path("keys/", views.keys, name="keys"),
    path("host-keys/<int:known_host_id>/remove/", views.remove_host_key, name="remove_host_key"),
    path("jobs/<int:job_id>/", views.job, name="job"),
    path("jobs/<int:job_id>/confirm-host-key/", views.confirm_host_key, name="confirm_host_key"),
    path("jobs/<int:job_id>/reject-host-key/", views.reject_host_key, name="reject_host_key"),
    path("jobs/<int:job_id>/cancel/", views.cancel, name="cancel"),
    path("jobs/<int:job_id>/retry/", views.retry, name="retry"),
    path("nodes/<int:node_id>/", views.node, name="node"),
    path("nodes/<int:node_id>/decommission/", views.decommission, name="decommission"),
    path("nodes/<int:node_id>/acceptance/", views.acceptance, name="acceptance"),
]
