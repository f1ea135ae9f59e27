"""A site's bring-up: the plan, its named nodes, the pipeline by lifecycle stage, GPUs sellable against the plan and
the projected completion at the rate GPUs became sellable so far."""

from datetime import UTC, date, datetime, timedelta

import pytest

from portal.audit.models import AuditEntry
from portal.bringup.selectors import site_bringup
from portal.bringup.services import BringUpError, plan_line_set, plan_set, planned_nodes_name
from portal.fleet.models import NodeLifecycle, NodeStatus
from portal.fleet.services import enrollment_token_create, node_enroll, node_lifecycle_set
from portal.health.services import cordon_open
from tests.factories import GpuFactory, NodeFactory, OperatorFactory, SiteFactory, ViewerFactory

pytestmark = pytest.mark.django_db

H100 = "NVIDIA H100 80GB HBM3"
NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


@pytest.fixture
def site():
    return SiteFactory(name="DFW2", slug="dfw2")


@pytest.fixture
def planned(site):
    """A plan of 4 nodes x 8 H100 started 30 days before NOW: 2 sellable (one with a cordoned GPU), 1 in burn-in,
    1 named and planned."""
    operator = OperatorFactory()
    plan = plan_set(site=site, started_on=NOW.date() - timedelta(days=30), target_days=90, soak_minutes=30,
                    note="", by=operator)
    line = plan_line_set(plan=plan, gpu_model=H100, nodes=4, gpus_per_node=8, by=operator)
    nodes = planned_nodes_name(plan=plan, line=line, hostnames=[f"dfw2-{i}" for i in range(4)], by=operator)
    for node, stage in zip(nodes, [NodeLifecycle.SELLABLE, NodeLifecycle.SELLABLE, NodeLifecycle.BURN_IN],
                           strict=False):
        node_lifecycle_set(node=node, lifecycle=stage, at=NOW - timedelta(days=5), reason="test")
        for index in range(8):
            GpuFactory(node=node, index=index, name=H100)
    cordon_open(node=nodes[0], gpu=nodes[0].gpus.get(index=3), at=NOW, reason="XID 48")
    return plan, line, nodes, operator


def test_it_counts_the_pipeline_and_projects_completion(site, planned):
    bringup = site_bringup(site=site, now=NOW)
    assert bringup.stages == {"planned": 1, "provisioning": 0, "burn_in": 1, "sellable": 2, "cordoned": 0,
                              "retired": 0}
    assert (bringup.planned_nodes, bringup.planned_gpus, bringup.sellable_gpus) == (4, 32, 15)
    assert bringup.days_elapsed == 30 and bringup.target_date == date(2027, 2, 1)
    # 15 GPUs in 30 days is 0.5 a day: the other 17 take 34 more days, 26 days before the target.
    assert bringup.rate_per_day == 0.5
    assert bringup.projected_date == date(2027, 1, 6)
    assert (bringup.days_late, bringup.days_ahead) == (-26, 26)
    assert bringup.under_way


def test_nodes_of_the_plan_not_yet_named_count_as_planned(site, planned):
    plan, _line, _nodes, operator = planned
    plan_line_set(plan=plan, gpu_model=H100, nodes=6, gpus_per_node=8, by=operator)
    bringup = site_bringup(site=site, now=NOW)
    assert bringup.stages["planned"] == 3 and bringup.planned_gpus == 48


def test_it_refuses_more_named_nodes_than_planned_and_a_taken_hostname(site, planned):
    plan, line, _nodes, operator = planned
    with pytest.raises(BringUpError, match="the plan has 4"):
        planned_nodes_name(plan=plan, line=line, hostnames=["dfw2-9"], by=operator)
    line = plan_line_set(plan=plan, gpu_model=H100, nodes=9, gpus_per_node=8, by=operator)
    with pytest.raises(BringUpError, match="already has dfw2-1"):
        planned_nodes_name(plan=plan, line=line, hostnames=["dfw2-1"], by=operator)


def test_a_planned_node_costs_nothing_and_enrolls_into_burn_in(site, planned):
    _plan, _line, nodes, operator = planned
    node = nodes[3]
    assert (node.lifecycle, node.status, node.gpus.count(), node.credentials.count()) == (
        NodeLifecycle.PLANNED, NodeStatus.PENDING, 0, 0)
    assert [c.lifecycle for c in node.lifecycle_changes.all()] == [NodeLifecycle.PLANNED]

    _token, value = enrollment_token_create(site=site, created_by=operator, ttl=timedelta(days=30))
    enrolled = node_enroll(token_value=value, host={"hostname": node.hostname}, now=NOW).node
    assert (enrolled.pk, enrolled.lifecycle, enrolled.installed_at) == (node.pk, NodeLifecycle.BURN_IN, NOW)
    # Enrolling again later (an agent reinstalled by hand) keeps its books and its stage.
    _token, value = enrollment_token_create(site=site, created_by=operator, ttl=timedelta(days=30))
    again = node_enroll(token_value=value, host={"hostname": node.hostname}, now=NOW + timedelta(days=3)).node
    assert (again.lifecycle, again.installed_at) == (NodeLifecycle.BURN_IN, NOW)


def test_the_site_page_shows_the_bring_up(client, site, planned):
    client.force_login(ViewerFactory())
    page = client.get("/sites/dfw2/").content.decode()
    assert 'data-testid="gpus-sellable">15 / 32<' in page
    assert 'data-stage="burn_in">1<' in page and 'data-stage="planned">1<' in page
    assert "fig-bringup-timeline" in page
    assert "Edit the bring-up plan" not in page  # a viewer reads, an operator admin edits


def test_the_fleet_page_shows_a_bring_up_under_way(client, site, planned):
    client.force_login(ViewerFactory())
    page = client.get("/fleet/").content.decode()
    assert 'data-testid="bringup-dfw2"' in page
    assert "15 of 32 planned GPUs sellable" in page


def test_an_operator_admin_saves_the_plan_and_bad_input_names_the_field(client, site):
    operator = OperatorFactory()
    client.force_login(operator)
    response = client.post("/sites/dfw2/plan/", {"started_on": "2026-11-01", "target_days": "0",
                                                  "soak_minutes": "30"})
    assert response.status_code == 400 and "target_days" in response.content.decode()
    assert site_bringup(site=site) is None
    response = client.post("/sites/dfw2/plan/", {"started_on": "2026-11-01", "target_days": "90",
                                                  "soak_minutes": "30"})
    assert response.status_code == 302
    assert site_bringup(site=site).plan.started_on == date(2026, 11, 1)
    assert AuditEntry.objects.filter(action="bringup.plan_set", actor=operator).count() == 1
    client.post("/sites/dfw2/plan/lines/", {"gpu_model": H100, "nodes": "2", "gpus_per_node": "8"})
    line = site_bringup(site=site).plan.lines.get()
    response = client.post("/sites/dfw2/plan/nodes/", {"line": str(line.pk), "hostnames": "dfw2-a\nbad name"})
    assert response.status_code == 400 and "Not a valid hostname: bad name" in response.content.decode()
    response = client.post("/sites/dfw2/plan/nodes/", {"line": str(line.pk), "hostnames": "dfw2-a\ndfw2-b"})
    assert response.status_code == 302
    assert sorted(site.nodes.values_list("hostname", "lifecycle")) == [("dfw2-a", "planned"), ("dfw2-b", "planned")]


def test_a_viewer_cannot_change_the_plan(client, site):
    client.force_login(ViewerFactory())
    assert client.post("/sites/dfw2/plan/", {"started_on": "2026-11-01", "target_days": "90",
                                             "soak_minutes": "30"}).status_code == 403
    assert site_bringup(site=site) is None


@pytest.mark.usefixtures("planned")
def test_a_retired_node_is_counted_apart_from_the_plan(site):
    NodeFactory(site=site, hostname="old", lifecycle=NodeLifecycle.RETIRED)
    stages = site_bringup(site=site, now=NOW).stages
    assert (stages["retired"], stages["planned"]) == (1, 1)
