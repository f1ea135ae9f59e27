"""Refusals and failures are pages of the product: inside the layout for 403 and 404, a self-contained page for
500 that needs nothing that could itself fail."""

import pytest
from django.test import RequestFactory
from django.views.defaults import server_error

from tests.factories import PASSWORD, UserFactory, ViewerFactory

pytestmark = pytest.mark.django_db


def test_it_refuses_an_operator_page_to_a_tenant_user_inside_the_layout(client):
    user = UserFactory(username="tenant-person")
    client.login(username=user.username, password=PASSWORD)
    response = client.get("/fleet/")
    assert response.status_code == 403
    page = response.content.decode()
    assert 'data-testid="error-403"' in page and "Operators only." in page
    assert "You are logged in as <strong>tenant-person</strong>" in page and 'class="topbar"' in page


def test_it_refuses_an_admin_action_to_a_viewer_naming_why(client):
    client.login(username=ViewerFactory().username, password=PASSWORD)
    response = client.post("/economics/books/reattribute/", {"month": "2026-11"})
    assert response.status_code == 403 and "Operator admins only." in response.content.decode()


def test_it_answers_an_unknown_address_with_the_layouts_404(client):
    response = client.get("/no/such/page/")
    assert response.status_code == 404
    page = response.content.decode()
    assert 'data-testid="error-404"' in page and "<code>/no/such/page/</code>" in page


def test_the_500_page_renders_without_a_request_context():
    response = server_error(RequestFactory().get("/"))
    assert response.status_code == 500
    page = response.content.decode()
    assert 'data-testid="error-500"' in page and "/static/css/tokenmill.css" in page
