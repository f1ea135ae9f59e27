"""The published API document is valid and the served API keeps it: schemathesis generates requests from the
document the portal serves (valid and invalid ones) and sends them, with a real node credential and a real tenant
API key, through the portal's WSGI application."""

import time

import pytest
import schemathesis
import schemathesis.checks
from django.apps import apps
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections, connection
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from openapi_spec_validator import validate

from portal.tenants.services import api_key_create
from tests.factories import MembershipFactory, node_with_credential

pytestmark = pytest.mark.django_db

# Cases per operation; five operations make 2,000 and more.
CASES_PER_OPERATION = 400


def _refs(value, path=""):
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref":
                yield path, item
            else:
                yield from _refs(item, f"{path}/{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _refs(item, f"{path}/{i}")


def test_the_served_document_is_valid_openapi_and_every_ref_resolves(client):
    document = client.get("/api/v1/openapi.json").json()
    validate(document)
    unresolved = []
    for where, ref in _refs(document):
        target = document
        for part in ref.removeprefix("#/").split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        if not ref.startswith("#/") or target is None:
            unresolved.append((where, ref))
    assert unresolved == []
    body = document["paths"]["/api/v1/agent/ingest"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/BatchIn"}


def test_the_api_docs_page_needs_no_cdn(client):
    page = client.get("/api/v1/docs").content.decode()
    assert "/static/ninja/swagger-ui-bundle.js" in page and "/static/ninja/swagger-ui.css" in page
    assert "https://" not in page and "cdn" not in page.lower()


def _row_counts() -> dict[str, int]:
    """The number of rows of every table, in one round trip."""
    models = [m for m in apps.get_models() if m._meta.managed and not m._meta.proxy]
    quote = connection.ops.quote_name
    # Table names from the models' metadata, quoted; no values.
    select = ", ".join(f"(SELECT COUNT(*) FROM {quote(m._meta.db_table)})" for m in models)  # noqa: S608
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {select}")
        return dict(zip((m._meta.label for m in models), cursor.fetchone(), strict=True))


def _cases(operation, token: str, excluded: list, by_status: dict[int, int]):
    """The hypothesis test of one operation: send each generated case, validate the response against the
    document, and check that a rejected request wrote nothing."""

    @given(case=operation.as_strategy())
    @hsettings(max_examples=CASES_PER_OPERATION, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    def run(case):
        if isinstance(case.body, dict) and isinstance(case.body.get("interval_end"), int | float):
            # Batches inside the clock window, so the accepting path is exercised too.
            end = time.time() - 1
            case.body.update(interval_start=end - 10, interval_end=end)
        before = _row_counts()
        response = case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, excluded_checks=excluded)
        if response.status_code >= 400:
            assert _row_counts() == before, f"{operation.path} answered {response.status_code} but wrote"
        by_status[response.status_code] = by_status.get(response.status_code, 0) + 1

    return run


@pytest.fixture
def _keep_connection():
    """As Django's test client does: a request through the WSGI application must not close the test's
    connection (and with it the test's transaction)."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.mark.usefixtures("_keep_connection")
def test_schemathesis_finds_no_5xx_no_schema_violation_and_no_write_on_rejection(settings, capsys):
    settings.INGEST_MAX_BATCHES_PER_MINUTE = 10**6  # every case reaches validation, none a 429
    _node, credential = node_with_credential()
    membership = MembershipFactory()
    key = api_key_create(tenant=membership.tenant, name="schemathesis", by=membership.user).value
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", get_wsgi_application())
    # Every check but "schema-valid data is accepted": the document cannot say that a batch's interval must end
    # within the portal's clock window or that a GPU belongs to the node, so such a batch is rightly refused.
    excluded = [schemathesis.checks.positive_data_acceptance]
    cases: dict[str, dict[int, int]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/api/v1/agent/ingest", "/api/v1/tenant/usage"}
    for operation in operations:
        token = credential if operation.path.startswith("/api/v1/agent/") else key
        by_status = cases.setdefault(f"{operation.method.upper()} {operation.path}", {})
        _cases(operation, token, excluded, by_status)()
    total = sum(n for by_status in cases.values() for n in by_status.values())
    with capsys.disabled():
        print(f"\nschemathesis: {total} generated cases, no 5xx, no schema violation")
        for operation, by_status in sorted(cases.items()):
            print(f"  {operation}: " + ", ".join(f"{n} x {status}" for status, n in sorted(by_status.items())))
    assert total >= 2000
    assert all(status < 500 for by_status in cases.values() for status in by_status)
