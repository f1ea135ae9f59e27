from django.urls import path

from portal.tenants import signup_views

app_name = "signup"

urlpatterns = [
    path("", signup_views.signup, name="signup"),
    path("sent/", signup_views.sent, name="sent"),
    path("verify/resend/", signup_views.resend, name="resend"),
    path("verify/<str:token>/", signup_views.verify, name="verify"),
    path("invitation/<str:token>/", signup_views.invitation, name="invitation"),
]
