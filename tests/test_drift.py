"""The certified stack and version drift: numeric version comparison, the drift page and the stack's history."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from hypothesis import given
from hypothesis import strategies as st

from portal.fleet.models import NodeStatus, ServingEndpoint
from portal.standards.models import CertifiedStack
from portal.standards.services import baseline_set
from portal.standards.versions import compare, drift, parse_version
from tests.conftest import bad_parameters
from tests.factories import PASSWORD, NodeFactory, OperatorFactory, SiteFactory, ViewerFactory

BASELINE = {"name": "2026.12", "driver_version": "590.48.01", "cuda_driver_version": "13.1", "vllm_version": "0.11.0",
            "sglang_version": "0.4.6"}
ON_BASELINE = {"driver_version": "590.48.01", "cuda_driver_version": "13.1"}


class TestVersions:
    @pytest.mark.parametrize(("value", "parts"), [
        ("550.127.05", (550, 127, 5)), ("13.1", (13, 1)), ("0.6.3.post1", (0, 6, 3)), ("0.6.3+cu124", (0, 6, 3)),
        ("v2.4.0", (2, 4, 0)), ("3.0.0rc1", (3, 0, 0)), ("24.08", (24, 8)), ("", None), ("unknown", None),
    ])
    def test_it_parses_the_numeric_dotted_parts(self, value, parts):
        assert parse_version(value) == parts

    @pytest.mark.parametrize(("a", "b", "result"), [
        ("550.127.05", "590.48.01", -1), ("590.48.01", "590.44.01", 1), ("590.48.01", "590.48.1", 0),
        ("12.4", "12.4.0", 0), ("0.10.0", "0.9.2", 1), ("2.59.0", "2.100.0", -1),
    ])
    def test_it_compares_numerically_not_as_text(self, a, b, result):
        assert compare(a, b) == result

    def test_it_refuses_to_compare_what_is_not_a_version(self):
        with pytest.raises(ValueError, match="not a dotted version: 'n/a'"):
            compare("1.2", "n/a")

    @pytest.mark.parametrize(("actual", "baseline", "text"), [
        ("550.127.05", "590.48.01", "major 40 behind"),
        ("590.48.01", "590.44.01", "minor 4 ahead"),
        ("0.11.2", "0.11.0", "patch 2 ahead"),
        ("1.2.3.4", "1.2.3.9", "part 4 5 behind"),
        ("12.4", "12.4.0", "on baseline"),
    ])
    def test_it_says_how_far_a_version_drifts(self, actual, baseline, text):
        assert str(drift(actual, baseline)) == text

    def test_it_has_no_drift_for_an_unparseable_version(self):
        assert drift("custom-build", "590.48.01") is None

    versions = st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=5).map(
        lambda parts: ".".join(str(p) for p in parts))

    @given(a=versions, b=versions)
    def test_it_compares_antisymmetrically(self, a, b):
        assert compare(a, b) == -compare(b, a)
        assert compare(a, a) == 0
        assert compare(a, a + ".0") == 0

    @given(a=versions, b=versions)
    def test_it_mirrors_drift_and_agrees_with_compare(self, a, b):
        forward, backward = drift(a, b), drift(b, a)
        assert forward.direction == compare(a, b) == -backward.direction
        assert (forward.level, forward.amount) == (backward.level, backward.amount)
        assert (forward.amount == 0) == (forward.direction == 0)


@pytest.fixture
def operator_client(client, db):
    OperatorFactory(username="olivia")
    client.login(username="olivia", password=PASSWORD)
    return client


def endpoint(node, engine: str, version: str, port: int = 8000) -> ServingEndpoint:
    return ServingEndpoint.objects.create(node=node, url=f"http://127.0.0.1:{port}/metrics", model=f"m-{port}",
                                          engine=engine, version=version)


def drift_rows(response) -> dict[str, dict[str, str]]:
    return {nd.node.hostname: {c.component: c.label for c in nd.off} for nd in response.context["drift"].off_stack}


@pytest.mark.django_db
class TestDriftPage:
    @pytest.fixture
    def fleet(self):
        iad, fra = SiteFactory(name="IAD1"), SiteFactory(name="FRA1")
        baseline_set(by=None, **BASELINE)
        good = NodeFactory(site=iad, hostname="iad-01", **ON_BASELINE)
        endpoint(good, "vllm", "0.11.0")
        endpoint(good, "tgi", "2.0.0", port=8001)  # TGI is not pinned: not checked
        old = NodeFactory(site=iad, hostname="iad-03", driver_version="550.127.05", cuda_driver_version="12.4")
        engines = NodeFactory(site=fra, hostname="fra-01", **ON_BASELINE)
        endpoint(engines, "vllm", "0.10.2")
        endpoint(engines, "vllm", "0.11.0", port=8001)
        endpoint(engines, "sglang", "", port=8002)
        ahead = NodeFactory(site=fra, hostname="fra-02", driver_version="590.52.01", cuda_driver_version="13.1")
        NodeFactory(site=fra, hostname="fra-99", status=NodeStatus.DECOMMISSIONED, driver_version="470.1.1")
        return {"iad": iad, "fra": fra, "good": good, "old": old, "engines": engines, "ahead": ahead}

    def test_it_lists_nodes_off_the_stack_and_by_how_much(self, operator_client, fleet):
        response = operator_client.get("/standards/drift/")
        assert response.status_code == 200
        assert drift_rows(response) == {
            "iad-03": {"Driver": "major 40 behind", "CUDA (driver)": "major 1 behind"},
            "fra-01": {"vLLM": "minor 1 behind", "SGLang": "not reported"},
            "fra-02": {"Driver": "minor 4 ahead"},
        }
        report = response.context["drift"]
        assert (report.nodes_compliant, report.nodes_checked) == (1, 4)
        html = response.content.decode()
        assert 'data-testid="compliance">1 / 4<' in html
        assert 'data-testid="compliance-pct">25%<' in html
        assert "major 40 behind" in html and "<code>550.127.05</code>" in html and "<code>590.48.01</code>" in html
        assert "How drift is computed" in html
        assert "fra-99" not in html and "iad-01" not in html

    def test_it_filters_by_site(self, operator_client, fleet):
        response = operator_client.get(f"/standards/drift/?site={fleet['iad'].pk}")
        assert list(drift_rows(response)) == ["iad-03"]
        assert (response.context["drift"].nodes_compliant, response.context["drift"].nodes_checked) == (1, 2)
        partial = operator_client.get(f"/standards/drift/?site={fleet['fra'].pk}", HTTP_HX_REQUEST="true")
        html = partial.content.decode()
        assert html.lstrip().startswith('<div id="drift-report">') and "fra-01" in html and "iad-03" not in html

    @pytest.mark.parametrize("site", ["abc", "999999"])
    def test_it_400s_an_unknown_site(self, operator_client, site):
        assert bad_parameters(operator_client.get(f"/standards/drift/?site={site}")) == {"site"}

    def test_it_says_when_no_stack_is_set(self, operator_client):
        NodeFactory(driver_version="550.127.05")
        response = operator_client.get("/standards/drift/")
        assert response.context["drift"].stack is None
        assert "No certified stack is set" in response.content.decode()

    def test_it_uses_the_same_queries_whatever_the_fleet_size(self, operator_client):
        baseline_set(by=None, **BASELINE)
        site = SiteFactory()

        def grow(count: int) -> None:
            for _ in range(count):
                node = NodeFactory(site=site, driver_version="550.127.05", cuda_driver_version="13.1")
                endpoint(node, "vllm", "0.10.0")
                endpoint(node, "sglang", "0.4.6", port=8001)

        def queries() -> int:
            with CaptureQueriesContext(connection) as ctx:
                assert operator_client.get("/standards/drift/").status_code == 200
            return len(ctx.captured_queries)

        grow(2)
        small = queries()
        grow(18)
        response = operator_client.get("/standards/drift/")
        assert len(response.context["drift"].off_stack) == 20
        assert queries() == small


@pytest.mark.django_db
class TestStack:
    def test_it_keeps_history_and_puts_the_newest_in_force(self, operator_client):
        node = NodeFactory(driver_version="550.127.05", cuda_driver_version="12.4")
        response = operator_client.post("/standards/stack/", {"name": "2026.09", "driver_version": "550.127.05",
                                                              "note": "first"})
        assert response.status_code == 302 and response["Location"] == "/standards/drift/"
        response = operator_client.post("/standards/stack/", {**BASELINE, "note": "CHG-1234 driver 590"})
        assert response.status_code == 302
        history = list(CertifiedStack.objects.order_by("-created_at", "-pk"))
        assert [b.note for b in history] == ["CHG-1234 driver 590", "first"]
        assert all(b.created_by.username == "olivia" for b in history)
        page = operator_client.get("/standards/")
        assert page.context["stack"] == history[0]
        assert page.context["form"].initial["driver_version"] == "590.48.01"
        html = page.content.decode()
        assert "CHG-1234 driver 590" in html and "first" in html and "in force" in html
        assert "550.127.05 · 1" in html  # what the fleet runs
        assert drift_rows(operator_client.get("/standards/drift/")) == {
            node.hostname: {"Driver": "major 40 behind", "CUDA (driver)": "major 1 behind"}}

    @pytest.mark.parametrize(("data", "field", "message"), [
        ({"driver_version": "590.48.01-beta"}, "driver_version", "Enter a dotted numeric version"),
        ({"vllm_version": "latest"}, "vllm_version", "Enter a dotted numeric version"),
        ({"cuda_driver_version": "13..1"}, "cuda_driver_version", "Enter a dotted numeric version"),
        ({}, "driver_version", "Pin at least one version"),
    ])
    def test_it_rejects_a_bad_stack_naming_the_field(self, operator_client, data, field, message):
        response = operator_client.post("/standards/stack/", {"name": "2026.12", **data})
        assert response.status_code == 400
        errors = response.context["form"].errors
        assert list(errors) == [field] and message in errors[field][0]
        assert message in response.content.decode()
        assert not CertifiedStack.objects.exists()

    def test_it_lets_viewers_read_but_not_set_the_stack(self, client, db):
        ViewerFactory(username="victor")
        client.login(username="victor", password=PASSWORD)
        baseline_set(by=None, name="2026.12", driver_version="590.48.01")
        page = client.get("/standards/")
        assert page.status_code == 200 and "590.48.01" in page.content.decode()
        assert "Put in force" not in page.content.decode()
        assert client.get("/standards/drift/").status_code == 200
        assert client.post("/standards/stack/", {"name": "x", "driver_version": "1.0"}).status_code == 403
        assert CertifiedStack.objects.count() == 1
