"""SLA evaluation. Beat runs `evaluate_slas` hourly after the hour rollup; it fans out one idempotent task per
active tenant for the hour that just ended."""

from datetime import datetime
from functools import partial

from celery import shared_task
from django.db import transaction

from portal.sla.selectors import tenants_to_evaluate
from portal.sla.services import evaluation_window_end, sla_evaluate_tenant
from portal.tenants.models import Tenant


@shared_task(acks_late=True)
def evaluate_slas(window_end: str | None = None) -> int:
    end = datetime.fromisoformat(window_end) if window_end else evaluation_window_end()
    tenant_ids = list(tenants_to_evaluate().values_list("pk", flat=True))
    for tenant_id in tenant_ids:
        transaction.on_commit(partial(evaluate_tenant_sla.delay, tenant_id, end.isoformat()))
    return len(tenant_ids)


@shared_task(acks_late=True)
def evaluate_tenant_sla(tenant_id: int, window_end: str) -> int:
    tenant = Tenant.objects.filter(pk=tenant_id).select_related("plan").first()
    if tenant is None:
        return 0
    return len(sla_evaluate_tenant(tenant=tenant, window_end=datetime.fromisoformat(window_end)))
