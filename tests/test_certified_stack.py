"""The certified stack: a named version of driver, CUDA and engines; each site's compliance; the placement policy
that keeps nodes off the stack out of new placements (placement_propose and allocation_create); the audit of
every change; components no agent reports; and the migration from the fleet baseline."""

from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from portal.audit.models import AuditEntry
from portal.capacity.models import Allocation
from portal.capacity.selectors import placement_propose
from portal.capacity.services import CapacityError, allocation_create
from portal.fleet.models import NodeLifecycle, NodeStatus, ServingEndpoint
from portal.standards.models import CertifiedStack, PlacementPolicy
from portal.standards.selectors import fleet_drift, fleet_versions, node_drift, nodes_excluded, site_compliance
from portal.standards.services import baseline_set, placement_policy_set
from tests.conftest import bad_parameters
from tests.factories import (
    PASSWORD,
    GpuFactory,
    NodeFactory,
    OperatorFactory,
    SiteFactory,
    TenantFactory,
    ViewerFactory,
)

H100 = "NVIDIA H100 80GB HBM3"
STACK = {"name": "2026.12", "driver_version": "590.48.01", "cuda_driver_version": "13.1", "vllm_version": "0.10.1"}
ON_STACK = {"driver_version": "590.48.01", "cuda_driver_version": "13.1"}
OLD_DRIVER = {"driver_version": "550.127.05", "cuda_driver_version": "13.1"}


def endpoint(node, engine: str, version: str, port: int = 8000, **settings) -> ServingEndpoint:
    return ServingEndpoint.objects.create(node=node, url=f"http://127.0.0.1:{port}/metrics", model=f"m-{port}",
                                          engine=engine, version=version, settings=settings)


def site_of_four(name: str = "IAD-1"):
    """A site of four nodes, one of which runs an older driver, and three that are not checked: decommissioned,
    retired, planned (nothing installed yet, so nothing reported)."""
    site = SiteFactory(name=name)
    nodes = [NodeFactory(site=site, hostname=f"{name.lower()}-{i:02d}", **ON_STACK) for i in range(1, 4)]
    old = NodeFactory(site=site, hostname=f"{name.lower()}-04", **OLD_DRIVER)
    NodeFactory(site=site, hostname=f"{name.lower()}-99", status=NodeStatus.DECOMMISSIONED, driver_version="470.1")
    NodeFactory(site=site, hostname=f"{name.lower()}-98", lifecycle=NodeLifecycle.RETIRED, driver_version="470.1")
    NodeFactory(site=site, hostname=f"{name.lower()}-97", lifecycle=NodeLifecycle.PLANNED, status=NodeStatus.PENDING)
    return site, nodes, old


def login(client, user) -> None:
    client.login(username=user.username, password=PASSWORD)


@pytest.mark.django_db
class TestCompliance:
    def test_it_computes_each_sites_compliance_as_nodes_compliant_over_nodes_checked(self, client):
        iad, _nodes, old = site_of_four("IAD-1")
        fra = SiteFactory(name="FRA-1")
        good = NodeFactory(site=fra, hostname="fra-01", **ON_STACK)
        endpoint(good, "vllm", "0.10.1")
        baseline_set(by=None, **STACK)
        rows = {row.site.name: (row.nodes_compliant, row.nodes_checked, row.compliance_pct)
                for row in site_compliance()}
        assert rows == {"IAD-1": (3, 4, 75.0), "FRA-1": (1, 1, 100.0)}
        login(client, ViewerFactory())
        for page in ("/standards/", "/standards/drift/"):
            html = client.get(page).content.decode()
            assert '<tr data-site="IAD-1">' in html, page
            iad_row = html.split('<tr data-site="IAD-1">', 1)[1].split("</tr>", 1)[0]
            assert "3 / 4" in iad_row and '<td data-testid="site-pct">75.0 %</td>' in iad_row, page
        drift = fleet_drift(site_id=iad.pk)
        assert (drift.nodes_compliant, drift.nodes_checked, drift.compliance_pct) == (3, 4, 75.0)
        assert [nd.node.hostname for nd in drift.off_stack] == [old.hostname]
        assert drift.off_stack[0].summary == "Driver 550.127.05 (stack 590.48.01)"

    def test_it_has_no_compliance_without_a_stack(self):
        site_of_four()
        assert site_compliance() == []
        assert fleet_drift().stack is None

    def test_it_shows_a_pinned_version_no_agent_reports_as_not_reported_and_does_not_count_it(self, client):
        site = SiteFactory(name="IAD-1")
        triton = NodeFactory(site=site, hostname="iad-triton", **ON_STACK)
        endpoint(triton, "triton", "2.59.0")
        plain = NodeFactory(site=site, hostname="iad-plain", **ON_STACK)  # serves no Triton: TRT-LLM not checked
        stack = baseline_set(by=None, **STACK, triton_version="2.59.0", tensorrt_llm_version="1.0.0",
                             nemo_version="25.07")
        checked = node_drift(node=triton, stack=stack)
        assert [(c.component, c.label, c.unreported) for c in checked.components] == [
            ("Driver", "on baseline", False), ("CUDA (driver)", "on baseline", False),
            ("Triton", "on baseline", False), ("TensorRT-LLM", "not reported", True), ("NeMo", "not reported", True)]
        assert checked.compliant and [c.component for c in checked.unreported] == ["TensorRT-LLM", "NeMo"]
        assert node_drift(node=plain, stack=stack).components[2:] == []
        drift = fleet_drift()
        assert (drift.nodes_compliant, drift.nodes_checked) == (2, 2)
        assert drift.unreported == {"NeMo": 1, "TensorRT-LLM": 1}
        assert ("TensorRT-LLM", [("", 1)]) in fleet_versions()
        login(client, ViewerFactory())
        html = client.get("/standards/drift/").content.decode()
        assert "not reported by any agent (not counted): NeMo on 1 node, TensorRT-LLM on 1 node." in html
        page = client.get("/standards/").content.decode()
        assert "not reported · 1" in page and "reported by no agent today" in page

    def test_it_checks_a_tensorrt_llm_version_once_an_endpoint_reports_one(self):
        node = NodeFactory(**ON_STACK)
        endpoint(node, "triton", "2.59.0", tensorrt_llm_version="0.21.0")
        stack = baseline_set(by=None, **STACK, tensorrt_llm_version="1.0.0")
        checked = node_drift(node=node, stack=stack)
        assert [(c.component, c.actual, c.label) for c in checked.off] == [("TensorRT-LLM", "0.21.0", "major 1 behind")]
        assert not checked.compliant


@pytest.fixture
def fleet():
    """Two online, sellable nodes of two H100s each: a-good on the stack, b-old on driver 550."""
    site = SiteFactory(name="IAD-1")
    good = NodeFactory(site=site, hostname="a-good", **ON_STACK)
    old = NodeFactory(site=site, hostname="b-old", **OLD_DRIVER)
    gpus = {node.hostname: [GpuFactory(node=node, index=i, name=H100) for i in range(2)] for node in (good, old)}
    baseline_set(by=None, **STACK)
    return {"good": good, "old": old, "gpus": gpus, "tenant": TenantFactory()}


def proposed(count: int = 4) -> list[tuple[str, int]]:
    return [(p.gpu.node.hostname, p.gpu.index)
            for p in placement_propose(gpu_type=H100, count=count, starts_at=timezone.now())]


@pytest.mark.django_db
class TestPlacementPolicy:
    def test_it_keeps_nodes_off_the_stack_out_of_new_placements_when_on(self, fleet):
        held = allocation_create(tenant=fleet["tenant"], gpu=fleet["gpus"]["b-old"][0], starts_at=timezone.now())
        placement_policy_set(by=None, exclude_off_stack=True)
        assert proposed() == [("a-good", 0), ("a-good", 1)]
        assert list(nodes_excluded(node_ids=[fleet["good"].pk, fleet["old"].pk])) == [fleet["old"].pk]
        with pytest.raises(CapacityError) as refused:
            allocation_create(tenant=fleet["tenant"], gpu=fleet["gpus"]["b-old"][1], starts_at=timezone.now())
        assert str(refused.value) == (
            "b-old is off the certified stack 2026.12 (Driver 550.127.05 (stack 590.48.01)): the placement policy "
            "excludes it from new allocations, so choose another unit.")
        assert allocation_create(tenant=fleet["tenant"], gpu=fleet["gpus"]["a-good"][0],
                                 starts_at=timezone.now()).gpu.node == fleet["good"]
        # the allocation made before the policy is untouched
        assert list(Allocation.objects.filter(gpu__node=fleet["old"]).values_list("pk", "ends_at")) == [
            (held.pk, None)]

    def test_it_still_records_a_past_allocation_on_a_node_off_the_stack(self, fleet):
        placement_policy_set(by=None, exclude_off_stack=True)
        start = timezone.now() - timedelta(days=3)
        past = allocation_create(tenant=fleet["tenant"], gpu=fleet["gpus"]["b-old"][0], starts_at=start,
                                 ends_at=start + timedelta(days=1))
        assert past.gpu.node.hostname == "b-old"

    def test_it_allows_nodes_off_the_stack_when_off_or_never_set(self, fleet):
        everything = [("a-good", 0), ("a-good", 1), ("b-old", 0), ("b-old", 1)]
        assert proposed() == everything  # no policy set
        placement_policy_set(by=None, exclude_off_stack=True)
        placement_policy_set(by=None, exclude_off_stack=False)
        assert proposed() == everything
        allocation = allocation_create(tenant=fleet["tenant"], gpu=fleet["gpus"]["b-old"][0],
                                       starts_at=timezone.now())
        assert allocation.gpu.node.hostname == "b-old"

    def test_it_excludes_nothing_while_no_stack_is_set(self):
        node = NodeFactory(hostname="c-any", **OLD_DRIVER)
        GpuFactory(node=node, index=0, name=H100)
        placement_policy_set(by=None, exclude_off_stack=True)
        assert nodes_excluded(node_ids=[node.pk]) == {}
        assert proposed() == [("c-any", 0)]


@pytest.mark.django_db
class TestAuditAndAccess:
    def test_every_change_of_stack_and_policy_is_audited_with_before_and_after(self, client):
        admin = OperatorFactory(username="olivia")
        login(client, admin)
        baseline_set(by=admin, name="2026.09", driver_version="580.95.05", note="Q3")
        r = client.post("/standards/stack/", {**STACK, "note": "CHG-2291"})
        assert r.status_code == 302
        entry = AuditEntry.objects.filter(action="standards.stack_set").first()
        assert (entry.actor_label, entry.target) == ("olivia", "Certified stack 2026.12")
        assert entry.before == {
            "name": "2026.09", "driver_version": "580.95.05", "cuda_driver_version": "", "vllm_version": "",
            "sglang_version": "", "triton_version": "", "tgi_version": "", "tensorrt_llm_version": "",
            "nemo_version": "", "note": "Q3"}
        assert entry.after == {
            "name": "2026.12", "driver_version": "590.48.01", "cuda_driver_version": "13.1", "vllm_version": "0.10.1",
            "sglang_version": "", "triton_version": "", "tgi_version": "", "tensorrt_llm_version": "",
            "nemo_version": "", "note": "CHG-2291"}
        assert AuditEntry.objects.filter(action="standards.stack_set").last().before is None
        for choice, note in (("on", "CHG-2304"), ("off", "rollback")):
            assert client.post("/standards/policy/", {"exclusion": choice, "note": note}).status_code == 302
        entries = list(AuditEntry.objects.filter(action="standards.placement_policy_set").order_by("id"))
        assert [(e.actor_label, e.before, e.after) for e in entries] == [
            ("olivia", {"exclude_off_stack": False}, {"exclude_off_stack": True, "note": "CHG-2304"}),
            ("olivia", {"exclude_off_stack": True}, {"exclude_off_stack": False, "note": "rollback"}),
        ]

    def test_a_viewer_cannot_change_the_policy_and_an_admin_can(self, client):
        login(client, ViewerFactory())
        page = client.get("/standards/").content.decode()
        assert "Save policy" not in page and "Nodes off the certified stack may take new placements." in page
        assert client.post("/standards/policy/", {"exclusion": "on"}).status_code == 403
        assert not PlacementPolicy.objects.exists()
        client.logout()
        login(client, OperatorFactory())
        r = client.post("/standards/policy/", {"exclusion": "on", "note": "CHG-2304"})
        assert r["Location"] == "/standards/"
        assert list(PlacementPolicy.objects.values_list("exclude_off_stack", "note")) == [(True, "CHG-2304")]
        assert "New placements skip nodes off the certified stack." in client.get("/standards/").content.decode()

    @pytest.mark.parametrize("data", [{}, {"exclusion": "yes"}])
    def test_it_refuses_a_bad_policy_naming_the_field(self, client, data):
        login(client, OperatorFactory())
        r = client.post("/standards/policy/", data)
        assert r.status_code == 400 and list(r.context["policy_form"].errors) == ["exclusion"]
        assert not PlacementPolicy.objects.exists()

    def test_it_refuses_a_stack_name_already_used(self, client):
        login(client, OperatorFactory())
        baseline_set(by=None, **STACK)
        r = client.post("/standards/stack/", {**STACK, "driver_version": "590.52.01"})
        assert r.status_code == 400
        assert r.context["form"].errors["name"] == ["Certified stack with this Stack version already exists."]
        assert CertifiedStack.objects.get().driver_version == "590.48.01"

    def test_the_standards_page_lists_the_nodes_the_policy_excludes(self, client, fleet):
        login(client, ViewerFactory())
        html = client.get("/standards/").content.decode()
        assert "Would be excluded if the policy were on" in html
        placement_policy_set(by=None, exclude_off_stack=True)
        html = client.get("/standards/").content.decode()
        excluded = html.split('data-testid="excluded-nodes">', 1)[1].split("</ul>", 1)[0]
        assert "Excluded from new placements" in html
        assert 'data-node="b-old"' in excluded and "Driver 550.127.05 (stack 590.48.01)" in excluded
        assert "a-good" not in excluded

    @pytest.mark.parametrize("site", ["abc", "999999"])
    def test_the_drift_page_400s_an_unknown_site(self, client, site):
        login(client, ViewerFactory())
        assert bad_parameters(client.get(f"/standards/drift/?site={site}")) == {"site"}


@pytest.mark.django_db(transaction=True)
def test_the_migration_names_each_existing_baseline_by_its_day():
    executor = MigrationExecutor(connection)
    executor.migrate([("standards", "0001_initial")])
    old = executor.loader.project_state([("standards", "0001_initial")]).apps.get_model("standards", "Baseline")
    day = datetime(2026, 11, 26, 9, 30, tzinfo=UTC)
    for at, driver in ((day, "580.95.05"), (day + timedelta(hours=2), "590.48.01"), (day + timedelta(days=5), "")):
        old.objects.create(driver_version=driver, triton_version="2.59.0", created_at=at)
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())
    assert list(CertifiedStack.objects.order_by("created_at").values_list(
        "name", "driver_version", "triton_version", "tensorrt_llm_version")) == [
        ("2026.11.26", "580.95.05", "2.59.0", ""), ("2026.11.26-2", "590.48.01", "2.59.0", ""),
        ("2026.12.01", "", "2.59.0", "")]
