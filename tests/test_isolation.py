"""Tenant isolation, across every tenant URL and every tenant API route.

Each URL of the `tenants` namespace and each route of the tenant API router is requested by someone who is not a
member of tenant A (a member of tenant B, an operator) with A's slug and A's object ids, and by B's admin with B's
own slug but A's object ids: every one must answer 404 and change nothing. A URL or route whose parameters this
test does not know fails it, so a new tenant URL cannot be added without being covered here."""

import re

import pytest
from django.urls import URLPattern, get_resolver, reverse
from django.utils import timezone

from portal.capacity.models import CapacityRequest, Deployment
from portal.capacity.services import capacity_request_create
from portal.telemetry.models import UsageMinute
from portal.tenants.api import router as tenant_router
from portal.tenants.models import ApiKey, Invitation, MemberRole, Membership
from portal.tenants.services import api_key_create
from tests.factories import PASSWORD, MembershipFactory, OperatorFactory, TenantFactory
from tests.test_tenant_access import deployment_with_endpoint, usage

pytestmark = pytest.mark.django_db

# URLs of the namespace that take no tenant: each is checked for leaks by `test_it_leaks_nothing_unscoped`.
UNSCOPED_URLS = {"home"}
# API routes that take no object id: the key alone decides the tenant.
UNSCOPED_ROUTES = {"/tenant/usage", "/tenant/deployments"}


def tenant_patterns() -> list[URLPattern]:
    _prefix, resolver = get_resolver().namespace_dict["tenants"]
    return list(resolver.url_patterns)


def api_routes() -> list[tuple[str, list[str]]]:
    return [(path, sorted({m for op in view.operations for m in op.methods}))
            for path, view in tenant_router.path_operations.items()]


class World:
    """Tenant A with one of everything a URL can name, and tenant B with the same, separately."""

    def __init__(self) -> None:
        self.a = TenantFactory(name="Acme AI", slug="acme")
        self.b = TenantFactory(name="Globex", slug="globex")
        self.a_admin = MembershipFactory(tenant=self.a, role=MemberRole.ADMIN)
        self.a_member = MembershipFactory(tenant=self.a, role=MemberRole.MEMBER)
        self.b_admin = MembershipFactory(tenant=self.b, role=MemberRole.ADMIN)
        self.a_key = api_key_create(tenant=self.a, name="acme-key", by=self.a_admin.user)
        self.b_key = api_key_create(tenant=self.b, name="globex-key", by=self.b_admin.user)
        self.a_invitation = Invitation.objects.create(tenant=self.a, email="new@acme.example",
                                                      invited_by=self.a_admin.user)
        self.a_request = capacity_request_create(tenant=self.a, by=self.a_admin.user, model_name="acme-secret-model",
                                                 gpu_type="NVIDIA H100 80GB HBM3", count=1,
                                                 starts_at=timezone.now())
        self.a_deployment, a_endpoint = deployment_with_endpoint(self.a, model="acme-secret-model",
                                                                 name="acme-deployment")
        self.b_deployment, b_endpoint = deployment_with_endpoint(self.b, model="globex-model",
                                                                 name="globex-deployment",
                                                                 url="http://127.0.0.1:9000/metrics")
        minute = timezone.now().replace(second=0, microsecond=0)
        usage(UsageMinute, a_endpoint, minute, 7777, 3333)
        usage(UsageMinute, b_endpoint, minute, 11, 22)

    def a_params(self) -> dict:
        return {"tenant_slug": self.a.slug, "deployment_id": self.a_deployment.pk,
                "membership_id": self.a_member.pk, "invitation_id": self.a_invitation.pk,
                "key_id": self.a_key.key.pk, "request_id": self.a_request.pk}

    def state(self) -> tuple:
        """What a leaked write would change in tenant A."""
        return (
            sorted(Membership.objects.filter(tenant=self.a).values_list("pk", "role")),
            sorted(Invitation.objects.filter(tenant=self.a).values_list("pk", "revoked_at", "accepted_at")),
            sorted(ApiKey.objects.filter(tenant=self.a).values_list("pk", "revoked_at")),
            sorted(CapacityRequest.objects.filter(tenant=self.a).values_list("pk", "status")),
            sorted(Deployment.objects.filter(tenant=self.a).values_list("pk", "ended_at")),
        )


@pytest.fixture
def world(db) -> World:
    return World()


def _urls(params: dict) -> list[tuple[str, str]]:
    """(name, path) of every tenant-scoped URL, its parameters filled from `params`; fails on unknown ones."""
    urls, unknown = [], []
    for pattern in tenant_patterns():
        names = set(pattern.pattern.converters)
        if pattern.name in UNSCOPED_URLS:
            continue
        if "tenant_slug" not in names or not names <= set(params):
            unknown.append(f"{pattern.name}: {pattern.pattern} ({sorted(names - set(params))})")
            continue
        urls.append((pattern.name, reverse(f"tenants:{pattern.name}", kwargs={n: params[n] for n in names})))
    assert unknown == [], "tenant URLs this test has no parameters for; cover them here"
    return urls


def _post_data() -> dict:
    """A body that would be valid for any tenant form, so a 404 is isolation, not validation."""
    return {"role": "admin", "email": "x@example.com", "name": "stolen", "model_name": "m", "count": "1",
            "gpu_type": "NVIDIA H100 80GB HBM3", "starts_on": timezone.now().date().isoformat()}


def test_it_knows_every_tenant_url_and_route(world):
    assert len(_urls(world.a_params())) == len(tenant_patterns()) - len(UNSCOPED_URLS)
    for path, _methods in api_routes():
        names = set(re.findall(r"{(\w+)}", path))
        assert names <= {"deployment_id"} and (names or path in UNSCOPED_ROUTES), (
            f"tenant API route {path} is not covered by this test")


@pytest.mark.parametrize("who", ["other_tenant_admin", "operator"])
def test_it_404s_every_tenant_url_for_non_members(client, world, who):
    user = world.b_admin.user if who == "other_tenant_admin" else OperatorFactory()
    client.force_login(user)
    before = world.state()
    for name, url in _urls(world.a_params()):
        assert client.get(url).status_code == 404, f"GET {name} {url}"
        assert client.post(url, _post_data()).status_code == 404, f"POST {name} {url}"
    assert world.state() == before


def test_it_404s_another_tenants_object_ids_under_ones_own_slug(client, world):
    client.force_login(world.b_admin.user)
    before = world.state()
    params = {**world.a_params(), "tenant_slug": world.b.slug}
    with_ids = {p.name for p in tenant_patterns() if set(p.pattern.converters) - {"tenant_slug"}}
    assert with_ids
    for name, url in _urls(params):
        if name in with_ids:
            # A POST-only URL refuses GET with 405 before any lookup, whatever the id: that says nothing.
            assert client.get(url).status_code in (404, 405), f"GET {name} {url}"
            assert client.post(url, _post_data()).status_code == 404, f"POST {name} {url}"
    assert world.state() == before
    # The same URLs with B's own objects work: the 404s above are isolation, not broken pages.
    own = reverse("tenants:deployment", kwargs={"tenant_slug": "globex", "deployment_id": world.b_deployment.pk})
    assert client.get(own).status_code == 200


def test_it_sends_anonymous_visitors_to_login(client, world):
    for name, url in _urls(world.a_params()):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/"), name


def test_it_leaks_nothing_unscoped(client, world):
    client.force_login(world.b_admin.user)
    text = client.get(reverse("tenants:home")).content.decode()
    assert "Globex" in text and "Acme AI" not in text


def test_it_shows_members_only_their_own_tenant(client, world):
    """The positive control: A's member sees A's data on the pages the other tests refused."""
    assert client.login(username=world.a_member.user.username, password=PASSWORD)
    text = client.get(reverse("tenants:overview", args=["acme"])).content.decode()
    assert "acme-deployment" in text and "globex-deployment" not in text
    usage_page = client.get(reverse("tenants:usage", args=["acme"]))
    assert [t.model for t in usage_page.context["totals"]] == ["acme-secret-model"]


def _api_url(path: str, params: dict) -> str:
    return "/api/v1" + path.format(**params)


def test_it_404s_another_tenants_ids_on_every_api_route(client, world):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {world.b_key.value}"}
    params = {"deployment_id": world.a_deployment.pk}
    for path, methods in api_routes():
        if path in UNSCOPED_ROUTES:
            continue
        for method in methods:
            response = getattr(client, method.lower())(_api_url(path, params), **headers)
            assert response.status_code == 404, f"{method} {path}"
        own = client.get(_api_url(path, {"deployment_id": world.b_deployment.pk}), **headers)
        assert own.status_code == 200, path


def test_it_answers_each_api_key_with_its_own_tenant_only(client, world):
    for path, methods in api_routes():
        assert methods == ["GET"], path
        if path not in UNSCOPED_ROUTES:
            continue
        for key, mine, theirs in ((world.b_key, "globex", "acme"), (world.a_key, "acme", "globex")):
            response = client.get(_api_url(path, {}), HTTP_AUTHORIZATION=f"Bearer {key.value}")
            assert response.status_code == 200, path
            text = response.content.decode()
            assert mine in text and theirs not in text, (path, key.key.name)
        assert client.get(_api_url(path, {})).status_code == 401, path
