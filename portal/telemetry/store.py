"""The store worker's step: accepted agent batches into the storage tiers, hundreds per transaction.

`batches_store` (run continuously by `manage.py store_batches`) takes accepted batches and writes them in one
transaction: one COPY per table and one update of current values for all of them, so a commit and each statement
are paid per flush, not per batch. A flush that fails is retried in halves, so a batch that cannot be stored is set
aside alone and never stops storage for the others. The query count of a flush does not grow with its batches.
"""

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import connection, transaction
from django.utils import timezone

from portal.alerts.models import Severity
from portal.alerts.services import alert_raise, alert_resolve_key
from portal.fleet.models import Gpu, HealthEvent, HealthEventKind, MigInstance, Node, NodeStatus, ServingEndpoint
from portal.fleet.services import _apply_host_facts, node_mark_status
from portal.health.pipeline import health_apply
from portal.telemetry.bulk import insert_rows, update_rows
from portal.telemetry.models import GpuSample, IngestedBatch, UsageSample
from portal.telemetry.schemas import HISTOGRAMS, BatchIn, EngineIn, GpuIn, MigInstanceIn
from portal.telemetry.services import utc
from portal.telemetry.xid import xid_alert

logger = logging.getLogger(__name__)

# A batch older than this many intervals is a replay from the agent's spool: it adds history, not current state.
FRESH_INTERVALS = 3
# Batches per store transaction: large enough to share the commit and statement costs, small enough to keep the
# transaction well inside the rollups' settle time (telemetry.rollups.SETTLE).
STORE_BATCHES = 500
SET_ASIDE_ALERT = "batches_set_aside"


@dataclass
class _Taken:
    pk: int
    node: Node
    received_at: datetime
    batch: BatchIn
    fresh: bool


class Unstorable(Exception):
    """An accepted batch that contradicts the database (only possible for batches accepted by an older release)."""


def batches_store(*, limit: int = STORE_BATCHES) -> int:
    """Write up to `limit` accepted batches, newest first, into the storage tiers in one transaction; returns how
    many were taken.
    Several workers may run: each skips the batches another holds. A flush that fails, whatever the reason, is
    retried in halves until each failing batch is alone; such a batch is set aside with its error (payload kept,
    an alert raised; `store_batches --retry-failed` queues it again) and the rest are stored, so no batch can stop
    storage for the others. Losing the database raises: nothing is set aside for that."""
    with transaction.atomic():
        # Newest first: after an outage a node's hours of backlog arrive beside its fresh intervals, and the
        # dashboards need the fresh ones now; the backlog fills in behind them (its rows are history).
        rows = list(IngestedBatch.objects.filter(stored_at__isnull=True, store_error="").order_by("-pk")
                    .select_for_update(skip_locked=True)
                    .values_list("pk", "node_id", "received_at", "payload")[:limit])
        if rows:
            _store_isolating(rows)
    return len(rows)


def _store_isolating(rows: list[tuple]) -> None:
    if (error := _try_store(rows)) is None:
        return
    if len(rows) > 1:
        logger.warning("storing %d batches failed (%s: %s); retrying in halves", len(rows), type(error).__name__, error)
        middle = len(rows) // 2
        _store_isolating(rows[:middle])
        _store_isolating(rows[middle:])
        return
    # Alone now: once more, so a passing conflict (a deadlock, say) sets nothing aside.
    if (error := _try_store(rows)) is not None:
        _set_aside(rows[0], error)


def _try_store(rows: list[tuple]) -> Exception | None:
    """Store these batches in a savepoint; the exception that undid them, if any."""
    try:
        with transaction.atomic():
            _store(rows)
    except Exception as exc:
        if not connection.is_usable():
            raise  # the database is gone, not the batch: the caller retries later, nothing is set aside
        return exc
    return None


def _set_aside(row: tuple, exc: Exception) -> None:
    pk, node_id = row[0], row[1]
    error = f"{type(exc).__name__}: {exc}"[:2000]
    logger.error("batch %d of node %d could not be stored; set aside: %s", pk, node_id, error)
    IngestedBatch.objects.filter(pk=pk).update(store_error=error)
    hostname = Node.objects.filter(pk=node_id).values_list("hostname", flat=True).first() or f"node {node_id}"
    alert_raise(
        key=f"{SET_ASIDE_ALERT}:{node_id}", kind=SET_ASIDE_ALERT, severity=Severity.CRITICAL,
        title=f"Batches set aside from {hostname}", node_id=node_id, at=timezone.now(),
        detail=(f"Batch {pk} could not be stored ({error[:300]}). Its readings and tokens are kept but not in the "
                "tiers until it is queued again (Fleet page, or store_batches --retry-failed)."),
    )


def batches_requeue_set_aside() -> int:
    """Queue every set-aside batch again (after a fix) and resolve their alerts; returns how many."""
    node_ids = set(IngestedBatch.objects.filter(stored_at__isnull=True).exclude(store_error="")
                   .values_list("node_id", flat=True))
    requeued = IngestedBatch.objects.filter(stored_at__isnull=True).exclude(store_error="").update(store_error="")
    for node_id in node_ids:
        alert_resolve_key(key=f"{SET_ASIDE_ALERT}:{node_id}")
    return requeued


def _store(rows: list[tuple]) -> None:
    now = timezone.now()
    nodes = Node.objects.in_bulk({node_id for _pk, node_id, _received, _payload in rows})
    taken = []
    for pk, node_id, received_at, payload in rows:
        node = nodes[node_id]
        batch = BatchIn.model_validate_json(bytes(payload))
        fresh = utc(batch.interval_end) >= received_at - timedelta(seconds=FRESH_INTERVALS * node.interval_s)
        taken.append(_Taken(pk=pk, node=node, received_at=received_at, batch=batch, fresh=fresh))
    gpu_ids = _store_gpus(taken, now)
    _store_usage(taken, now)
    _store_events(taken, gpu_ids)
    _update_nodes(taken)
    IngestedBatch.objects.filter(pk__in=[t.pk for t in taken]).update(stored_at=now, payload=None)


def _newest(current: dict, key, item: _Taken, value) -> None:
    """Keep, per key, the value from the newest fresh batch (or, failing any, the newest replayed one)."""
    rank = (item.fresh, item.batch.interval_end)
    if key not in current or rank > current[key][0]:
        current[key] = (rank, item, value)


def _store_gpus(taken: list[_Taken], now: datetime) -> dict[tuple[int, str], int]:
    """Set the GPUs' current values from the newest reading of each (creating GPUs seen for the first time),
    append every sample; returns (node, uuid) -> GPU id."""
    uuids = {g.uuid for t in taken for g in t.batch.gpus}
    known = {uuid: (pk, node_id, mig, current_at) for pk, uuid, node_id, mig, current_at in
             Gpu.objects.filter(uuid__in=uuids).values_list("pk", "uuid", "node_id", "mig_mode", "current_at")}
    current: dict[str, tuple] = {}
    for t in taken:
        for g in t.batch.gpus:
            owner = known.get(g.uuid)
            # Ownership was settled when the batch was accepted; a contradiction sets the batch aside, never a
            # reading silently dropped.
            if owner is None or owner[1] != t.node.pk:
                raise Unstorable(f"GPU {g.uuid} is not a GPU of node {t.node.pk}")
            # A replay only sets the current state of a GPU that has none yet.
            if t.fresh or owner[3] is None:
                _newest(current, g.uuid, t, g)
    update_rows(Gpu, [{"id": known[uuid][0], **_gpu_current(t, g)} for uuid, (_rank, t, g) in current.items()])
    ids = {(node_id, uuid): pk for uuid, (pk, node_id, _mig, _at) in known.items()}
    # MIG layouts are only read when MIG is (or was) in play: most flushes skip a query.
    layouts = [(ids[(t.node.pk, g.uuid)], g.mig_instances) for _rank, t, g in current.values()
               if t.fresh and (g.mig_mode or g.mig_instances or known[g.uuid][2])]
    if layouts:
        _sync_mig(layouts)
    samples = []
    for t in taken:
        start, seconds = utc(t.batch.interval_start), t.batch.interval_end - t.batch.interval_start
        for g in t.batch.gpus:
            samples.append({
                "gpu_id": ids[(t.node.pk, g.uuid)], "ts": start, "stored_at": now, "seconds": seconds,
                "util_mean": g.util_mean, "util_max": g.util_max, "mem_util_mean": g.mem_util_mean,
                "memory_used_mib": g.memory_used_mib, "power_mean_w": g.power_mean_w, "energy_mj": g.energy_mj,
                "temp_max_c": g.temp_max_c, "sm_clock_mhz": g.sm_clock_mhz,
            })
    insert_rows(GpuSample, samples)
    return ids


def _gpu_current(t: _Taken, g: GpuIn) -> dict:
    return {
        "index": g.index, "name": g.name, "pci_bus_id": g.pci_bus_id or "", "memory_total_mib": g.memory_total_mib,
        "power_limit_w": g.power_limit_w, "mig_mode": bool(g.mig_mode), "cc_mode": g.cc_mode or "",
        "current_util": g.util_mean, "current_power_w": g.power_mean_w, "current_temp_c": g.temp_max_c,
        "current_memory_used_mib": g.memory_used_mib, "current_at": utc(t.batch.interval_end),
        "ecc_uncorrected_total": g.ecc_uncorrected_total, "retired_pages": g.retired_pages,
        "remapped_rows_failure": g.remapped_rows_failure,
    }


def _sync_mig(layouts: list[tuple[int, list[MigInstanceIn]]]) -> None:
    """Bring the stored MIG instances in line with the reported layouts. An instance keeps its row (and the
    allocations that hold it) while its GPU instance keeps its profile: a UUID or size learnt later is updated in
    place. One reconfigured or destroyed is deleted, unless an allocation holds it: then it stays, with a warning,
    until the operator ends that allocation (the database refuses to orphan it)."""
    reported = {(gpu_id, m.gi_id): m for gpu_id, instances in layouts for m in instances}
    existing = {(m.gpu_id, m.gi_id): m for m in MigInstance.objects.filter(gpu_id__in=[g for g, _ in layouts])}
    updated = []
    for key, m in existing.items():
        new = reported.get(key)
        if new is not None and new.profile == m.profile and (new.uuid or "", new.memory_total_mib) != (
                m.uuid, m.memory_total_mib):
            m.uuid, m.memory_total_mib = new.uuid or "", new.memory_total_mib
            updated.append(m)
    if updated:
        MigInstance.objects.bulk_update(updated, ["uuid", "memory_total_mib"])
    gone = {m.pk: key for key, m in existing.items() if key not in reported or reported[key].profile != m.profile}
    if gone:
        held = set(MigInstance.objects.filter(pk__in=gone, allocations__isnull=False).values_list("pk", flat=True))
        for pk in held:
            logger.warning("MIG instance %s (GPU %s, GI %s) changed or disappeared but an allocation holds it; kept",
                           pk, *gone[pk])
        MigInstance.objects.filter(pk__in=gone.keys() - held).delete()
        existing = {key: m for key, m in existing.items() if m.pk not in gone or m.pk in held}
    created = [MigInstance(gpu_id=gpu_id, gi_id=gi_id, profile=m.profile, uuid=m.uuid or "",
                           memory_total_mib=m.memory_total_mib)
               for (gpu_id, gi_id), m in reported.items() if (gpu_id, gi_id) not in existing]
    if created:
        MigInstance.objects.bulk_create(created)


def _store_usage(taken: list[_Taken], now: datetime) -> None:
    """Set each endpoint's current state from its newest fresh reading (creating endpoints seen for the first
    time, from replays too), append every interval's usage."""
    keys = {(t.node.pk, e.endpoint, e.model) for t in taken for e in t.batch.engines}
    if not keys:
        return
    ids, since = {}, {}
    for pk, node_id, url, model, unbillable_since in ServingEndpoint.objects.filter(
            node_id__in={key[0] for key in keys}).values_list("pk", "node_id", "url", "model", "unbillable_since"):
        ids[(node_id, url, model)], since[pk] = pk, unbillable_since
    current: dict[tuple[int, str, str], tuple] = {}
    for t in taken:
        for e in t.batch.engines:
            key = (t.node.pk, e.endpoint, e.model)
            if t.fresh or key not in ids:
                _newest(current, key, t, e)
    created = [ServingEndpoint(node=t.node, url=e.endpoint, model=e.model, **_endpoint_current(t, e, None))
               for key, (_rank, t, e) in current.items() if key not in ids]
    if created:
        ServingEndpoint.objects.bulk_create(created)
    update_rows(ServingEndpoint, [{"id": ids[key], **_endpoint_current(t, e, since[ids[key]])}
                                  for key, (_rank, t, e) in current.items() if key in ids])
    ids.update({(r.node_id, r.url, r.model): r.pk for r in created})
    insert_rows(UsageSample, [
        {
            "endpoint_id": ids[(t.node.pk, e.endpoint, e.model)], "ts": utc(t.batch.interval_start),
            "stored_at": now, "prompt_tokens": e.prompt_tokens, "generation_tokens": e.generation_tokens,
            "requests_ok": e.requests_ok, "requests_failed": e.requests_failed, "probes": 1, "probes_up": int(e.up),
            **{name: getattr(e, name).model_dump() if getattr(e, name) else None for name in HISTOGRAMS},
        }
        for t in taken for e in t.batch.engines
    ])


def _endpoint_current(t: _Taken, e: EngineIn, unbillable_since: datetime | None) -> dict:
    """An endpoint that answers with none of the token counters the agent knows is unbillable from the first such
    reading on (an agent too old to report its families says nothing either way)."""
    unbillable = e.up and e.token_families is not None and not e.token_families
    return {
        "engine": e.engine, "version": e.version or "", "settings": e.settings, "up": e.up,
        "probe_latency_ms": e.probe_latency_ms, "running": e.running, "waiting": e.waiting,
        "kv_cache_usage": e.kv_cache_usage, "last_seen": utc(t.batch.interval_end),
        "token_families": e.token_families,
        "unbillable_since": (unbillable_since or utc(t.batch.interval_end)) if unbillable else None,
    }


_EVENT_SEVERITY = {
    HealthEventKind.ECC_UNCORRECTED: Severity.CRITICAL,
    HealthEventKind.REMAPPED_ROWS: Severity.CRITICAL,
    HealthEventKind.GPU_LOST: Severity.CRITICAL,
    HealthEventKind.THERMAL_THROTTLE: Severity.WARNING,
    HealthEventKind.POWER_THROTTLE: Severity.INFO,
}


def _store_events(taken: list[_Taken], gpu_ids: dict[tuple[int, str], int]) -> None:
    events = [
        HealthEvent(
            node=t.node, gpu_id=gpu_ids.get((t.node.pk, e.gpu_uuid)) if e.gpu_uuid else None, kind=e.kind,
            code=e.code, detail=e.detail, at=utc(e.ts),
        )
        for t in taken for e in t.batch.events
    ]
    if events:
        health_events_record(events=events)


def health_events_record(*, events: list[HealthEvent]) -> None:
    """Store health events as a batch brings them: the health policy acts on them (incidents, cordons, tenant
    notices, SLA marks), and those an operator must see open or repeat their alert."""
    HealthEvent.objects.bulk_create(events)
    health_apply(events=events)
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
            key=f"{event.kind}:{event.code or ''}:{event.gpu_id or event.node.pk}", kind=event.kind,
            severity=severity, title=f"{title} on {event.node.hostname}", detail=event.detail, at=event.at,
            node_id=event.node.pk, gpu_id=event.gpu_id,
        )


def _update_nodes(taken: list[_Taken]) -> None:
    """Host facts from each node's newest fresh batch; a pending or offline node that reported is online."""
    newest: dict[int, tuple] = {}
    for t in taken:
        if t.fresh:
            _newest(newest, t.node.pk, t, None)
    for _rank, t, _value in newest.values():
        changed = _apply_host_facts(t.node, t.batch.host.model_dump())
        held = (t.batch.quarantined_batches, t.batch.quarantined_tokens)
        if held != (t.node.quarantined_batches, t.node.quarantined_tokens):
            t.node.quarantined_batches, t.node.quarantined_tokens = held
            changed += ["quarantined_batches", "quarantined_tokens"]
            _quarantine_alert(t)
        if changed:
            t.node.save(update_fields=changed)
        if t.node.status in (NodeStatus.PENDING, NodeStatus.OFFLINE):
            node_mark_status(node=t.node, status=NodeStatus.ONLINE, at=t.received_at,
                             reason=f"batch seq {t.batch.seq} received")


QUARANTINE_ALERT = "agent_quarantine"


def _quarantine_alert(t: _Taken) -> None:
    """Open while the node's agent holds quarantined batches: their tokens are on no invoice until sent again."""
    key = f"{QUARANTINE_ALERT}:{t.node.pk}"
    batches, tokens = t.batch.quarantined_batches, t.batch.quarantined_tokens
    if not batches:
        alert_resolve_key(key=key)
        return
    alert_raise(
        key=key, kind=QUARANTINE_ALERT, severity=Severity.CRITICAL, at=utc(t.batch.interval_end), node_id=t.node.pk,
        title=f"{batches} batch{'es' if batches != 1 else ''} quarantined on {t.node.hostname}",
        detail=(f"The agent holds {batches} batch(es) the portal refused (409, 413 or 422), with {tokens:,} tokens "
                "that are on no invoice yet. A 413 or 422: fix the cause, then run `tokenmill-agent requeue --all` "
                "on the node (each batch keeps its seq, so it is stored once). A 409: the node's spool was lost or "
                "restored and its numbering met the portal's; the batch that met it is held because after a "
                "restore its tokens may already be here: compare its interval with the node's stored batches "
                "before requeueing it (it is sent under a new seq)."),
    )
