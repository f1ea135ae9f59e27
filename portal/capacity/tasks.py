from celery import shared_task

from portal.capacity.services import deployments_check_billable, quotas_check


@shared_task(acks_late=True)
def check_quotas() -> list[str]:
    return quotas_check()


@shared_task(acks_late=True)
def check_billable_deployments() -> list[int]:
    return deployments_check_billable()
