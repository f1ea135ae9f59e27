"""The demo factory: `make demo` seeds it, so every page must show true, non-empty figures from it."""

from collections import defaultdict
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from agents import config as cfgmod
from agents.simulate import SimEngines
from portal.alerts.models import Alert
from portal.billing.models import Invoice
from portal.capacity.models import Allocation, Deployment
from portal.capacity.selectors import usage_for_tenant
from portal.demo.seed import DEMO_PASSWORD, history_start, seed_demo
from portal.economics.books import month_of
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
    # 16 nodes serving since the history began, and FRA-1's two arrived today (one with a GPU missing).
    assert summary == {"nodes": 18, "gpus": 143, "tenants": 5, "users": 7}
    assert Node.objects.filter(simulated=True).count() == 18
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


def test_reconcile_finds_no_break_in_the_demo_books(demo, capsys):
    now = timezone.now()
    for month in sorted({month_of(history_start(now, 2)), month_of(now)}):
        call_command("reconcile", "--month", f"{month:%Y-%m}")
        out = capsys.readouterr().out
        assert out.rstrip().endswith("0 breaks"), out
        assert "break(s)" not in out and "checked, ok" in out


def test_every_page_shows_the_figures_the_invoices_and_the_books_use(demo, client):
    """One period, every page: a site's nodes add up to the site, a tenant's tokens are the same on the economics
    page, its own usage and overview pages and its invoices, and the P&L's revenue is the invoices' lines."""
    assert client.login(username="operator", password=DEMO_PASSWORD)
    economics = client.get("/economics/?period=30d").context  # the demo's two days of history lie inside
    # Stored attribution rows carry 8 places (SQLite sums them as floats); the node page sums unrounded shares of
    # the same GPU-hours. Money is shown to the cent.
    close = Decimal("0.0001")
    for period in economics["sites"]:
        nodes = [client.get(f"/fleet/nodes/{node.pk}/").context["cost_30d"]
                 for node in Node.objects.filter(site=period.site)]
        assert abs(sum(n.total for n in nodes) - period.cost.total) < close, period.site.name
        assert abs(sum(n.idle for n in nodes) - period.cost.idle) < close, period.site.name
        assert abs(sum(n.gpu_hours for n in nodes) - period.cost.gpu_hours) < close, period.site.name
        assert sum(n.tokens for n in nodes) == period.cost.tokens > 0, period.site.name

    invoices = list(client.get("/billing/").context["invoices"])
    pnl = client.get("/economics/pnl/").context["lines"]
    invoiced_by_month = {}
    for month in {i.period_start for i in invoices}:
        invoiced = invoiced_by_month[month] = sum(i.total for i in invoices if i.period_start == month)
        reported = sum(line.revenue.get("USD", Decimal(0)) for line in pnl if line.month == month)
        assert reported == invoiced, month
    # Two days of history may not reach into last month (early in a month its invoices are empty): this one counts.
    assert invoiced_by_month[month_of(timezone.now())] > 0
    for period in economics["sites"]:
        assert abs(sum(line.cost.total for line in pnl if line.site == period.site) - period.cost.total) < close

    economics_tokens = defaultdict(int)
    for tenant, _site, cost in economics["tenant_rows"]:
        if tenant is not None:
            economics_tokens[tenant.slug] += cost.tokens
    this_month = month_of(timezone.now())
    for tenant in Tenant.objects.filter(invoices__isnull=False).distinct():
        own = Client()
        assert own.login(username=f"{tenant.slug}-admin", password=DEMO_PASSWORD)
        usage = sum(t.tokens for t in own.get(f"/tenant/{tenant.slug}/usage/?days=30").context["totals"])
        on_invoices = sum(i.tokens for i in own.get(f"/tenant/{tenant.slug}/billing/").context["invoices"])
        assert economics_tokens[tenant.slug] == usage == on_invoices, tenant.slug
        draft = Invoice.objects.get(tenant=tenant, period_start=this_month)
        assert own.get(f"/tenant/{tenant.slug}/").context["overview"].tokens_month == draft.tokens, tenant.slug
