from django.urls import path

from portal.economics import views

app_name = "economics"

urlpatterns = [
    path("", views.fleet_economics, name="fleet"),
    path("what-if/", views.what_if, name="what_if"),
    path("token-types/", views.token_types, name="token_types"),
    path("advisor/", views.advisor, name="advisor"),
    path("pnl/", views.pnl, name="pnl"),
    path("books/", views.books, name="books"),
    path("books/reattribute/", views.books_reattribute, name="books_reattribute"),
]
