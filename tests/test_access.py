"""Who may see what: every URL declares its audience, and each audience is checked."""

import pytest
from django.urls import URLPattern, URLResolver, get_resolver

from portal.fleet.models import HealthEvent, HealthEventKind
from tests.factories import PASSWORD, MembershipFactory, NodeFactory, OperatorFactory, UserFactory, ViewerFactory

pytestmark = pytest.mark.django_db

OPERATOR_PAGES = ["/fleet/", "/fleet/nodes/{node}/"]


def _views(resolver=None, prefix=""):
    resolver = resolver or get_resolver()
    for entry in resolver.url_patterns:
        if isinstance(entry, URLResolver):
            # The admin guards itself; the JSON API declares auth per operation (tested in test_ingest).
            if str(entry.pattern) in {"admin/", "api/v1/"}:
                continue
            yield from _views(entry, prefix + str(entry.pattern))
        elif isinstance(entry, URLPattern):
            yield prefix + str(entry.pattern), entry.callback


def test_it_declares_an_audience_for_every_view():
    undeclared = [
        route for route, view in _views()
        if not hasattr(view, "access") and not hasattr(getattr(view, "view_class", None), "access")
        and "accounts/" not in route  # Django's own auth views: public by nature
    ]
    assert undeclared == []


class AccessCase:
    @pytest.fixture(autouse=True)
    def _people(self, db):
        self.operator = OperatorFactory()
        self.viewer = ViewerFactory()
        self.tenant_user = MembershipFactory().user
        self.outsider = UserFactory()
        self.node = NodeFactory()
        HealthEvent.objects.create(node=self.node, kind=HealthEventKind.XID, code=79, at="2026-11-01T00:00:00Z")

    def pages(self):
        return [p.format(node=self.node.pk) for p in OPERATOR_PAGES]


class TestOperatorPages(AccessCase):
    def test_it_shows_operator_pages_to_operators_of_either_role(self, client):
        for user in (self.operator, self.viewer):
            client.login(username=user.username, password=PASSWORD)
            for page in self.pages():
                assert client.get(page).status_code == 200, page

    def test_it_refuses_tenant_users_and_outsiders(self, client):
        for user in (self.tenant_user, self.outsider):
            client.login(username=user.username, password=PASSWORD)
            for page in self.pages():
                assert client.get(page).status_code == 403, page

    def test_it_sends_anonymous_visitors_to_login(self, client):
        for page in self.pages():
            response = client.get(page)
            assert response.status_code == 302
            assert response["Location"].startswith("/accounts/login/?next=")

    def test_it_sends_each_role_home_to_its_own_page(self, client):
        client.login(username=self.operator.username, password=PASSWORD)
        assert client.get("/")["Location"] == "/fleet/"
        client.login(username=self.tenant_user.username, password=PASSWORD)
        assert client.get("/")["Location"] == "/tenant/"
        page = client.get("/tenant/")
        assert self.tenant_user.memberships.get().tenant.name in page.content.decode()

    def test_it_404s_an_unknown_node(self, client):
        client.login(username=self.operator.username, password=PASSWORD)
        assert client.get("/fleet/nodes/999999/").status_code == 404
