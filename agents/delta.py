"""Cumulative counters and histograms → exact integer deltas per interval.

Rules (also in docs/agent.md):
- A counter that went down was reset: the delta is the new value (Prometheus' rule). Otherwise new - old.
  Values are rounded to integers before subtracting, so deltas telescope: their sum is exactly last - first.
- A histogram whose count, or any bucket, went down (or whose bucket bounds changed) was reset: the delta is the
  whole new histogram. Otherwise each cumulative bucket, the count and the sum are subtracted.
- First sight of an endpoint (first successful scrape after enrolment / state loss): every series is taken as a
  baseline and reported as 0, so tokens served before the agent existed are never billed.
- First sight of a series on an endpoint that is already baselined (a new model, a new finished_reason label, ...):
  the series started at zero after the baseline, so its whole value is the delta.
- The last-seen values live in the spool database and are written in the same transaction as the batch that
  carries the deltas, so a restart neither loses nor repeats a token.
"""

from __future__ import annotations

import logging
from typing import Any

from agents.engines import COUNTER_FIELDS, HIST_FIELDS, EndpointReading, Hist

log = logging.getLogger(__name__)

MAX_DELTA = 10**12  # the contract's MAX_TOKENS_PER_INTERVAL


def counter_delta(prev: float | None, new: float) -> int:
    """Delta of a cumulative counter; ``prev is None`` means no previous value (the caller decides baselines)."""
    new_i = round(new)
    if prev is None:
        return new_i
    prev_i = round(prev)
    return new_i if new_i < prev_i else new_i - prev_i


def hist_delta(prev: list | None, new: Hist) -> tuple[list[int], float, bool]:
    """Return (cumulative bucket deltas, sum delta, was_reset). ``prev`` is the stored [le, counts, sum]."""
    counts = [round(c) for c in new.counts]
    if prev is not None:
        p_le, p_counts, p_sum = prev
        p_counts = [round(c) for c in p_counts]
        same_shape = tuple(p_le) == tuple(new.le) and len(p_counts) == len(counts)
        if same_shape and all(n >= p for n, p in zip(counts, p_counts, strict=True)):
            return [n - p for n, p in zip(counts, p_counts, strict=True)], max(0.0, new.sum - p_sum), False
    return counts, max(0.0, new.sum), prev is not None


def _hist_state(h: Hist) -> list:
    return [list(h.le), list(h.counts), h.sum]


class DeltaTracker:
    """Holds last-seen cumulative values; ``compute`` is pure, ``commit`` applies its updates after spooling."""

    def __init__(self, state: dict[str, Any] | None = None):
        self.state: dict[str, Any] = dict(state or {})

    def commit(self, updates: dict[str, Any]) -> None:
        self.state.update(updates)

    def compute(self, readings: list[EndpointReading]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        updates: dict[str, Any] = {}
        engines: list[dict[str, Any]] = []
        seen: set[tuple[str, str]] = set()
        for r in readings:
            ep_key = f"ep|{r.endpoint}"
            known = ep_key in self.state
            if r.up and not known:
                updates[ep_key] = 1
                log.info("%s: first successful scrape, counters taken as baseline (delta 0)", r.endpoint)
            for model, m in sorted(r.models.items()):
                if (r.endpoint, model) in seen:
                    continue
                seen.add((r.endpoint, model))
                rec: dict[str, Any] = {
                    "endpoint": r.endpoint[:500],
                    "engine": r.engine,
                    "model": model[:200] or "unknown",
                    "up": r.up,
                    "probe_latency_ms": r.latency_ms,
                    "version": r.version,
                }
                for fld in COUNTER_FIELDS:
                    total = 0
                    for series, value in m.counters.get(fld, {}).items():
                        key = f"c|{r.endpoint}|{model}|{series}"
                        prev = self.state.get(key)
                        delta = 0 if (prev is None and not known) else counter_delta(prev, value)
                        if not 0 <= delta <= MAX_DELTA:
                            log.error("%s %s %s: implausible delta %s ignored, re-baselined", r.endpoint, model,
                                      series, delta)
                            delta = 0
                        updates[key] = value
                        total += delta
                    rec[fld] = min(total, MAX_DELTA)
                for fld in ("running", "waiting", "kv_cache_usage"):
                    rec[fld] = m.gauges.get(fld)
                for fld in HIST_FIELDS:
                    rec[fld] = self._hist(r.endpoint, model, known, m.hists.get(fld, {}), updates)
                rec["settings"] = dict(m.settings)
                engines.append(rec)
        return engines, updates

    def _hist(self, endpoint: str, model: str, known: bool, series: dict[str, Hist], updates: dict[str, Any]):
        merged: dict[str, Any] | None = None
        for name, h in sorted(series.items()):
            key = f"h|{endpoint}|{model}|{name}"
            prev = self.state.get(key)
            updates[key] = _hist_state(h)
            if prev is None and not known:
                continue
            counts, total, _reset = hist_delta(prev, h)
            if counts[-1] <= 0:
                continue
            if any(c > MAX_DELTA for c in counts):
                log.error("%s %s %s: implausible histogram delta ignored", endpoint, model, name)
                continue
            if merged is None:
                merged = {"le": list(h.le), "counts": counts, "sum": total}
            elif merged["le"] == list(h.le):
                merged["counts"] = [a + b for a, b in zip(merged["counts"], counts, strict=True)]
                merged["sum"] += total
            else:
                log.warning("%s %s: series %s has different bucket bounds; not merged", endpoint, model, name)
        return merged
