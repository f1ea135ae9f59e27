from dataclasses import asdict

from celery import shared_task

from portal.telemetry import partitions, rollups


@shared_task(acks_late=True)
def rollup_minutes() -> int:
    return rollups.rollup_minutes()


@shared_task(acks_late=True)
def rollup_hours() -> int:
    return rollups.rollup_hours()


@shared_task(acks_late=True)
def apply_retention() -> dict[str, int]:
    return rollups.apply_retention()


@shared_task(acks_late=True)
def raw_partitions_ensure() -> dict:
    return asdict(partitions.raw_partitions_ensure())
