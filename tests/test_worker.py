"""Background work in a real Celery worker process: tasks are enqueued after commit and run against the same
database the portal writes (SQLite file locally, PostgreSQL + Redis in CI)."""

import time

import pytest
from django.db import transaction

from portal.telemetry.models import GpuMinute, IngestedBatch
from portal.telemetry.tasks import rollup_minutes
from tests.factories import batch_payload, gpu_payload, gpu_uuid, node_with_credential
from tests.worker import celery_worker, store_worker, wait_until

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def test_it_stores_batches_and_rolls_them_up_in_real_worker_processes(client):
    _node, cred = node_with_credential()
    uuid = gpu_uuid()
    end = (int(time.time()) // 60) * 60 - 60 + 30  # inside the previous minute
    for seq, (util, offset) in enumerate([(20.0, 20), (80.0, 10)], start=1):
        body = batch_payload(seq=seq, end=end - offset + 10, gpus=[gpu_payload(uuid=uuid, util=util)])
        r = client.post("/api/v1/agent/ingest", data=body, content_type="application/json",
                        HTTP_AUTHORIZATION=f"Bearer {cred}")
        assert r.status_code == 200, r.content
    assert IngestedBatch.objects.count() == 2
    with store_worker() as store:
        wait_until(lambda: not IngestedBatch.objects.filter(stored_at__isnull=True).exists(), what="the store worker")
    assert store.returncode == 0, "the store worker did not stop cleanly on SIGTERM"
    time.sleep(5.5)  # rollups take batches that settled (5 s), as in production
    with celery_worker() as (queue, proc):
        transaction.on_commit(lambda: rollup_minutes.apply_async(queue=queue))
        wait_until(lambda: GpuMinute.objects.exists() or proc.poll() is not None, what="the minute rollup")
        assert proc.poll() is None, "worker died"
    minute = GpuMinute.objects.get()
    assert minute.util_mean == pytest.approx(50.0)
    assert minute.util_max == 85.0
    assert minute.seconds == 20.0
