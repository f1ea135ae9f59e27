"""The books balance for any history, and the reconciliation finds every break made on purpose.

The property test generates histories a factory lives through: GPUs installed and a node retired mid-period,
whole GPUs and MIG slices, allocations handed from one tenant to another, deployments handed over on the same
node and URL (some backdated, recorded after the hours they cover were attributed), silent hours, usage at any
minute. It attributes them in random chunkings and orders, and checks the invariants with the product's own
reconciliation (portal.economics.books) and that every chunking gives the same rows as one run."""

import random
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command
from django.db import transaction
from django.db.models import F, Sum
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from portal.alerts.models import Alert
from portal.billing.models import ModelPrice, PriceBook
from portal.capacity.models import WHOLE_GPU_SLOTS, Allocation, Deployment
from portal.capacity.selectors import usage_for_tenant
from portal.economics.books import books_alert, books_reconcile
from portal.economics.models import CostHour, DeploymentHour
from portal.economics.services import cost_hours_attribute
from portal.fleet.models import Gpu, MigInstance, Node, ServingEndpoint, Site
from portal.telemetry.models import GpuHour, RollupWatermark, UsageHour, UsageMinute
from portal.tenants.models import Plan, Tenant, TenantStatus
from tests.conftest import bad_parameters
from tests.factories import PASSWORD, OperatorFactory, ViewerFactory, gpu_uuid

pytestmark = pytest.mark.django_db

H0 = datetime(2026, 11, 10, 0, tzinfo=UTC)
HOURS = 6
END = H0 + timedelta(hours=HOURS)
MODEL = "example/model"


class Rollback(Exception):
    pass


def _minute(draw, lo: int = 0, hi: int = HOURS * 60) -> datetime:
    return H0 + timedelta(minutes=draw(st.integers(lo, hi)))


@st.composite
def histories(draw):
    """A plan of a history: plain data, created by build()."""
    gpus = draw(st.integers(1, 3))
    node_in = draw(st.integers(0, 90))
    retired = draw(st.one_of(st.none(), st.integers(node_in + 30, HOURS * 60)))
    units = []
    for g in range(gpus):
        installed = draw(st.integers(node_in, node_in + 60 if retired is None else min(node_in + 60, retired)))
        mig = g == 0 and draw(st.booleans())
        for slot in (("3g.40gb", 1), ("4g.40gb", 2)) if mig else (None,):
            # Consecutive holders of the unit (a handover each time), inside its time on the books.
            cuts = sorted(draw(st.lists(st.integers(installed, retired or HOURS * 60), min_size=0, max_size=4)))
            tenants = draw(st.lists(st.sampled_from([0, 1]), min_size=len(cuts), max_size=len(cuts)))
            ends = [*cuts[1:], None] if cuts else []
            holds = [(a, b, t) for a, b, t in zip(cuts, ends, tenants, strict=True) if b is None or b > a]
            if retired is not None:
                holds = [(a, min(b, retired) if b is not None else retired, t) for a, b, t in holds if a < retired]
            units.append({"gpu": g, "slot": slot, "installed": installed, "holds": holds})
    readings = {(g, h): (draw(st.floats(0, 100)), draw(st.integers(0, 3 * 3_600_000_000)))
                for g in range(gpus) for h in range(HOURS) if draw(st.booleans())}  # the rest are silent
    usage = draw(st.lists(st.tuples(st.integers(0, HOURS * 60 - 1), st.integers(0, 10**6), st.integers(0, 10**6)),
                          max_size=12))
    late = draw(st.booleans())  # deployments recorded after their hours were attributed once
    chunks = draw(st.lists(st.integers(1, HOURS), min_size=1, max_size=HOURS))
    return {"gpus": gpus, "node_in": node_in, "retired": retired, "units": units, "readings": readings,
            "usage": usage, "late": late, "chunks": chunks, "seed": draw(st.integers(0, 2**32))}


def _at(minutes: int | None) -> datetime | None:
    return None if minutes is None else H0 + timedelta(minutes=minutes)


def build(plan: dict) -> tuple[list[Tenant], Node, list[tuple[int, Allocation]]]:
    """The history's inventory, readings, allocations and usage; its deployments are deploy()'s."""
    site = Site.objects.create(name="Books DC", slug="books-dc", currency="USD", gpu_capex=Decimal("35064"),
                               depreciation_months=48, energy_price_kwh=Decimal("0.10"), pue=Decimal("1.5"),
                               other_opex_gpu_hour=Decimal("0.50"))
    node = Node.objects.create(site=site, hostname="books-01", installed_at=_at(plan["node_in"]),
                               retired_at=_at(plan["retired"]))
    price_plan = Plan.objects.create(name="Books plan")
    book = PriceBook.objects.create(plan=price_plan, currency="USD")
    ModelPrice.objects.create(book=book, model_name=MODEL, effective_from=date(2026, 11, 1),
                              input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60"))
    tenants = [Tenant.objects.create(name=f"T{i}", slug=f"t{i}", status=TenantStatus.ACTIVE, plan=price_plan)
               for i in range(2)]
    gpus = {}
    for unit in plan["units"]:
        if unit["gpu"] not in gpus:
            gpus[unit["gpu"]] = Gpu.objects.create(
                node=node, uuid=gpu_uuid(), index=unit["gpu"], name="H100", installed_at=_at(unit["installed"]),
                retired_at=_at(plan["retired"]), mig_mode=unit["slot"] is not None)
    for (g, h), (util, energy) in plan["readings"].items():
        GpuHour.objects.create(gpu=gpus[g], ts=H0 + timedelta(hours=h), seconds=3600, util_mean=util,
                               energy_mj=energy)
    holds = []
    for k, unit in enumerate(plan["units"]):
        mig = None
        if unit["slot"] is not None:
            mig = MigInstance.objects.create(gpu=gpus[unit["gpu"]], gi_id=unit["slot"][1], profile=unit["slot"][0])
        slots = (mig.gi_id, mig.gi_id + 1) if mig else WHOLE_GPU_SLOTS
        for a, b, t in unit["holds"]:
            holds.append((k, Allocation.objects.create(
                tenant=tenants[t], gpu=gpus[unit["gpu"]], mig_instance=mig, slot_lo=slots[0], slot_hi=slots[1],
                starts_at=_at(a), ends_at=_at(b))))
    endpoints = [ServingEndpoint.objects.create(node=node, url=_url(k), model=MODEL, engine="vllm")
                 for k in range(len(plan["units"]))]
    rng = random.Random(plan["seed"])
    minutes: dict[tuple[int, int], list[int]] = {}
    for minute, prompt, generation in plan["usage"]:
        tokens = minutes.setdefault((rng.choice(endpoints).pk, minute), [0, 0])
        tokens[0] += prompt
        tokens[1] += generation
    for (endpoint_id, minute), (prompt, generation) in minutes.items():
        UsageMinute.objects.create(endpoint_id=endpoint_id, ts=H0 + timedelta(minutes=minute), prompt_tokens=prompt,
                                   generation_tokens=generation)
    for row in (UsageMinute.objects.values("endpoint_id", "ts__hour")
                .annotate(p=Sum("prompt_tokens"), g=Sum("generation_tokens")).order_by()):
        UsageHour.objects.create(endpoint_id=row["endpoint_id"], ts=H0.replace(hour=row["ts__hour"]),
                                 prompt_tokens=row["p"], generation_tokens=row["g"])
    RollupWatermark.objects.update_or_create(name="attribution", defaults={"stored_until": END})
    return tenants, node, holds


def _url(k: int) -> str:
    return f"http://127.0.0.1:{8000 + k}/metrics"


def deploy(node: Node, holds: list[tuple[int, Allocation]]) -> list[Deployment]:
    """One deployment per holder of a unit, on the unit's metrics URL: handed over at each change of holder."""
    out = []
    for k, allocation in holds:
        d = Deployment.objects.create(tenant=allocation.tenant, name=f"d{allocation.pk}", model_name=MODEL,
                                      engine="vllm", node=node, metrics_url=_url(k), active_from=allocation.starts_at,
                                      ended_at=allocation.ends_at or END)
        d.allocations.set([allocation])
        out.append(d)
    return out


def attribute_in_chunks(chunks: list[int], seed: int) -> None:
    hours = [H0 + timedelta(hours=h) for h in range(HOURS)]
    runs, i = [], 0
    for size in chunks:
        if i < len(hours):
            runs.append(hours[i:i + size])
            i += size
    if i < len(hours):
        runs.append(hours[i:])
    random.Random(seed).shuffle(runs)
    for run in runs:
        cost_hours_attribute(hours=run, now=END + timedelta(days=1))


def rows() -> tuple[list, list]:
    fields = ("gpu_hours", "busy_gpu_hours", "energy_kwh", "capex", "opex", "energy")
    costs = sorted(CostHour.objects.values_list("site__slug", "tenant__slug", "ts", *fields),
                   key=lambda r: (r[2], r[1] or ""))
    deployments = sorted(DeploymentHour.objects.values_list("deployment__name", "ts", "prompt_tokens",
                                                            "generation_tokens", *fields))
    return costs, deployments


@hsettings(max_examples=500, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(plan=histories())
def test_the_books_balance_for_any_history_in_any_chunking(plan):
    now = END + timedelta(days=1)
    try:
        with transaction.atomic():
            tenants, node, holds = build(plan)
            if not plan["late"]:
                deploy(node, holds)
            attribute_in_chunks(plan["chunks"], plan["seed"])
            if plan["late"]:
                # The deployments are recorded after their hours were attributed; re-attributing from each one's
                # start (as the task their creation queues does) must make the rows whole.
                for deployment in deploy(node, holds):
                    cost_hours_attribute(hours=[H0 + timedelta(hours=h) for h in range(HOURS)
                                                if H0 + timedelta(hours=h + 1) > deployment.active_from], now=now)
            chunked = rows()
            books = books_reconcile(month=date(2026, 11, 1), now=now)
            assert [(c.key, c.breaks) for c in books.checks if not c.ok] == []
            cost_hours_attribute(hours=[H0 + timedelta(hours=h) for h in range(HOURS)], now=now)
            assert rows() == chunked  # one run, or any chunking in any order: identical rows
            # Cost per site-hour equals Σ tenants + idle (books), tokens in economics equal usage per tenant.
            for tenant in tenants:
                usage = sum(u.tokens for u in usage_for_tenant(tenant=tenant, start=H0, end=END, by_day=False,
                                                               now=now))
                economics = DeploymentHour.objects.filter(deployment__tenant=tenant).aggregate(
                    t=Sum(F("prompt_tokens") + F("generation_tokens")))["t"] or 0
                assert economics == usage
            raise Rollback
    except Rollback:
        pass


SIMPLE = {"gpus": 2, "node_in": 0, "retired": None, "late": False, "chunks": [HOURS], "seed": 1,
          "units": [{"gpu": 0, "slot": None, "installed": 0, "holds": [(0, 180, 0), (180, None, 1)]},
                    {"gpu": 1, "slot": None, "installed": 0, "holds": []}],
          "readings": {(0, h): (55.0, 3_600_000_000) for h in range(HOURS)},
          "usage": [(m, 100_000, 40_000) for m in range(5, HOURS * 60, 37)]}
NOW = END + timedelta(days=1)


@pytest.fixture
def balanced():
    tenants, node, holds = build(SIMPLE)
    deploy(node, holds)
    cost_hours_attribute(hours=[H0 + timedelta(hours=h) for h in range(HOURS)], now=NOW)
    assert books_reconcile(month=date(2026, 11, 1), now=NOW).breaks == 0
    return tenants


def broken(key: str) -> list:
    books = books_reconcile(month=date(2026, 11, 1), now=NOW)
    return next(c for c in books.checks if c.key == key).breaks


def test_a_site_hours_rows_that_do_not_add_up_are_a_break(balanced):
    CostHour.objects.filter(ts=H0 + timedelta(hours=2), tenant__isnull=True).update(energy=F("energy") + 1)
    (found,) = broken("site_cost")
    assert found.scope == "Books DC, 2026-11-10 02:00 UTC" and found.size == "USD +1.000000"


def test_an_hour_never_attributed_and_a_gpu_hour_counted_twice_are_breaks(balanced):
    CostHour.objects.filter(ts=H0 + timedelta(hours=4)).delete()
    CostHour.objects.filter(ts=H0 + timedelta(hours=1), tenant__isnull=True).update(gpu_hours=F("gpu_hours") + 1)
    breaks = broken("capacity")
    assert [b.scope for b in breaks] == ["Books DC, 2026-11-10 01:00 UTC", "Books DC, 2026-11-10 04:00 UTC"]
    assert breaks[0].size == "+1.000000 GPU-hours" and "never attributed" in breaks[1].cause


def test_cost_where_nothing_existed_is_a_break(balanced):
    t0, _t1 = balanced
    Allocation.objects.filter(tenant=t0).update(ends_at=H0 + timedelta(hours=1))  # shortened after attribution
    breaks = broken("existence")
    assert [b.scope for b in breaks] == [f"T0 at Books DC, 2026-11-10 0{h}:00 UTC" for h in (1, 2)]


def test_tokens_economics_and_usage_disagreeing_is_a_break(balanced):
    row = DeploymentHour.objects.filter(prompt_tokens__gt=0).order_by("ts").first()
    DeploymentHour.objects.filter(pk=row.pk).update(prompt_tokens=F("prompt_tokens") + 7)
    (found,) = broken("tokens")
    assert found.size == "+7 tokens" and "who owned an endpoint's minutes" in found.cause


def test_revenue_the_pnl_cannot_place_is_a_break(balanced):
    # A tenant whose capacity ended last month still owes its commitment: an invoice line of no site.
    from portal.billing.models import Commitment

    t0, _t1 = balanced
    late = Tenant.objects.create(name="Lapsed", slug="lapsed", status=TenantStatus.ACTIVE, plan=t0.plan)
    Allocation.objects.create(tenant=late, gpu=Gpu.objects.get(index=1), slot_lo=0, slot_hi=8,
                              starts_at=datetime(2026, 9, 1, tzinfo=UTC), ends_at=datetime(2026, 10, 1, tzinfo=UTC))
    Commitment.objects.create(book=t0.plan.price_book, effective_from=date(2026, 9, 1),
                              monthly_minimum=Decimal("50.00"))
    breaks = broken("revenue")
    assert [(b.scope, b.size) for b in breaks] == [("November 2026, USD", "USD -50.00")]


def test_the_command_the_page_and_the_hourly_alert_report_the_books(balanced, client, capsys):
    out = call_command("reconcile", "--month", "2026-11") or capsys.readouterr().out
    assert "0 breaks" in out
    CostHour.objects.filter(ts=H0 + timedelta(hours=3)).delete()
    with pytest.raises(CommandError, match="1 break"):
        call_command("reconcile", "--month", "2026-11")
    assert "never attributed" in capsys.readouterr().out
    assert books_alert(now=NOW) == 1
    alert = Alert.objects.get(kind="books", resolved_at__isnull=True)
    assert alert.title == "The books do not balance: 1 break(s)" and alert.severity == "critical"
    client.login(username=OperatorFactory().username, password=PASSWORD)
    page = client.get("/economics/books/?month=2026-11").content.decode()
    assert "1 break in the books of November 2026" in page and "Books DC, 2026-11-10 03:00 UTC" in page
    cost_hours_attribute(hours=[H0 + timedelta(hours=3)], now=NOW)
    assert books_alert(now=NOW) == 0
    alert.refresh_from_db()
    assert alert.resolved_at is not None
    assert "balance: 0 breaks" in client.get("/economics/books/?month=2026-11").content.decode()


def test_it_reattributes_a_month_from_the_books_page_for_admins_only(
        balanced, client, django_capture_on_commit_callbacks):
    from portal.audit.models import AuditEntry

    CostHour.objects.filter(ts=H0 + timedelta(hours=3)).delete()
    viewer = ViewerFactory()
    client.login(username=viewer.username, password=PASSWORD)
    assert client.post("/economics/books/reattribute/", {"month": "2026-11"}).status_code == 403
    client.login(username=OperatorFactory().username, password=PASSWORD)
    assert bad_parameters(client.post("/economics/books/reattribute/", {"month": "2026-13"})) == {"month"}
    assert not CostHour.objects.filter(ts=H0 + timedelta(hours=3)).exists()  # refused: nothing queued

    with django_capture_on_commit_callbacks(execute=True) as queued:
        response = client.post("/economics/books/reattribute/", {"month": "2026-11"})
    assert response.status_code == 302 and response["Location"] == "/economics/books/?month=2026-11"
    # one re-attribution run queued (its attribution then marks the days it rewrote as new: economics.services)
    assert [f.__qualname__ for f in queued].count("reattribution_request.<locals>.queue") == 1
    assert broken("capacity") == [] and books_reconcile(month=date(2026, 11, 1), now=NOW).breaks == 0
    assert AuditEntry.objects.filter(action="books.reattribute", target="November 2026").count() == 1


def test_a_backdated_allocation_not_reattributed_is_a_break(balanced):
    """Recorded straight into the table (as a bug or a hand edit would): the hours it covers were attributed to
    idle capacity, so the tenant's cost lacks what it held."""
    _t0, t1 = balanced
    lo, hi = WHOLE_GPU_SLOTS
    Allocation.objects.create(tenant=t1, gpu=Gpu.objects.get(index=1), slot_lo=lo, slot_hi=hi,
                              starts_at=H0 + timedelta(hours=4, minutes=30))
    breaks = broken("existence")
    assert [(b.scope, b.size) for b in breaks] == [("T1 at Books DC, 2026-11-10 04:00 UTC", "-0.500000 GPU-hours"),
                                                   ("T1 at Books DC, 2026-11-10 05:00 UTC", "-1.000000 GPU-hours")]
    assert "re-attribute the month" in breaks[0].cause
    cost_hours_attribute(hours=[H0 + timedelta(hours=h) for h in (4, 5)], now=NOW)
    assert broken("existence") == []
