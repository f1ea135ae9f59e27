"""Re-attribution coalesced: a burst of changes reaching into the past queues one background run, which
re-attributes the union of their ranges; a run whose message was lost is caught up by the beat entry."""

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.db.models import Sum
from django.utils import timezone

from portal.capacity.services import allocation_create, allocation_end
from portal.economics import tasks
from portal.economics.models import CostHour, PendingAttribution
from portal.economics.reattribution import reattribution_request, reattribution_run
from portal.economics.services import cost_hours_attribute
from portal.hours import hour_floor, hours_between
from portal.telemetry.models import RollupWatermark
from tests.factories import GpuFactory, NodeFactory, TenantFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def queued(monkeypatch):
    """The runs queued (each .delay() on the real task), without running them: the test runs what they would."""
    calls = []
    monkeypatch.setattr(tasks.reattribute_pending, "delay", lambda: calls.append(1))
    return calls


def _held(tenant) -> float:
    return float(CostHour.objects.filter(tenant=tenant).aggregate(g=Sum("gpu_hours"))["g"] or 0)


def test_a_burst_of_backdated_changes_queues_one_run_covering_their_union(queued, django_capture_on_commit_callbacks):
    now = timezone.now()
    start = hour_floor(now) - timedelta(hours=8)
    node = NodeFactory(installed_at=start)
    gpus = [GpuFactory(node=node, index=i, installed_at=start) for i in range(3)]
    RollupWatermark.objects.create(name="attribution", stored_until=now)
    cost_hours_attribute(hours=hours_between(start, now), now=now)  # all idle: nobody held anything yet
    tenant = TenantFactory()
    with django_capture_on_commit_callbacks(execute=True):
        for i, gpu in enumerate(gpus):  # three allocations recorded late, reaching 2, 4 and 6 hours back
            allocation_create(tenant=tenant, gpu=gpu, starts_at=start + timedelta(hours=2 * (i + 1)))
    assert len(queued) == 1 and PendingAttribution.objects.count() == 3
    assert _held(tenant) == 0  # not yet: the run has not happened

    hours = reattribution_run()
    assert hours == len(hours_between(start + timedelta(hours=2), now))  # the union, each hour once
    assert PendingAttribution.objects.count() == 0
    # Each GPU held from its allocation's start up to where attribution reached (now).
    expected = sum((now - (start + timedelta(hours=2 * (i + 1))) for i in range(3)), timedelta()) / timedelta(hours=1)
    assert _held(tenant) == pytest.approx(expected, abs=1e-6)

    # Once the run has started, the next change queues a run of its own.
    with django_capture_on_commit_callbacks(execute=True):
        allocation_end(allocation=tenant.allocations.order_by("starts_at").first(), at=start + timedelta(hours=3))
    assert len(queued) == 2 and PendingAttribution.objects.count() == 1
    assert reattribution_run() > 0 and PendingAttribution.objects.count() == 0


def test_the_beat_entry_catches_up_a_run_whose_message_was_lost(queued, django_capture_on_commit_callbacks):
    now = timezone.now()
    RollupWatermark.objects.create(name="attribution", stored_until=now)
    with django_capture_on_commit_callbacks(execute=True):
        reattribution_request(start=now - timedelta(hours=3))
        reattribution_request(start=now - timedelta(hours=2))
    assert len(queued) == 1  # the broker lost it: the beat entry runs the real task
    assert tasks.reattribute_pending.apply().get() == len(hours_between(now - timedelta(hours=3), now))
    assert not PendingAttribution.objects.exists() and tasks.reattribute_pending.apply().get() == 0


def test_a_range_reaching_further_back_than_31_days_is_cut_to_that():
    now = timezone.now()
    reattribution_request(start=now - timedelta(days=400))
    (row,) = PendingAttribution.objects.all()
    assert row.start >= now - timedelta(days=31, seconds=1) and row.end <= timezone.now()


def test_a_backdated_change_months_ago_is_re_attributed_however_long_ago(queued, django_capture_on_commit_callbacks):
    now = timezone.now()
    start = hour_floor(now) - timedelta(days=100)
    node = NodeFactory(installed_at=start)
    gpu = GpuFactory(node=node, index=0, installed_at=start)
    RollupWatermark.objects.create(name="attribution", stored_until=now)
    held_from, held_to = start + timedelta(days=5), start + timedelta(days=8)
    cost_hours_attribute(hours=hours_between(start, start + timedelta(days=10)), now=now)
    tenant = TenantFactory()
    with django_capture_on_commit_callbacks(execute=True):  # recorded today, for three days 95 days ago
        allocation_create(tenant=tenant, gpu=gpu, starts_at=held_from, ends_at=held_to)
    assert reattribution_run() == len(hours_between(held_from, held_to))
    assert _held(tenant) == pytest.approx(72, abs=1e-6)


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite lets one transaction write at a time")
def test_two_attributions_of_the_same_hours_at_once_store_one_set_of_rows():
    now = timezone.now()
    start = hour_floor(now) - timedelta(hours=6)
    node = NodeFactory(installed_at=start)
    for i in range(2):
        GpuFactory(node=node, index=i, installed_at=start)
    hours = hours_between(start, now)
    first_wrote, errors = threading.Event(), []

    def attribute(*, first: bool) -> None:
        try:
            if first:
                with transaction.atomic():
                    cost_hours_attribute(hours=hours, now=now)
                    first_wrote.set()
                    time.sleep(0.5)  # the other run starts while these rows are not committed yet
            else:
                first_wrote.wait(10)
                cost_hours_attribute(hours=hours, now=now)
        except Exception as exc:  # reported by the test thread
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=attribute, kwargs={"first": first}) for first in (True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    site_hours = len(hours)  # one site, nobody holding anything: one idle row an hour
    assert CostHour.objects.count() == site_hours
    held = CostHour.objects.aggregate(g=Sum("gpu_hours"))["g"]
    assert float(held) == pytest.approx(2 * (now - start) / timedelta(hours=1), abs=1e-6)
