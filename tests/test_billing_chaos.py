"""Invoicing survives a worker killed mid-run: acks_late + an idempotent, single-transaction service mean that
re-enqueueing (as the daily beat entry does) loses no invoice and writes no line twice."""

import os
import random
import signal
import time
from collections import Counter
from datetime import timedelta
from decimal import Decimal

import pytest

from portal.billing.models import Invoice, InvoiceLine, InvoiceStatus, ModelPrice
from portal.billing.selectors import as_utc, current_month, month_start, next_month
from portal.billing.tasks import invoice_tenant_month
from portal.capacity.selectors import usage_for_tenant
from portal.sla.models import SlaObjective, SlaPolicy, Sli, Window
from portal.sla.services import sla_evaluate_tenant
from portal.telemetry.models import UsageHour
from tests.test_billing import LLAMA_8B, LLAMA_70B, served_tenant
from tests.worker import celery_worker, wait_until

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

# The demo's filesystem broker polls about once a second per task, so ten tenants keep this under a minute.
TENANTS = 10
TTFT = {"le": [0.1, 0.25, 0.5, 1.0], "counts": [10, 50, 90, 99, 100], "sum": 30.0}


def _tenants(month):
    start = as_utc(month)
    hours = int((as_utc(next_month(month)) - start).total_seconds() // 3600)
    rng = random.Random(5)
    tenants = []
    for _ in range(TENANTS):
        tenant, eps = served_tenant(models=(LLAMA_8B, LLAMA_70B), since=start - timedelta(days=40))
        # A mid-month price change: the 8B model gets two lines. An SLA with a credit.
        ModelPrice.objects.create(book=tenant.plan.price_book, model_name=LLAMA_8B,
                                  effective_from=month + timedelta(days=14), input_per_mtok=Decimal("0.04"),
                                  output_per_mtok=Decimal("0.07"))
        policy = SlaPolicy.objects.create(name=f"p{tenant.pk}", plan=tenant.plan)
        SlaObjective.objects.create(policy=policy, sli=Sli.TTFT_P95, target=Decimal("0.5"), window=Window.HOUR,
                                    credit_pct=Decimal("10"))
        UsageHour.objects.bulk_create(
            UsageHour(endpoint=ep, ts=start + timedelta(hours=h), prompt_tokens=rng.randrange(10**9),
                      generation_tokens=rng.randrange(10**8), requests_ok=100, probes=360, probes_up=360, ttft=TTFT)
            for ep in eps.values() for h in range(hours))
        # Credits follow breached windows: the hour evaluated on the 10th breaches (TTFT p95 above 0.5 s).
        (evaluation,) = sla_evaluate_tenant(tenant=tenant, window_end=start + timedelta(days=10))
        assert evaluation.compliant is False
        tenants.append(tenant)
    return tenants


def _issued() -> int:
    return Invoice.objects.filter(status=InvoiceStatus.ISSUED).count()


def test_it_loses_no_invoice_and_duplicates_no_line_when_the_worker_is_killed_mid_run():
    month = month_start(current_month() - timedelta(days=1))
    tenants = _tenants(month)
    with celery_worker() as (queue, proc):
        for tenant in tenants:
            invoice_tenant_month.apply_async((tenant.pk, month.isoformat()), queue=queue)
        wait_until(lambda: _issued() >= 2 or proc.poll() is not None, timeout=120, what="the first invoices")
        assert proc.poll() is None, "worker died"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        at_kill = _issued()
    assert 2 <= at_kill < TENANTS, "the worker was not killed mid-run"

    with celery_worker() as (queue, proc):
        for tenant in tenants:  # re-enqueued for every tenant, as the daily beat entry does
            invoice_tenant_month.apply_async((tenant.pk, month.isoformat()), queue=queue)
        wait_until(lambda: _issued() == TENANTS or proc.poll() is not None, timeout=180, what="every invoice")
        time.sleep(1.0)  # let the re-enqueued tasks of already-issued invoices finish: they must change nothing
        assert proc.poll() is None, "worker died"

    assert Invoice.objects.count() == TENANTS and _issued() == TENANTS
    for tenant in tenants:
        invoice = Invoice.objects.get(tenant=tenant)
        lines = list(invoice.lines.order_by("position"))
        assert [ln.position for ln in lines] == list(range(1, len(lines) + 1))
        assert Counter((ln.kind, ln.model_name, ln.price_id, ln.sli) for ln in lines).most_common(1)[0][1] == 1
        assert [ln.kind for ln in lines] == ["usage", "usage", "usage", "credit"]
        usage = usage_for_tenant(tenant=tenant, start=as_utc(month), end=as_utc(next_month(month)), by_day=False)
        assert invoice.input_tokens == sum(u.prompt_tokens for u in usage)
        assert invoice.output_tokens == sum(u.generation_tokens for u in usage)
        assert invoice.total == sum(ln.amount for ln in lines)
    assert InvoiceLine.objects.count() == 4 * TENANTS
