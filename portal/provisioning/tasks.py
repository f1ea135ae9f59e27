from celery import shared_task

from portal.provisioning import services


@shared_task(acks_late=True)
def fetch_host_key(job_id: int) -> None:
    services.host_key_fetch(job_id=job_id)


@shared_task(acks_late=True)
def run_job(job_id: int) -> None:
    services.job_run(job_id=job_id)
