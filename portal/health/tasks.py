from celery import shared_task

from portal.health import services
from portal.tenants.mail import mail_send


@shared_task(acks_late=True)
def close_quiet_incidents() -> int:
    return services.incidents_close_quiet()


@shared_task(acks_late=True)
def notice_mail(notice_id: int, base_url: str) -> int:
    return mail_send(kind="notice", object_id=notice_id, base_url=base_url)
