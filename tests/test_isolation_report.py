"""The isolation report: units, co-tenants and CC mode per tenant; the noisy-neighbour view checked hour by hour
against hand-computed figures; who may read it and what each reader is told."""

from datetime import datetime, timedelta

import numpy
import pytest
from django.utils import timezone

from portal.capacity.isolation import isolation_for_tenant, noisy_neighbours, noisy_window
from portal.capacity.isolation_charts import noisy_neighbours_chart
from portal.capacity.services import allocation_create, deployment_create
from portal.demo.seed import seed_demo
from portal.fleet.models import MigInstance, ServingEndpoint
from portal.hours import HOUR, hour_floor
from portal.telemetry.models import GpuHour, UsageHour, UsageMinute
from portal.tenants.models import MemberRole, Tenant
from tests.factories import PASSWORD, GpuFactory, MembershipFactory, NodeFactory, OperatorFactory, TenantFactory

pytestmark = pytest.mark.django_db

LE = [0.1, 0.25, 0.5, 1.0]
# Acme's TTFT buckets per whole hour (cumulative, +Inf last) and the p95 each gives by Prometheus' interpolation:
# h0 rank 95 in (0.25, 0.5]: 0.25 + 0.25 x (95 - 90) / 10 = 0.375; h1 in (0.5, 1.0]: 0.5 + 0.5 x 15 / 20 = 0.875;
# h2: 0.5 + 0.5 x 45 / 50 = 0.95.
ACME_TTFT = ([50, 90, 100, 100, 100], [10, 40, 80, 100, 100], [0, 0, 50, 100, 100])
ACME_P95 = (0.375, 0.875, 0.95)
# Co-tenants' tokens per hour (prompt, generation): Globex's deployment holds 2g on the shared GPU and a whole GPU
# beside it, so 2/7 of its 9/7 (2/9) counts; Umbrella's runs on its 1g only.
GLOBEX_TOKENS = ((18000, 14400), (40000, 24800), (50000, 47200))  # 32400, 64800, 97200 -> x 2/9 = 7200, 14400, 21600
UMBRELLA_TOKENS = ((1800, 1800), (3600, 3600), (7200, 7200))  # 3600, 7200, 14400
CO_TOKENS_PER_S = (3.0, 6.0, 10.0)  # (7200 + 3600) / 3600, (14400 + 7200) / 3600, (21600 + 14400) / 3600
POWER_W = (300.0, 350.0, 400.0)


class World:
    """One MIG GPU shared by three tenants: Acme AI 3g.40gb (GI 2), Globex 2g.20gb (GI 3) and 1g.10gb (GI 9),
    Umbrella 1g.10gb (GI 10); Acme also holds a whole GPU elsewhere. Three past hours of usage and power."""

    def __init__(self, *, now: datetime, current_minutes: bool = False) -> None:
        self.now = now
        self.h0 = hour_floor(now) - 3 * HOUR
        since = self.h0 - 24 * HOUR
        self.acme = TenantFactory(name="Acme AI", slug="acme")
        self.globex = TenantFactory(name="Globex Research", slug="globex")
        self.umbrella = TenantFactory(name="Umbrella Health", slug="umbrella")
        self.node = NodeFactory(hostname="iad1-h100-10")
        self.gpu = GpuFactory(node=self.node, index=3, mig_mode=True, cc_mode="off")
        self.beside = GpuFactory(node=self.node, index=4, cc_mode="off")
        self.elsewhere = GpuFactory(node=NodeFactory(hostname="iad1-h100-02"), index=0, cc_mode="")
        mig = {gi: MigInstance.objects.create(gpu=self.gpu, gi_id=gi, profile=profile)
               for gi, profile in ((2, "3g.40gb"), (3, "2g.20gb"), (9, "1g.10gb"), (10, "1g.10gb"))}

        def hold(tenant, gpu, gi=None):
            return allocation_create(tenant=tenant, gpu=gpu, mig_instance=mig[gi] if gi else None, starts_at=since)

        self.acme_mig = hold(self.acme, self.gpu, 2)
        self.acme_whole = hold(self.acme, self.elsewhere)
        globex = [hold(self.globex, self.gpu, 3), hold(self.globex, self.gpu, 9), hold(self.globex, self.beside)]
        umbrella = [hold(self.umbrella, self.gpu, 10)]
        acme = self._deploy(self.acme, "acme-llama", 8000, [self.acme_mig], since)
        self._deploy(self.acme, "acme-elsewhere", 8001, [self.acme_whole], since, node=self.elsewhere.node)
        globex_ep = self._deploy(self.globex, "globex-secret-mistral", 8002, [globex[0], globex[2]], since)
        self._deploy(self.globex, "globex-idle", 8003, [globex[1]], since)
        umbrella_ep = self._deploy(self.umbrella, "umbrella-secret", 8004, umbrella, since)
        for k in range(3):
            ts = self.h0 + k * HOUR
            UsageHour.objects.create(endpoint=acme, ts=ts, requests_ok=100,
                                     ttft={"le": LE, "counts": ACME_TTFT[k], "sum": 40.0})
            for endpoint, tokens in ((globex_ep, GLOBEX_TOKENS), (umbrella_ep, UMBRELLA_TOKENS)):
                UsageHour.objects.create(endpoint=endpoint, ts=ts, prompt_tokens=tokens[k][0],
                                         generation_tokens=tokens[k][1])
            GpuHour.objects.create(gpu=self.gpu, ts=ts, seconds=3600, power_mean_w=POWER_W[k])
            GpuHour.objects.create(gpu=self.elsewhere, ts=ts, seconds=3600, power_mean_w=690.0)  # not shared
        if current_minutes:
            # The current hour, 30 minutes in, from the minute tier: Acme's two minutes merge to
            # [10, 30, 40, 40, 40]: rank 38 in (0.25, 0.5]: 0.25 + 0.25 x (38 - 30) / 10 = 0.45.
            h3 = hour_floor(now)
            for minute, counts in ((5, [10, 20, 20, 20, 20]), (10, [0, 10, 20, 20, 20])):
                UsageMinute.objects.create(endpoint=acme, ts=h3 + timedelta(minutes=minute), requests_ok=20,
                                           ttft={"le": LE, "counts": counts, "sum": 5.0})
            UsageMinute.objects.create(endpoint=umbrella_ep, ts=h3 + timedelta(minutes=5), prompt_tokens=900,
                                       generation_tokens=900)  # 1800 tokens over 1800 s: 1.0 tokens/s

    def _deploy(self, tenant, name, port, allocations, since, node=None):
        node = node or self.node
        url = f"http://127.0.0.1:{port}/metrics"
        deployment_create(tenant=tenant, name=name, model_name="mistralai/Mistral-7B-Instruct-v0.3", engine="vllm",
                          node=node, metrics_url=url, allocations=allocations, active_from=allocations[0].starts_at)
        return ServingEndpoint.objects.create(node=node, url=url, model="mistralai/Mistral-7B-Instruct-v0.3",
                                              engine="vllm", up=True)


@pytest.fixture
def world():
    return World(now=datetime.fromisoformat("2026-03-02T12:30:00+00:00"), current_minutes=True)


def shared_view(unit):
    return (unit.profile, unit.gi_id, unit.slices, unit.own_slices_on_gpu, unit.other_tenants, unit.other_slices,
            unit.free_slices, unit.shared_label)


def test_it_tells_each_tenant_on_a_shared_mig_gpu_how_many_others_hold_how_many_slices(world):
    acme = isolation_for_tenant(tenant=world.acme, now=world.now, viewer_is_operator=False)
    globex = isolation_for_tenant(tenant=world.globex, now=world.now, viewer_is_operator=False)
    umbrella = isolation_for_tenant(tenant=world.umbrella, now=world.now, viewer_is_operator=False)
    assert [shared_view(u) for u in acme.units] == [
        (None, None, 7, 7, 0, 0, 0, "not shared: the whole GPU"),  # iad1-h100-02 sorts first
        ("3g.40gb", 2, 3, 3, 2, 4, 0, "2 other tenants, 4 of 7 slices"),
    ]
    assert [shared_view(u) for u in globex.units] == [
        ("2g.20gb", 3, 2, 3, 2, 4, 0, "2 other tenants, 4 of 7 slices"),
        ("1g.10gb", 9, 1, 3, 2, 4, 0, "2 other tenants, 4 of 7 slices"),
        (None, None, 7, 7, 0, 0, 0, "not shared: the whole GPU"),  # GPU 4 beside it
    ]
    assert [shared_view(u) for u in umbrella.units] == [
        ("1g.10gb", 10, 1, 1, 2, 6, 0, "2 other tenants, 6 of 7 slices")]
    assert [u.neighbours for r in (acme, globex, umbrella) for u in r.units] == [[]] * 6
    assert [(u.node, u.gpu_index, u.cc_mode, u.deployments) for u in acme.units] == [
        ("iad1-h100-02", 0, "", ["acme-elsewhere"]), ("iad1-h100-10", 3, "off", ["acme-llama"])]
    assert (acme.shared_units, acme.cc_counts) == (1, {"not reported": 1, "off": 1})


def test_it_names_the_co_tenants_and_their_slices_to_operators(world):
    acme = isolation_for_tenant(tenant=world.acme, now=world.now, viewer_is_operator=True)
    assert [[(n.name, n.slices) for n in u.neighbours] for u in acme.units] == [
        [], [("Globex Research", 3), ("Umbrella Health", 1)]]


def test_it_counts_no_neighbour_whose_allocation_has_ended(world):
    world.acme_mig.refresh_from_db()
    umbrella = world.umbrella.allocations.get()
    umbrella.ends_at = world.now - HOUR
    umbrella.save(update_fields=["ends_at"])
    unit = isolation_for_tenant(tenant=world.acme, now=world.now, viewer_is_operator=False).units[1]
    assert (unit.other_tenants, unit.other_slices, unit.free_slices) == (1, 3, 1)


def test_it_sets_each_hours_latency_against_the_co_tenants_load(world):
    view = noisy_neighbours(tenant=world.acme, start=world.h0, end=world.now, now=world.now)
    assert (view.shared_gpus, view.co_tenants, view.co_tenant_names) == (1, 2, [])
    got = [(h.hour, h.ttft_p95_s, h.requests, h.co_tokens_per_s, h.gpu_power_w) for h in view.hours]
    expected = [(world.h0 + k * HOUR, ACME_P95[k], 100, CO_TOKENS_PER_S[k], POWER_W[k]) for k in range(3)]
    expected.append((world.h0 + 3 * HOUR, 0.45, 40, 1.0, None))
    assert [(h, pytest.approx(p), r, pytest.approx(t), w) for h, p, r, t, w in got] == expected
    latency, load = [*ACME_P95, 0.45], [*CO_TOKENS_PER_S, 1.0]
    assert view.correlation == pytest.approx(numpy.corrcoef(latency, load)[0, 1])
    assert view.correlation == pytest.approx(0.8967, abs=1e-4)


def test_it_names_the_co_tenants_of_the_noisy_view_to_operators_only(world):
    view = noisy_neighbours(tenant=world.umbrella, start=world.h0, end=world.now, now=world.now,
                            viewer_is_operator=True)
    assert (view.co_tenants, view.co_tenant_names) == (2, ["Acme AI", "Globex Research"])


def test_it_draws_the_hours_as_the_table_gives_them(world):
    figure = noisy_neighbours_chart(noisy_neighbours(tenant=world.acme, start=world.h0, end=world.now,
                                                     now=world.now))
    bars, line = figure["data"]
    assert bars["y"] == [3.0, 6.0, 10.0, 1.0] and bars["yaxis"] == "y2"
    assert line["y"] == [0.375, 0.875, 0.95, 0.45]
    assert line["x"][0] == "2026-03-02T09:00Z" and figure["layout"]["yaxis2"]["overlaying"] == "y"


def test_it_has_no_noisy_view_for_a_tenant_alone_on_its_gpus(world):
    loner = TenantFactory(name="Initech Labs")
    allocation_create(tenant=loner, gpu=GpuFactory(mig_mode=True), starts_at=world.h0)
    view = noisy_neighbours(tenant=loner, start=world.h0, end=world.now, now=world.now)
    assert (view.shared_gpus, view.co_tenants, view.correlation) == (0, 0, None)
    assert {h.co_tokens_per_s for h in view.hours} == {None}


@pytest.fixture
def live_world():
    """The world in the real present (pages read timezone.now()): three whole hours before the current one."""
    return World(now=timezone.now())


def login(client, user):
    assert client.login(username=user.username, password=PASSWORD)


def page(client, url):
    response = client.get(url)
    return response.status_code, response.content.decode()


def test_it_shows_a_member_its_own_units_and_never_another_tenants_name(client, live_world):
    member = MembershipFactory(tenant=live_world.acme, role=MemberRole.MEMBER).user
    login(client, member)
    status, html = page(client, "/tenant/acme/isolation/")
    assert status == 200
    assert "2 other tenants, 4 of 7 slices" in html and "MIG 3g.40gb" in html and "acme-llama" in html
    for secret in ("Globex", "Umbrella", "globex-secret-mistral", "umbrella-secret"):
        assert secret not in html
    assert "r = " in html and "0.875 s" in html and "6.0" in html  # the noisy-neighbour table's second hour
    status, html = page(client, "/tenant/acme/")
    assert 'href="/tenant/acme/isolation/"' in html


def test_it_answers_404_to_outsiders_and_operators_on_the_tenant_page(client, live_world):
    outsider = MembershipFactory(tenant=TenantFactory(slug="initech")).user
    login(client, outsider)
    assert page(client, "/tenant/acme/isolation/")[0] == 404
    client.logout()
    login(client, OperatorFactory())
    assert page(client, "/tenant/acme/isolation/")[0] == 404


def test_it_shows_operators_the_co_tenants_names(client, live_world):
    login(client, OperatorFactory())
    status, html = page(client, f"/tenants/{live_world.acme.pk}/isolation/")
    assert status == 200
    assert "Globex Research (3 slices), Umbrella Health (1 slice)" in html
    assert "(Globex Research, Umbrella Health)" in html  # the noisy-neighbour summary
    status, html = page(client, f"/tenants/{live_world.acme.pk}/")
    assert f'href="/tenants/{live_world.acme.pk}/isolation/"' in html


def test_it_refuses_the_operator_page_to_tenant_users_and_sends_anonymous_visitors_to_log_in(client, live_world):
    response = client.get(f"/tenants/{live_world.acme.pk}/isolation/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
    login(client, MembershipFactory(tenant=live_world.acme).user)
    assert page(client, f"/tenants/{live_world.acme.pk}/isolation/")[0] == 403


def test_it_shows_believable_figures_from_the_first_demo(tmp_path):
    """`make demo`'s seed: one MIG GPU of iad1-h100-10 shared by three tenants, CC on for some H100 nodes (as their
    simulated agents report it), and a day of latency against the neighbours' load."""
    seed_demo(days=1, minute_hours=1, agents_dir=tmp_path, portal_url="http://127.0.0.1:8000")
    now = timezone.now()
    acme = Tenant.objects.get(slug="acme")
    report = isolation_for_tenant(tenant=acme, now=now, viewer_is_operator=True)
    (shared,) = [u for u in report.units if u.other_tenants]
    assert (shared.node, shared.gpu_index, shared.profile, shared.shared_label, shared.free_slices) == (
        "iad1-h100-10", 3, "2g.20gb", "2 other tenants, 3 of 7 slices", 2)
    assert [(n.name, n.slices) for n in shared.neighbours] == [("Globex Research", 2), ("Umbrella Health", 1)]
    assert set(report.cc_counts) == {"on", "off"}
    assert {u.node for u in report.units if u.cc_mode == "on"} == {"iad1-h100-05"}
    start, end = noisy_window(now=now)
    view = noisy_neighbours(tenant=acme, start=start, end=end, now=now)
    measured = [h for h in view.hours if h.ttft_p95_s is not None and h.co_tokens_per_s is not None]
    assert (view.shared_gpus, view.co_tenants) == (1, 2) and len(measured) >= 20
    assert all(0.01 < h.ttft_p95_s < 5 and h.co_tokens_per_s > 0 and h.gpu_power_w > 60 for h in measured)
