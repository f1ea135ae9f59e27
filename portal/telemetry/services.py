"""Ingest of agent batches (one per interval), in two steps. This is the first: the request validates a node's
intervals and commits them with their payloads in one statement (`batches_accept`); from then on they are durable
and acknowledged, and a resend is recognised by (node, seq). The second, the store worker writing accepted batches
into the tiers, is portal.telemetry.store. The request's query count grows neither with the batch nor with the
number of intervals it carries.
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
    """What became of one interval: "stored" (durably accepted), "duplicate" (its seq holds the same content),
    "conflict" (its seq holds other content; `last_seq` is the node's highest) or "rejected" (`loc`, `msg`)."""

    seq: int | None
    status: str
    last_seq: int | None = None
    loc: tuple = ()
    msg: str = ""


@dataclass(frozen=True)
class _Pending:
    index: int
    batch: BatchIn
    digest: str
    payload: bytes


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


def _foreign_gpu(node: Node, batch: BatchIn) -> tuple[tuple, str]:
    uuids = [g.uuid for g in batch.gpus]
    foreign = set(Gpu.objects.filter(uuid__in=uuids).exclude(node_id=node.pk).values_list("uuid", flat=True))
    i = next((i for i, gpu in enumerate(batch.gpus) if gpu.uuid in foreign), 0)
    return ("gpus", i, "uuid"), f"GPU {batch.gpus[i].uuid} belongs to another node"


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


_COLUMNS = ("node_id", "seq", "digest", "interval_start", "interval_end", "received_at", "gpu_count",
            "dropped_batches", "payload", "store_error")


def _insert_batches(*, node: Node, pending: list[_Pending], now: datetime) -> set[int]:
    """INSERT the batches whose seq is free, provided every GPU they name is this node's (another node's, or not
    yet claimed, and none is inserted), in one statement: a request's only write, and its only round trip
    besides the credential (the ORM's create, a savepoint and a separate ownership query cost three times the
    CPU). Returns the seqs inserted."""
    if not pending:
        return set()
    adapt, quote = connection.ops.adapt_datetimefield_value, connection.ops.quote_name
    received = adapt(now)
    rows = [[node.pk, p.batch.seq, p.digest, adapt(utc(p.batch.interval_start)), adapt(utc(p.batch.interval_end)),
             received, len(p.batch.gpus), p.batch.dropped_batches, p.payload, ""] for p in pending]
    uuids = sorted({g.uuid for p in pending for g in p.batch.gpus})
    all_owned = "1 = 1"
    if uuids:
        all_owned = (f"(SELECT COUNT(*) FROM {quote(Gpu._meta.db_table)} WHERE node_id = %s "  # noqa: S608
                     f"AND uuid IN ({', '.join(['%s'] * len(uuids))})) = {len(uuids)}")
    row = f"({', '.join(['%s'] * len(_COLUMNS))})"
    # Names come from the models' metadata and are quoted; every value is a bound parameter.
    statement = (f"INSERT INTO {quote(IngestedBatch._meta.db_table)} ({', '.join(map(quote, _COLUMNS))}) "  # noqa: S608
                 f"SELECT * FROM (VALUES {', '.join([row] * len(rows))}) AS v WHERE {all_owned} "
                 "ON CONFLICT (node_id, seq) DO NOTHING RETURNING seq")
    with connection.cursor() as cursor:
        cursor.execute(statement, [v for r in rows for v in r] + ([node.pk, *uuids] if uuids else []))
        return {seq for (seq,) in cursor.fetchall()}


def _resends(node: Node, pending: list[_Pending]) -> dict[int, IngestResult]:
    """The answers for seqs already held, by index: a duplicate when the content is the same, a conflict
    otherwise (naming the node's last seq)."""
    held = dict(IngestedBatch.objects.filter(node=node, seq__in={p.batch.seq for p in pending})
                .values_list("seq", "digest"))
    answers = {p.index: IngestResult(seq=p.batch.seq, status="duplicate")
               for p in pending if held.get(p.batch.seq) == p.digest}
    clashes = [p for p in pending if p.batch.seq in held and held[p.batch.seq] != p.digest]
    if clashes:
        last = IngestedBatch.objects.filter(node=node).aggregate(last=Max("seq"))["last"]
        answers |= {p.index: IngestResult(seq=p.batch.seq, status="conflict", last_seq=last,
                                          msg=f"seq {p.batch.seq} was already stored with different content")
                    for p in clashes}
    return answers


def _accept_claiming(node: Node, p: _Pending, now: datetime) -> IngestResult:
    """One batch whose GPUs are not all this node's yet: claim the unclaimed ones and insert it, or refuse it
    naming the GPU another node holds, leaving no claim behind."""
    try:
        with transaction.atomic():
            _claim_gpus(node, p.batch)
            if not _insert_batches(node=node, pending=[p], now=now):
                raise _NotInserted
    except _NotInserted:
        if (resent := _resends(node, [p]).get(p.index)) is not None:
            return resent
        loc, msg = _foreign_gpu(node, p.batch)
        return IngestResult(seq=p.batch.seq, status="rejected", loc=loc, msg=msg)
    return IngestResult(seq=p.batch.seq, status="stored")


def batches_accept(*, credential: NodeCredential, batches: list[BatchIn],
                   now: datetime | None = None) -> list[IngestResult]:
    """Accept a node's intervals, each on its own: check the clock and GPU ownership and commit every acceptable
    one, answering for each in order (stored, duplicate, conflict, rejected). GPU ownership
    is decided here, once: a GPU no node has reported becomes this node's, and a batch with another node's GPU
    is refused naming it, so the store worker never has to drop a reading. Rows reach the storage tiers when
    the store worker takes them (batches_store)."""
    now = now or timezone.now()
    node = credential.node
    answers: dict[int, IngestResult] = {}
    pending = []
    for index, batch in enumerate(batches):
        try:
            _check_times(batch, now)
            _check_event_gpus(batch)
        except IngestRejected as exc:
            answers[index] = IngestResult(seq=batch.seq, status="rejected", loc=tuple(exc.loc), msg=exc.msg)
            continue
        payload = batch.model_dump_json().encode()
        pending.append(_Pending(index, batch, hashlib.sha256(payload).hexdigest(), payload))
    # One statement, so one transaction: every acceptable interval of the request is stored, or none.
    inserted = _insert_batches(node=node, pending=pending, now=now)
    rest = []
    for p in pending:
        if p.batch.seq in inserted:
            inserted.discard(p.batch.seq)  # a second copy of a seq in one request is a resend of the first
            answers[p.index] = IngestResult(seq=p.batch.seq, status="stored")
        else:
            rest.append(p)
    if rest:
        # Not inserted: a seq already there (a resend, or a concurrent request that won), or a GPU not yet this
        # node's. Both are rare; find out which.
        answers |= _resends(node, rest)
        for p in rest:
            if p.index not in answers:
                answers[p.index] = _accept_claiming(node, p, now)
    if any(a.status == "stored" for a in answers.values()) and (
            node.last_seen is None or node.last_seen < now - LAST_SEEN_EVERY):
        Node.objects.filter(pk=node.pk).update(last_seen=now)
        NodeCredential.objects.filter(pk=credential.pk).update(last_used_at=now)
    return [answers[i] for i in range(len(batches))]


def batch_accept(*, credential: NodeCredential, batch: BatchIn, now: datetime | None = None) -> IngestResult:
    """Accept one interval (the one-interval-per-request contract): as batches_accept, raising IngestRejected
    or SeqConflict where it would answer "rejected" or "conflict"."""
    (result,) = batches_accept(credential=credential, batches=[batch], now=now)
    if result.status == "rejected":
        raise IngestRejected(list(result.loc), result.msg)
    if result.status == "conflict":
        raise SeqConflict(result.msg, last_seq=result.last_seq)
    return result
