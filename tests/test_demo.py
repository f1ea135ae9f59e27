"""The demo factory: `make demo` seeds it, so every page must show true, non-empty figures from it."""

from datetime import timedelta

import pytest
from django.utils import timezone

from agents import config as cfgmod
from agents.simulate import SimEngines
from portal.alerts.models import Alert
from portal.capacity.models import Allocation, Deployment
from portal.capacity.selectors import usage_for_tenant
from portal.demo.seed import DEMO_PASSWORD, seed_demo
from portal.economics.models import CostHour
from portal.fleet.models import Gpu, MigInstance, Node
from portal.telemetry.models import GpuHour, SiteHour, UsageHour
from portal.tenants.models import Tenant

pytestmark = pytest.mark.django_db


@pytest.fixture
def demo(tmp_path):
    summary = seed_demo(days=2, minute_hours=1, agents_dir=tmp_path / "agents", portal_url="http://127.0.0.1:8000")
    return summary, tmp_path


def test_it_seeds_a_realistic_factory(demo):
    summary, tmp_path = demo
    assert summary == {"nodes": 16, "gpus": 128, "tenants": 5, "users": 7}
    assert Node.objects.filter(simulated=True).count() == 16
    assert MigInstance.objects.exists() and Gpu.objects.filter(mig_mode=True).count() == 6
    assert Deployment.objects.count() >= 16 and Allocation.objects.count() > 100
    assert GpuHour.objects.count() >= 128 * 48 and UsageHour.objects.exists() and SiteHour.objects.exists()
    assert CostHour.objects.filter(tenant__isnull=True).exists()  # free capacity shows as idle
    now = timezone.now()
    acme = usage_for_tenant(tenant=Tenant.objects.get(slug="acme"), start=now - timedelta(days=2), end=now)
    assert sum(line.tokens for line in acme) > 10**9
    config = (tmp_path / "agents" / "iad1-h100-03" / "agent.toml").read_text()
    assert 'driver_version = "550.127.05"' in config and "[[targets]]" in config
    assert (tmp_path / "agents" / "iad1-h100-03" / "credential").stat().st_mode & 0o777 == 0o600


def test_the_demo_has_an_unbillable_pilot_its_simulated_agent_keeps_unbillable(demo):
    _summary, tmp_path = demo
    pilot = Deployment.objects.get(name__contains="pilot")
    alert = Alert.objects.get(kind="unbillable_endpoint", resolved_at__isnull=True)
    assert pilot.name in alert.title and pilot.tenant.slug == "initech"
    config = cfgmod.load(tmp_path / "agents" / pilot.node.hostname / "agent.toml", env={})
    assert config.simulate.unbillable == (pilot.metrics_url,)
    readings, _ = SimEngines(config.targets, config.simulate, config.hostname, {}).collect(timezone.now().timestamp())
    (pilot_reading,) = [r for r in readings if r.endpoint == pilot.metrics_url]
    assert pilot_reading.up and pilot_reading.token_families == ()
    assert all(r.token_families for r in readings if r.endpoint != pilot.metrics_url)


def test_every_operator_page_shows_the_demo(demo, client):
    assert client.login(username="operator", password=DEMO_PASSWORD)
    node = Node.objects.get(hostname="iad1-h100-09")
    for url, expected in (
        ("/fleet/", "iad1-h100-09"),
        (f"/fleet/nodes/{node.pk}/", "Held by"),
        ("/economics/?period=7d", "Idle capacity (not allocated)"),
        ("/economics/what-if/", "vs. 50% utilization"),
        ("/capacity/", "Ashburn IAD-1"),
        ("/capacity/deployments/", "Llama-3.1-8B-Instruct"),
    ):
        response = client.get(url)
        assert response.status_code == 200, url
        assert expected in response.content.decode(), url
