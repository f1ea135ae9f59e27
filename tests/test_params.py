"""Every parameter of every page and API route is checked: an id beyond 64 bits, a date at the calendar's ends or
a value a form cannot take gets a 400 (422 in the API) naming the parameter, never a 500."""

import re

import pytest
from django.urls import URLPattern, URLResolver, get_resolver

from portal.billing.forms import CommitmentForm, PriceForm, RunForm
from portal.capacity.forms import AllocationForm
from portal.tenants.forms import CapacityRequestForm
from portal.tenants.services import api_key_create
from tests.conftest import bad_parameters
from tests.factories import PASSWORD, MembershipFactory, NodeFactory, OperatorFactory

pytestmark = pytest.mark.django_db

HUGE = 10**20
# Every query parameter a page reads, and values that once reached the database or the calendar unchecked.
PARAMETERS = ["site", "tenant", "status", "gpu", "range", "period", "all", "page", "alert", "state", "severity",
              "kind", "month", "days", "action", "actor"]
BAD_VALUES = [str(HUGE), "-1", "0001-01", "9999-12", "0001-01-01", "x" * 300, "a\x00b"]


def _patterns(resolver=None, prefix=""):
    for entry in (resolver or get_resolver()).url_patterns:
        if isinstance(entry, URLResolver):
            if str(entry.pattern) in {"admin/", "api/v1/"}:
                continue
            yield from _patterns(entry, prefix + str(entry.pattern))
        elif isinstance(entry, URLPattern):
            yield prefix + str(entry.pattern)


def _names(route: str) -> set[str]:
    return set(re.findall(r"<(?:\w+:)?(\w+)>", route))


def _fill(route: str, **values) -> str:
    """A concrete path: each <converter:name> replaced by values[name], or by a huge id for ints."""
    def one(match):
        converter, name = match.group(1), match.group(2)
        return str(values[name]) if name in values else str(HUGE) if converter == "int" else "x"
    return "/" + re.sub(r"<(?:(\w+):)?(\w+)>", one, route)


@pytest.fixture
def people(client):
    operator = OperatorFactory()
    membership = MembershipFactory()
    return {"operator": operator, "tenant": membership}


def test_no_page_answers_5xx_for_an_id_beyond_64_bits(client, people):
    slug = people["tenant"].tenant.slug
    routes = [r for r in _patterns() if "<int:" in r]
    assert len(routes) > 30
    for user in (people["operator"], people["tenant"].user):
        client.force_login(user)
        for route in routes:
            url = _fill(route, tenant_slug=slug, slug=slug)
            for method in (client.get, client.post):
                status = method(url).status_code
                assert status in (302, 400, 403, 404, 405), f"{method.__name__.upper()} {url} -> {status}"


def test_no_page_answers_5xx_for_a_bad_query_parameter_and_each_400_names_it(client, people):
    node = NodeFactory()
    slug = people["tenant"].tenant.slug
    operator_routes = [r for r in _patterns() if not r.startswith(("tenant/", "signup/", "accounts/"))]
    pages = {"operator": [_fill(r, node_id=node.pk, slug=slug) for r in operator_routes
                          if _names(r) <= {"node_id", "slug"}],
             "tenant": [_fill(r, tenant_slug=slug) for r in _patterns()
                        if r.startswith("tenant/") and _names(r) <= {"tenant_slug"}]}
    assert len(pages["operator"]) > 20 and len(pages["tenant"]) > 5
    refused = set()
    for who, urls in pages.items():
        client.force_login(people["operator"] if who == "operator" else people["tenant"].user)
        for url in urls:
            if client.get(url).status_code != 200:
                continue  # a POST-only action or a redirect: no query parameters to read
            for name in PARAMETERS:
                for value in BAD_VALUES:
                    response = client.get(url, {name: value})
                    assert response.status_code < 500, f"GET {url}?{name}={value!r} -> {response.status_code}"
                    if response.status_code == 400 and response.context and "problems" in response.context:
                        assert name in bad_parameters(response), (url, name, value)
                        refused.add((url, name))
    # The parameters that once caused 500s are among those refused.
    assert ("/fleet/", "site") in refused and ("/fleet/", "tenant") in refused
    assert (f"/tenant/{slug}/usage/", "days") in refused


@pytest.mark.parametrize(("query", "loc"), [
    ("end=0001-01-01", ["query", "end"]), ("start=9999-12-31", ["query", "start"]),
    ("start=0001-01-01&end=0001-01-02", ["query", "start"]), ("end=not-a-date", ["query", "end"]),
])
def test_the_tenant_usage_api_names_a_date_out_of_range(client, people, query, loc):
    membership = people["tenant"]
    key = api_key_create(tenant=membership.tenant, name="k", by=membership.user).value
    response = client.get(f"/api/v1/tenant/usage?{query}", HTTP_AUTHORIZATION=f"Bearer {key}")
    assert response.status_code == 422
    assert loc in [e["loc"] for e in response.json()["detail"]]


def test_the_tenant_api_names_a_deployment_id_beyond_64_bits(client, people):
    membership = people["tenant"]
    key = api_key_create(tenant=membership.tenant, name="k", by=membership.user).value
    response = client.get(f"/api/v1/tenant/deployments/{HUGE}", HTTP_AUTHORIZATION=f"Bearer {key}")
    assert response.status_code == 422
    assert [e["loc"] for e in response.json()["detail"]] == [["path", "deployment_id"]]


def test_the_fleet_page_names_a_site_id_beyond_64_bits(client, people):
    client.login(username=people["operator"].username, password=PASSWORD)
    response = client.get("/fleet/?site=100000000000000000000")
    assert bad_parameters(response) == {"site"}
    assert "Ensure this value is less than or equal to" in response.content.decode()


@pytest.mark.parametrize("value", ["0001-01-01", "9999-12-31"])
@pytest.mark.parametrize(("form_class", "field", "kwargs"), [
    (AllocationForm, "starts_at", {}), (AllocationForm, "ends_at", {}), (PriceForm, "effective_from", {}),
    (CommitmentForm, "effective_from", {}), (RunForm, "month", {}),
    (CapacityRequestForm, "starts_on", {"gpu_types": ["H100"], "mig_profiles": []}),
])
def test_posted_dates_at_the_calendars_ends_are_refused_by_their_form(form_class, field, kwargs, value):
    # Dates that later arithmetic (a month's end, a window of days) would overflow.
    value = value[:7] if field == "month" else value
    form = form_class({field: value}, **kwargs)
    assert not form.is_valid() and field in form.errors
    assert "Enter a date from 2000-01-01 to 2100-12-31." in form.errors[field]
