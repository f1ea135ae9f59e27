"""Ingest of agent batches, in two steps. This is the first: the request validates a batch and commits it with its
payload in one statement (`batch_accept`); from then on it is durable and acknowledged, and a resend is recognised
by (node, seq). The second, the store worker writing accepted batches into the tiers, is portal.telemetry.store.
The request's query count does not grow with the batch.
"""

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db import connection, transaction
from django.db.models import Max
from django.utils import timezone

from portal.fleet.models import Gpu, Node, NodeCredential
from portal.telemetry.models import IngestedBatch
from portal.telemetry.schemas import BatchIn

MAX_FUTURE = timedelta(minutes=5)
MAX_PAST = timedelta(days=30)
LAST_SEEN_EVERY = timedelta(minutes=1)


class IngestRejected(Exception):
    """The batch is well-formed JSON but not acceptable; `loc` names the field."""

    def __init__(self, loc: list, msg: str) -> None:
        super().__init__(msg)
        self.loc = loc
        self.msg = msg


class SeqConflict(Exception):
    """The node already sent a different batch under this seq; `last_seq` is the highest seq it holds."""

    def __init__(self, message: str, *, last_seq: int) -> None:
        super().__init__(message)
        self.last_seq = last_seq


@dataclass(frozen=True)
class IngestResult:
    seq: int
    status: str  # "stored" (durably accepted) or "duplicate"


def utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


def _check_times(batch: BatchIn, now: datetime) -> None:
    checks = [(["interval_start"], batch.interval_start), (["interval_end"], batch.interval_end)]
    checks += [(["events", i, "ts"], e.ts) for i, e in enumerate(batch.events)]
    for loc, epoch in checks:
        if epoch > (now + MAX_FUTURE).timestamp():
            raise IngestRejected(loc, "timestamp is in the future (check the node's clock)")
        if epoch < (now - MAX_PAST).timestamp():
            raise IngestRejected(loc, "timestamp is more than 30 days old")


def _check_event_gpus(batch: BatchIn) -> None:
    uuids = {g.uuid for g in batch.gpus}
    for i, event in enumerate(batch.events):
        if event.gpu_uuid is not None and event.gpu_uuid not in uuids:
            raise IngestRejected(["events", i, "gpu_uuid"], "GPU is not part of this batch")


def _foreign_gpu(node: Node, batch: BatchIn) -> IngestRejected:
    uuids = [g.uuid for g in batch.gpus]
    foreign = set(Gpu.objects.filter(uuid__in=uuids).exclude(node_id=node.pk).values_list("uuid", flat=True))
    i = next((i for i, gpu in enumerate(batch.gpus) if gpu.uuid in foreign), 0)
    return IngestRejected(["gpus", i, "uuid"], f"GPU {batch.gpus[i].uuid} belongs to another node")


class _NotInserted(Exception):
    pass


def _claim_gpus(node: Node, batch: BatchIn) -> None:
    """Record the batch's GPUs that no node has reported yet as this node's. The UUID is unique: when two nodes
    claim the same new GPU at once, the second insert waits for the first transaction and then does nothing, and
    its batch is refused naming the GPU (each statement reads what was committed before it began)."""
    Gpu.objects.bulk_create(
        [Gpu(node=node, uuid=g.uuid, index=g.index, name=g.name, pci_bus_id=g.pci_bus_id or "",
             memory_total_mib=g.memory_total_mib, power_limit_w=g.power_limit_w, mig_mode=bool(g.mig_mode),
             installed_at=utc(batch.interval_start))  # on the books from its first reported interval
         for g in batch.gpus],
        ignore_conflicts=True,
    )


def _resend(node: Node, batch: BatchIn, digest: str) -> IngestResult | None:
    """The answer for a seq already accepted: a duplicate when its content is the same, SeqConflict otherwise."""
    stored = IngestedBatch.objects.filter(node=node, seq=batch.seq).values_list("digest", flat=True).first()
    if stored is None:
        return None
    if stored != digest:
        last = IngestedBatch.objects.filter(node=node).aggregate(last=Max("seq"))["last"]
        raise SeqConflict(f"seq {batch.seq} was already stored with different content", last_seq=last)
    return IngestResult(seq=batch.seq, status="duplicate")


def _insert_batch(*, node: Node, batch: BatchIn, digest: str, payload: bytes, now: datetime) -> bool:
    """INSERT the batch unless its seq is taken or one of its GPUs is not this node's (another node's, or not yet
    claimed), in one statement: the request's only write, and its only round trip besides the credential (the
    ORM's create, a savepoint and a separate ownership query cost three times the CPU). True when inserted."""
    adapt, quote = connection.ops.adapt_datetimefield_value, connection.ops.quote_name
    values = {
        "node_id": node.pk, "seq": batch.seq, "digest": digest, "interval_start": adapt(utc(batch.interval_start)),
        "interval_end": adapt(utc(batch.interval_end)), "received_at": adapt(now), "gpu_count": len(batch.gpus),
        "dropped_batches": batch.dropped_batches, "payload": payload, "store_error": "",
    }
    uuids = [g.uuid for g in batch.gpus]
    all_owned = "1 = 1"
    if uuids:
        all_owned = (f"(SELECT COUNT(*) FROM {quote(Gpu._meta.db_table)} WHERE node_id = %s "  # noqa: S608
                     f"AND uuid IN ({', '.join(['%s'] * len(uuids))})) = {len(uuids)}")
    # Names come from the models' metadata and are quoted; every value is a bound parameter.
    statement = (f"INSERT INTO {quote(IngestedBatch._meta.db_table)} ({', '.join(map(quote, values))}) "
                 f"SELECT {', '.join(['%s'] * len(values))} WHERE {all_owned} "
                 "ON CONFLICT (node_id, seq) DO NOTHING RETURNING id")
    with connection.cursor() as cursor:
        cursor.execute(statement, [*values.values(), *([node.pk, *uuids] if uuids else [])])
        return cursor.fetchone() is not None


def batch_accept(*, credential: NodeCredential, batch: BatchIn, now: datetime | None = None) -> IngestResult:
    """Accept a batch: check the clock and GPU ownership and commit it whole, or nothing. GPU ownership is decided
    here, once: a GPU no node has reported becomes this node's, and a batch with another node's GPU is refused
    naming it, so the store worker never has to drop a reading. A resend of an accepted seq is acknowledged as a
    duplicate; the same seq with different content raises SeqConflict. Its rows reach the storage tiers when the
    store worker takes it (batches_store)."""
    now = now or timezone.now()
    node = credential.node
    _check_times(batch, now)
    _check_event_gpus(batch)
    payload = batch.model_dump_json().encode()
    digest = hashlib.sha256(payload).hexdigest()
    if not _insert_batch(node=node, batch=batch, digest=digest, payload=payload, now=now):
        # Not inserted: its seq was already there (a resend, or a concurrent request that won), or a GPU is not
        # yet this node's. Both are rare; find out which.
        if (resent := _resend(node, batch, digest)) is not None:
            return resent
        try:
            with transaction.atomic():  # a refused batch leaves no claim behind
                _claim_gpus(node, batch)
                if not _insert_batch(node=node, batch=batch, digest=digest, payload=payload, now=now):
                    raise _NotInserted
        except _NotInserted:
            if (resent := _resend(node, batch, digest)) is not None:
                return resent
            raise _foreign_gpu(node, batch) from None
    if node.last_seen is None or node.last_seen < now - LAST_SEEN_EVERY:
        Node.objects.filter(pk=node.pk).update(last_seen=now)
        NodeCredential.objects.filter(pk=credential.pk).update(last_used_at=now)
    return IngestResult(seq=batch.seq, status="stored")


