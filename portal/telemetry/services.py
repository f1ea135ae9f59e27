"""Ingest of agent batches: one short transaction, a query count that does not grow with the batch."""

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from portal.alerts.models import Severity
from portal.alerts.services import alert_raise
from portal.fleet.models import (
    Gpu,
    HealthEvent,
    HealthEventKind,
    MigInstance,
    Node,
    NodeCredential,
    NodeStatus,
    ServingEndpoint,
)
from portal.fleet.services import _apply_host_facts, node_mark_status
from portal.telemetry.bulk import insert_rows
from portal.telemetry.models import GpuSample, IngestedBatch, UsageSample
from portal.telemetry.schemas import HISTOGRAMS, BatchIn
from portal.telemetry.xid import xid_alert

MAX_FUTURE = timedelta(minutes=5)
MAX_PAST = timedelta(days=30)
LAST_SEEN_EVERY = timedelta(minutes=1)
# A batch older than this many intervals is a replay from the agent's spool: it adds history, not current state.
FRESH_INTERVALS = 3

_GPU_CURRENT_FIELDS = [
    "index", "name", "pci_bus_id", "memory_total_mib", "power_limit_w", "mig_mode", "cc_mode",
    "current_util", "current_power_w", "current_temp_c", "current_memory_used_mib", "current_at",
    "ecc_uncorrected_total", "retired_pages", "remapped_rows_failure",
]
_ENDPOINT_CURRENT_FIELDS = [
    "engine", "version", "settings", "up", "probe_latency_ms", "running", "waiting", "kv_cache_usage", "last_seen",
]


class IngestRejected(Exception):
    """The batch is well-formed JSON but not acceptable; `loc` names the field."""

    def __init__(self, loc: list, msg: str) -> None:
        super().__init__(msg)
        self.loc = loc
        self.msg = msg


class SeqConflict(Exception):
    """The node already sent a different batch under this seq."""


@dataclass(frozen=True)
class IngestResult:
    seq: int
    status: str  # "stored" or "duplicate"


def batch_digest(batch: BatchIn) -> str:
    return hashlib.sha256(batch.model_dump_json().encode()).hexdigest()


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


def _check_times(batch: BatchIn, now: datetime) -> None:
    checks = [(["interval_start"], batch.interval_start), (["interval_end"], batch.interval_end)]
    checks += [(["events", i, "ts"], e.ts) for i, e in enumerate(batch.events)]
    for loc, epoch in checks:
        if epoch > (now + MAX_FUTURE).timestamp():
            raise IngestRejected(loc, "timestamp is in the future (check the node's clock)")
        if epoch < (now - MAX_PAST).timestamp():
            raise IngestRejected(loc, "timestamp is more than 30 days old")


def batch_ingest(*, credential: NodeCredential, batch: BatchIn, now: datetime | None = None) -> IngestResult:
    """Store a batch all-or-nothing. A resend of a stored seq is acknowledged as a duplicate; the same seq with
    different content raises SeqConflict."""
    now = now or timezone.now()
    node = credential.node
    _check_times(batch, now)
    digest = batch_digest(batch)
    stored = IngestedBatch.objects.filter(node=node, seq=batch.seq).values_list("digest", flat=True).first()
    if stored is not None:
        return _duplicate_or_conflict(batch.seq, stored, digest)

    uuids = [g.uuid for g in batch.gpus]
    known_rows = Gpu.objects.filter(uuid__in=uuids).values_list("pk", "uuid", "node_id", "mig_mode")
    known = {uuid: (pk, node_id) for pk, uuid, node_id, _mig in known_rows}
    mig_known = any(mig for _pk, _uuid, _node, mig in known_rows)
    for i, gpu in enumerate(batch.gpus):
        if gpu.uuid in known and known[gpu.uuid][1] != node.pk:
            raise IngestRejected(["gpus", i, "uuid"], "GPU belongs to another node")
    event_uuids = set(uuids) | set(known)
    for i, event in enumerate(batch.events):
        if event.gpu_uuid is not None and event.gpu_uuid not in event_uuids:
            raise IngestRejected(["events", i, "gpu_uuid"], "GPU is not part of this batch")

    start, end = _utc(batch.interval_start), _utc(batch.interval_end)
    fresh = end >= now - timedelta(seconds=FRESH_INTERVALS * node.interval_s)
    try:
        with transaction.atomic():
            IngestedBatch.objects.create(
                node=node, seq=batch.seq, digest=digest, interval_start=start, interval_end=end, received_at=now,
                gpu_count=len(batch.gpus), dropped_batches=batch.dropped_batches,
            )
            gpu_ids = _store_gpus(node, batch, known, start, end, fresh, now, mig_known)
            _store_usage(node, batch, start, end, fresh, now)
            _store_events(node, batch, gpu_ids)
            _touch_node(node, credential, batch, now, fresh)
    except IntegrityError:
        # A concurrent request stored this seq first (the unique constraint decided); answer as for a resend.
        stored = IngestedBatch.objects.filter(node=node, seq=batch.seq).values_list("digest", flat=True).first()
        if stored is None:
            raise
        return _duplicate_or_conflict(batch.seq, stored, digest)
    return IngestResult(seq=batch.seq, status="stored")


def _duplicate_or_conflict(seq: int, stored: str, digest: str) -> IngestResult:
    if stored != digest:
        raise SeqConflict(f"seq {seq} was already stored with different content")
    return IngestResult(seq=seq, status="duplicate")


def _store_gpus(
    node: Node, batch: BatchIn, known: dict[str, tuple[int, int]], start: datetime, end: datetime, fresh: bool,
    received_at: datetime, mig_known: bool,
) -> dict[str, int]:
    rows = []
    for g in batch.gpus:
        rows.append(Gpu(
            node=node, uuid=g.uuid, index=g.index, name=g.name, pci_bus_id=g.pci_bus_id or "",
            memory_total_mib=g.memory_total_mib, power_limit_w=g.power_limit_w, mig_mode=bool(g.mig_mode),
            cc_mode=g.cc_mode or "", current_util=g.util_mean, current_power_w=g.power_mean_w,
            current_temp_c=g.temp_max_c, current_memory_used_mib=g.memory_used_mib, current_at=end,
            ecc_uncorrected_total=g.ecc_uncorrected_total, retired_pages=g.retired_pages,
            remapped_rows_failure=g.remapped_rows_failure,
        ))
    if fresh and rows:
        Gpu.objects.bulk_create(rows, update_conflicts=True, unique_fields=["uuid"], update_fields=_GPU_CURRENT_FIELDS)
    elif rows:
        Gpu.objects.bulk_create([r for r in rows if r.uuid not in known])
    ids = {uuid: pk for uuid, (pk, _node) in known.items()}
    ids.update({r.uuid: r.pk for r in rows if r.pk is not None})
    # MIG layouts are only read when MIG is (or was) in play: most batches skip a query.
    if fresh and (mig_known or any(g.mig_mode or g.mig_instances for g in batch.gpus)):
        _sync_mig(batch, ids)
    seconds = batch.interval_end - batch.interval_start
    insert_rows(GpuSample, [
        {
            "gpu_id": ids[g.uuid], "ts": start, "received_at": received_at, "seconds": seconds,
            "util_mean": g.util_mean, "util_max": g.util_max, "mem_util_mean": g.mem_util_mean,
            "memory_used_mib": g.memory_used_mib, "power_mean_w": g.power_mean_w, "energy_mj": g.energy_mj,
            "temp_max_c": g.temp_max_c, "sm_clock_mhz": g.sm_clock_mhz,
        }
        for g in batch.gpus
    ])
    return ids


def _sync_mig(batch: BatchIn, ids: dict[str, int]) -> None:
    reported = {
        (ids[g.uuid], m.gi_id): (m.profile, m.uuid or "", m.memory_total_mib)
        for g in batch.gpus
        for m in g.mig_instances
    }
    existing = {
        (m.gpu_id, m.gi_id): m for m in MigInstance.objects.filter(gpu_id__in=[ids[g.uuid] for g in batch.gpus])
    }
    stale = [m.pk for key, m in existing.items() if reported.get(key) != (m.profile, m.uuid, m.memory_total_mib)]
    if stale:
        MigInstance.objects.filter(pk__in=stale).delete()
    fresh_keys = [key for key in reported if key not in existing or existing[key].pk in stale]
    if fresh_keys:
        MigInstance.objects.bulk_create(
            MigInstance(gpu_id=gpu_id, gi_id=gi_id, profile=reported[(gpu_id, gi_id)][0],
                        uuid=reported[(gpu_id, gi_id)][1], memory_total_mib=reported[(gpu_id, gi_id)][2])
            for gpu_id, gi_id in fresh_keys
        )


def _store_usage(
    node: Node, batch: BatchIn, start: datetime, end: datetime, fresh: bool, received_at: datetime
) -> None:
    if not batch.engines:
        return
    rows = [
        ServingEndpoint(
            node=node, url=e.endpoint, model=e.model, engine=e.engine, version=e.version or "",
            settings=e.settings, up=e.up, probe_latency_ms=e.probe_latency_ms, running=e.running,
            waiting=e.waiting, kv_cache_usage=e.kv_cache_usage, last_seen=end,
        )
        for e in batch.engines
    ]
    if fresh:
        ServingEndpoint.objects.bulk_create(
            rows, update_conflicts=True, unique_fields=["node", "url", "model"], update_fields=_ENDPOINT_CURRENT_FIELDS
        )
        ids = {(r.url, r.model): r.pk for r in rows}
    else:
        ids = {
            (url, model): pk
            for pk, url, model in ServingEndpoint.objects.filter(node=node).values_list("pk", "url", "model")
        }
        missing = [r for r in rows if (r.url, r.model) not in ids]
        ServingEndpoint.objects.bulk_create(missing)
        ids.update({(r.url, r.model): r.pk for r in missing})
    insert_rows(UsageSample, [
        {
            "endpoint_id": ids[(e.endpoint, e.model)], "ts": start, "received_at": received_at,
            "prompt_tokens": e.prompt_tokens,
            "generation_tokens": e.generation_tokens, "requests_ok": e.requests_ok,
            "requests_failed": e.requests_failed, "probes": 1, "probes_up": int(e.up),
            **{name: getattr(e, name).model_dump() if getattr(e, name) else None for name in HISTOGRAMS},
        }
        for e in batch.engines
    ])


_EVENT_SEVERITY = {
    HealthEventKind.ECC_UNCORRECTED: Severity.CRITICAL,
    HealthEventKind.REMAPPED_ROWS: Severity.CRITICAL,
    HealthEventKind.GPU_LOST: Severity.CRITICAL,
    HealthEventKind.THERMAL_THROTTLE: Severity.WARNING,
    HealthEventKind.POWER_THROTTLE: Severity.INFO,
}


def _store_events(node: Node, batch: BatchIn, gpu_ids: dict[str, int]) -> None:
    if not batch.events:
        return
    events = [
        HealthEvent(
            node=node, gpu_id=gpu_ids.get(e.gpu_uuid) if e.gpu_uuid else None, kind=e.kind, code=e.code,
            detail=e.detail, at=_utc(e.ts),
        )
        for e in batch.events
    ]
    HealthEvent.objects.bulk_create(events)
    for event in events:
        if event.kind == HealthEventKind.XID:
            alert = xid_alert(event.code)
            if alert is None:
                continue
            severity, title = alert
        elif event.kind in _EVENT_SEVERITY and _EVENT_SEVERITY[event.kind] != Severity.INFO:
            severity, title = _EVENT_SEVERITY[event.kind], HealthEventKind(event.kind).label
        else:
            continue
        alert_raise(
            key=f"{event.kind}:{event.code or ''}:{event.gpu_id or node.pk}", kind=event.kind, severity=severity,
            title=f"{title} on {node.hostname}", detail=event.detail, at=event.at, node_id=node.pk,
            gpu_id=event.gpu_id,
        )


def _touch_node(node: Node, credential: NodeCredential, batch: BatchIn, now: datetime, fresh: bool) -> None:
    changed = _apply_host_facts(node, batch.host.model_dump()) if fresh else []
    if node.last_seen is None or node.last_seen < now - LAST_SEEN_EVERY:
        node.last_seen = now
        changed.append("last_seen")
        NodeCredential.objects.filter(pk=credential.pk).update(last_used_at=now)
    if changed:
        node.save(update_fields=changed)
    if fresh and node.status in (NodeStatus.PENDING, NodeStatus.OFFLINE):
        node_mark_status(node=node, status=NodeStatus.ONLINE, at=now, reason=f"batch seq {batch.seq} received")
