import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.db.models import Sum
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from portal.charts import TIME_AXIS
from portal.economics.models import CostHour
from portal.economics.selectors import site_costs
from portal.economics.services import cost_hours_attribute
from portal.fleet.models import Gpu, MigInstance
from portal.telemetry.models import GpuHour, GpuMinute, GpuSample, RollupWatermark, SiteHour
from portal.telemetry.rollups import rollup_hours, rollup_minutes
from tests.factories import (
    PASSWORD,
    GpuFactory,
    NodeFactory,
    OperatorFactory,
    SiteFactory,
    batch_payload,
    engine_payload,
    gpu_payload,
    gpu_uuid,
    node_with_credential,
)
from tests.test_ingest import post

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator_client(client):
    client.login(username=OperatorFactory().username, password=PASSWORD)
    return client


def test_it_shows_the_mean_utilization_of_online_gpus(operator_client):
    _node, cred = node_with_credential()
    body = batch_payload(seq=1, gpus=[gpu_payload(uuid=gpu_uuid(), index=0, util=30.0),
                                      gpu_payload(uuid=gpu_uuid(), index=1, util=90.0)])
    assert post(operator_client, body, cred).status_code == 200
    page = operator_client.get("/fleet/")
    assert page.context["headline"].util_now == 60.0
    assert page.context["headline"].gpus_online == 2
    assert '<span class="value" data-testid="util-now">60.0%</span>' in page.content.decode()


def test_it_computes_cost_per_million_tokens_from_energy_and_tokens():
    site = SiteFactory(gpu_capex=Decimal("30000"), depreciation_months=48, energy_price_kwh=Decimal("0.12"),
                       pue=Decimal("1.3"), other_opex_gpu_hour=Decimal("0.25"), currency="USD")
    hour = datetime(2026, 11, 20, 10, tzinfo=UTC)
    # 8 GPUs for one hour at 500 W (14.4 kWh in all), 50% busy, serving 10 million tokens; nobody holds them.
    node = NodeFactory(site=site)
    for i in range(8):
        GpuHour.objects.create(gpu=GpuFactory(node=node, index=i), ts=hour, seconds=3600, util_mean=50.0,
                               energy_mj=1_800 * 3_600_000)
    SiteHour.objects.create(site=site, ts=hour, prompt_tokens=7_000_000, generation_tokens=3_000_000)
    cost_hours_attribute(hours=[hour], now=hour + timedelta(days=1))
    (period,) = site_costs(start=hour, end=hour + timedelta(hours=1))
    places = Decimal("0.00000001")
    capex = (Decimal(8 * 30000) / (48 * Decimal("730.5"))).quantize(places)  # 6.8446...
    opex = Decimal("2.00")
    energy = Decimal("14.4") * Decimal("1.3") * Decimal("0.12")  # 2.2464
    assert period.cost.capex == capex
    assert period.cost.energy == energy and period.cost.opex == opex
    assert period.cost.per_million_tokens == ((capex + opex + energy) / 10).quantize(Decimal("0.0001"))
    assert period.cost.per_million_tokens == Decimal("1.1091")
    assert period.cost.utilization == 0.5
    assert period.cost.idle == capex + opex + energy  # no tenant held them: all of it is idle capacity
    assert period.cost.not_busy == (capex + opex) / 2
    assert period.cost.tokens_per_unit == int(10_000_000 / (capex + opex + energy))


def test_it_counts_a_silent_gpu_as_not_busy():
    site = SiteFactory()
    hour = datetime(2026, 11, 20, 10, tzinfo=UTC)
    node = NodeFactory(site=site)
    gpus = [GpuFactory(node=node, index=i) for i in range(4)]
    for gpu in gpus[:2]:  # two report full load, two report nothing at all
        GpuHour.objects.create(gpu=gpu, ts=hour, seconds=3600, util_mean=100.0, energy_mj=0)
    cost_hours_attribute(hours=[hour], now=hour + timedelta(days=1))
    (period,) = site_costs(start=hour, end=hour + timedelta(hours=1))
    cost = period.cost
    assert cost.gpu_hours == 4 and cost.utilization == 0.5
    assert cost.per_million_tokens is None and cost.tokens_per_unit == 0


def test_it_rolls_site_hours_for_the_economics_pages(client):
    node, cred = node_with_credential()
    uuids = [gpu_uuid(), gpu_uuid()]
    start = (int(time.time()) // 3600) * 3600 - 3600
    for seq in range(1, 4):
        gpus = [gpu_payload(uuid=u, index=i, util=40.0, power=500.0) for i, u in enumerate(uuids)]
        engines = [engine_payload(prompt=600, generation=400)]
        body = batch_payload(seq=seq, end=start + 10 * seq, gpus=gpus, engines=engines)
        assert post(client, body, cred).status_code == 200
    later = datetime.now(tz=UTC) + timedelta(seconds=10)
    rollup_minutes(now=later)
    rollup_hours(now=later)
    site_hour = SiteHour.objects.get(site=node.site)
    assert (site_hour.prompt_tokens, site_hour.generation_tokens, site_hour.requests) == (1800, 1200, 15)
    # The GPUs are on the books from their first reported interval, the start of the hour: two whole GPU-hours.
    hour = datetime.fromtimestamp(start, tz=UTC)
    capacity = CostHour.objects.filter(site=node.site, ts=hour).aggregate(
        g=Sum("gpu_hours"), b=Sum("busy_gpu_hours"), k=Sum("energy_kwh"))
    assert capacity["g"] == 2
    assert capacity["k"] == (Decimal(2 * 3 * 5_000_000) / Decimal(3_600_000_000)).quantize(Decimal("0.00000001"))
    assert capacity["b"] == (2 * Decimal("0.4") * Decimal(30) / Decimal(3600)).quantize(Decimal("0.00000001"))


def _fleet(nodes: int):
    site = SiteFactory()
    for _ in range(nodes):
        node = NodeFactory(site=site)
        gpus = Gpu.objects.bulk_create(Gpu(node=node, uuid=gpu_uuid(), index=i, name="NVIDIA H100 80GB HBM3",
                                           current_util=50.0, mig_mode=i == 7) for i in range(8))
        MigInstance.objects.create(gpu=gpus[7], gi_id=1, profile="3g.40gb")
        MigInstance.objects.create(gpu=gpus[7], gi_id=2, profile="4g.40gb")


def _queries(client, url: str) -> int:
    with CaptureQueriesContext(connection) as ctx:
        assert client.get(url).status_code == 200
    return len(ctx.captured_queries)


def test_the_fleet_page_query_count_does_not_grow_with_the_fleet(operator_client):
    _fleet(2)
    small = _queries(operator_client, "/fleet/")
    _fleet(10)
    assert _queries(operator_client, "/fleet/") == small
    # incl. the set-aside batch count, per period the site tokens beside their cost, (no raw sample yet) the
    # tokens of the last rolled-up minute, the sites' bring-up plans (none here) and goodput (the active tenants,
    # whom the rest of its reads take together: no tenant here)
    assert small == 28


def test_the_node_page_query_count_does_not_grow_with_history(operator_client):
    node, cred = node_with_credential()
    uuids = [gpu_uuid() for _ in range(8)]
    now = time.time()
    for seq in range(1, 4):
        gpus = [gpu_payload(uuid=u, index=i) for i, u in enumerate(uuids)]
        post(operator_client, batch_payload(seq=seq, end=now - 30 + 10 * seq, gpus=gpus, engines=[engine_payload()]),
             cred)
    RollupWatermark.objects.create(name="attribution", stored_until=timezone.now())  # cost attributed up to now
    counts = {key: _queries(operator_client, f"/fleet/nodes/{node.pk}/?range={key}") for key in ("1h", "24h", "30d")}
    GpuHour.objects.bulk_create(GpuHour(gpu_id=g, ts=datetime(2026, 10, 1, tzinfo=UTC) + timedelta(hours=h),
                                        seconds=3600, util_mean=50) for g in Gpu.objects.values_list("pk", flat=True)
                                for h in range(200))
    assert {key: _queries(operator_client, f"/fleet/nodes/{node.pk}/?range={key}") for key in counts} == counts
    # the page's own reads (the newest batch among them), then the 30-day cost: where attribution has reached,
    # and twice (the partial first day; the days not kept in the cache and today) the GPUs on the books, their
    # hours, allocations, deployments, sites and the node's usage tiers, and its open cordons; cold cache or
    # warm, the same reads
    assert set(counts.values()) == {25}  # the 30-day cost is attributed hour by hour, as the books are


def test_the_node_charts_read_the_tier_of_their_range(operator_client):
    node, cred = node_with_credential()
    uuid = gpu_uuid()
    post(operator_client, batch_payload(seq=1, gpus=[gpu_payload(uuid=uuid, util=33.0)]), cred)
    gpu = Gpu.objects.get(uuid=uuid)
    now = datetime.now(tz=UTC)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # whole milliseconds: the chart's unit
    GpuMinute.objects.create(gpu=gpu, ts=now - timedelta(hours=2), seconds=60, util_mean=44.0)
    GpuHour.objects.create(gpu=gpu, ts=now - timedelta(days=3), seconds=3600, util_mean=55.0)

    def utils(range_key):
        page = operator_client.get(f"/fleet/nodes/{node.pk}/?range={range_key}", HTTP_HX_REQUEST="true")
        (chart,) = [c for c in page.context["charts"] if c["id"] == "chart-util"]
        return [y for trace in chart["figure"]["data"] for y in trace["y"]], page

    assert utils("1h")[0] == [33.0]
    values, page = utils("24h")
    assert values == [44.0]
    (chart,) = [c for c in page.context["charts"] if c["id"] == "chart-util"]
    # Times travel as epoch milliseconds on a date axis.
    assert chart["figure"]["data"][0]["x"] == [round((now - timedelta(hours=2)).timestamp() * 1000)]
    assert chart["figure"]["layout"]["xaxis"] == TIME_AXIS
    values, page = utils("7d")
    assert values == [55.0]
    text = page.content.decode()
    assert "Read from the hourly rollups" in text and "<html" not in text  # the htmx partial only
    assert GpuSample.objects.count() == 1


def test_it_answers_a_poll_with_304_when_nothing_changed(operator_client):
    _node, cred = node_with_credential()
    post(operator_client, batch_payload(seq=1, gpus=[gpu_payload(uuid=gpu_uuid())]), cred)
    first = operator_client.get("/fleet/", HTTP_HX_REQUEST="true")
    assert first.status_code == 200 and "<html" not in first.content.decode()
    etag = first["ETag"]
    assert operator_client.get("/fleet/", HTTP_HX_REQUEST="true", HTTP_IF_NONE_MATCH=etag).status_code == 304
    post(operator_client, batch_payload(seq=2, gpus=[gpu_payload(uuid=Gpu.objects.get().uuid)]), cred)
    assert operator_client.get("/fleet/", HTTP_HX_REQUEST="true", HTTP_IF_NONE_MATCH=etag).status_code == 200


def test_the_economics_page_shows_each_currency(operator_client):
    usd, eur = SiteFactory(currency="USD"), SiteFactory(currency="EUR")
    hour = (datetime.now(tz=UTC) - timedelta(hours=3)).replace(minute=0, second=0, microsecond=0)
    for site in (usd, eur):
        node = NodeFactory(site=site)
        for i in range(8):
            GpuHour.objects.create(gpu=GpuFactory(node=node, index=i), ts=hour, seconds=3600, util_mean=70.0,
                                   energy_mj=10**10 // 8)
        SiteHour.objects.create(site=site, ts=hour, prompt_tokens=10**7, generation_tokens=10**7)
    cost_hours_attribute(hours=[hour])
    page = operator_client.get("/economics/?period=7d")
    assert set(page.context["totals"]) == {"EUR", "USD"}
    text = page.content.decode()
    usd_cost = page.context["totals"]["USD"].per_million_tokens
    assert f'data-testid="cost-per-mtok-USD">USD {usd_cost}</span>' in text
    assert page.context["figures"]["curve"]["data"][0]["x"] == [70.0]


def test_the_fleet_tiles_count_what_the_pages_they_summarise_count(operator_client):
    from portal.alerts.services import alert_acknowledge, alert_raise, alert_resolve
    from portal.fleet.models import NodeStatus

    at = timezone.now()
    opened = [alert_raise(key=f"k{i}", kind="xid", severity="critical", title=f"XID {i}", at=at) for i in range(3)]
    operator = operator_client.get("/fleet/").context["user"]
    alert_acknowledge(alert_id=opened[1].pk, by=operator)
    alert_resolve(alert_id=opened[2].pk, by=operator)
    _fleet(2)
    NodeFactory(status=NodeStatus.DECOMMISSIONED, site=Gpu.objects.first().node.site)  # history, not the fleet
    page = operator_client.get("/fleet/")
    headline = page.context["headline"]
    tabs = operator_client.get("/alerts/").context["counts"]
    assert (headline.alerts["open"], headline.alerts["acknowledged"]) == (tabs["open"], tabs["acknowledged"]) == (1, 1)
    grid_gpus = sum(len(n.gpus) for site in page.context["grids"] for n in site.nodes)
    assert headline.gpus_total == grid_gpus == 16
    assert "decommissioned" not in headline.nodes_by_status
    text = page.content.decode()
    assert 'data-testid="open-alerts">1</a>' in text and "· 1 acknowledged" in text


def test_node_charts_name_their_units_and_keep_their_labels_level(operator_client):
    node, cred = node_with_credential()
    post(operator_client, batch_payload(seq=1, gpus=[gpu_payload(uuid=gpu_uuid(), util=50.0)]), cred)
    charts = operator_client.get(f"/fleet/nodes/{node.pk}/?range=1h", HTTP_HX_REQUEST="true").context["charts"]
    assert [c["title"] for c in charts] == ["Utilization (%)", "Memory used (GiB)", "Power (W)",
                                            "Temperature (°C)", "Tokens per second (input + output)"]
    memory = next(c for c in charts if c["id"] == "chart-memory")
    assert memory["figure"]["data"][0]["y"][0] < 100  # GiB (the agent reports MiB), not "71.7705k" MiB
    for chart in charts:
        layout = chart["figure"]["layout"]
        assert layout["xaxis"]["tickangle"] == 0 and layout["xaxis"]["automargin"] is True
        assert layout["legend"]["y"] < 0 and "tickformat" in layout["yaxis"] and "title" not in layout["yaxis"]
