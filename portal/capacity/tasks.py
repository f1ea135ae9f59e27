from celery import shared_task

from portal.capacity.services import quotas_check


@shared_task(acks_late=True)
def check_quotas() -> list[str]:
    return quotas_check()
