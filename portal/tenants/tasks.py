from celery import shared_task

from portal.tenants.mail import mail_send


@shared_task(acks_late=True)
def tenant_mail_send(*, kind: str, object_id: int, base_url: str) -> int:
    return mail_send(kind=kind, object_id=object_id, base_url=base_url)
