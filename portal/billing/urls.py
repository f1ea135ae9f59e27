from django.urls import path

from portal.billing import views

app_name = "billing"

urlpatterns = [
    path("", views.invoice_list, name="list"),
    path("run/", views.run_month, name="run"),
    path("invoices/<int:invoice_id>/", views.invoice_detail, name="invoice"),
    path("invoices/<int:invoice_id>/csv/", views.invoice_csv, name="invoice_csv"),
    path("invoices/<int:invoice_id>/issue/", views.invoice_issue_view, name="invoice_issue"),
    path("invoices/<int:invoice_id>/recompute/", views.invoice_recompute, name="invoice_recompute"),
    path("prices/", views.prices, name="prices"),
    path("prices/books/new/", views.price_book_new, name="price_book_new"),
    path("prices/books/<int:book_id>/prices/new/", views.price_new, name="price_new"),
    path("prices/books/<int:book_id>/commitments/new/", views.commitment_new, name="commitment_new"),
]
