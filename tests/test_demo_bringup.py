"""The demo's bring-up and health story, as an operator and the affected tenant see it after `make demo`."""

import pytest
from django.utils import timezone

from agents import config as cfgmod
from portal.bringup.selectors import site_bringup
from portal.capacity.selectors import replacements_propose
from portal.demo.seed import DEMO_PASSWORD
from portal.fleet.models import Node, NodeLifecycle, Site
from portal.health.catalog import Action
from portal.health.models import Cordon, Incident, TenantNotice
from portal.provisioning.models import JobKind, JobStatus, ProvisioningJob
from portal.sla.models import SlaEvaluation
from tests.test_demo import demo  # noqa: F401 -- the seeded demo

pytestmark = pytest.mark.django_db


def test_frankfurt_is_under_bring_up_with_two_nodes_in_burn_in(demo):  # noqa: F811
    _summary, tmp_path = demo
    bringup = site_bringup(site=Site.objects.get(slug="fra-1"))
    assert bringup.stages == {"planned": 2, "provisioning": 0, "burn_in": 2, "sellable": 6, "cordoned": 0,
                              "retired": 0}
    assert (bringup.planned_gpus, bringup.sellable_gpus) == (80, 48)
    assert bringup.days_elapsed == 17  # the fixture's 2 days of history, plus the 15 days before them
    assert bringup.under_way and bringup.projected_date is not None
    for hostname, step in (("fra1-a100-07", "inventory"), ("fra1-a100-08", "diagnostics")):
        job = ProvisioningJob.objects.get(node__hostname=hostname, kind=JobKind.BURN_IN)
        assert job.status == JobStatus.FAILED
        assert job.steps.get(key=step).status == "failed" and job.error
    # The node missing a GPU has an agent that finds seven: the inventory's failure is what the fleet shows.
    config = cfgmod.load(tmp_path / "agents" / "fra1-a100-07" / "agent.toml", env={})
    assert config.simulate.gpus == 7 == Node.objects.get(hostname="fra1-a100-07").gpus.count()
    assert not (tmp_path / "agents" / "fra1-a100-09").exists()  # planned: no machine yet


def test_a_held_gpu_is_cordoned_with_its_incident_notice_sla_marks_and_replacement(demo):  # noqa: F811
    cordon = Cordon.objects.get(ended_at__isnull=True)
    incident = cordon.incident
    assert (incident.xid, incident.action, incident.events) == (48, Action.CORDON_GPU, 3)
    assert incident.closed_at == incident.last_event_at + timezone.timedelta(minutes=incident.quiet_minutes)
    assert (cordon.node.hostname, cordon.gpu.index, cordon.node.lifecycle) == ("iad1-h100-01", 2,
                                                                               NodeLifecycle.SELLABLE)
    notice = TenantNotice.objects.get(incident=incident)
    assert (notice.unit, notice.tenant.slug) == ("GPU 2 of iad1-h100-01", "acme")
    assert SlaEvaluation.objects.filter(tenant=notice.tenant, incident=incident).exists()
    [replacement] = replacements_propose()
    assert replacement.allocation.tenant == notice.tenant and replacement.proposal is not None
    assert replacement.proposal.gpu.name == cordon.gpu.name and replacement.proposal.gpu != cordon.gpu
    assert Incident.objects.filter(xid=48).count() == 1


def test_the_pages_show_the_story(demo, client):  # noqa: F811
    assert client.login(username="operator", password=DEMO_PASSWORD)
    for url, expected in (
        ("/fleet/", "Frankfurt FRA-1</a>: bring-up day 17 of 90"),
        ("/sites/fra-1/", 'data-testid="gpus-sellable">48 / 80<'),
        ("/health/", "XID 48"),
        ("/capacity/", "Replacement units for cordoned capacity"),
    ):
        page = client.get(url).content.decode()
        assert expected in page, url
    notice = TenantNotice.objects.get()
    client.logout()
    admin = notice.tenant.memberships.get(role="admin").user
    assert client.login(username=admin.username, password=DEMO_PASSWORD)
    page = client.get(f"/tenant/{notice.tenant.slug}/").content.decode()
    assert notice.title in page
    page = client.get(f"/tenant/{notice.tenant.slug}/sla/").content.decode()
    assert "Windows with a health incident" in page and notice.incident.title in page
