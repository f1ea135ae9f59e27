from celery import shared_task

from portal.fleet.services import nodes_detect_offline


@shared_task(acks_late=True)
def detect_offline_nodes() -> list[int]:
    return nodes_detect_offline()
