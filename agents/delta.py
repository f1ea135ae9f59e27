"""Cumulative counters and histograms → exact integer deltas per interval.

Rules (also in docs/agent.md):
- A counter that went down was reset: the delta is the new value (Prometheus' rule). Otherwise new - old.
  Values are rounded to integers before subtracting, so deltas telescope: their sum is exactly last - first.
- A histogram is a set of counters, one per bucket plus the sum, and the rule applies to each series on its own
  (as Prometheus' rate() does): a bucket that went down contributes its new value, the others their increase. A
  bucket whose delta exceeds the next one's is lowered to it, so the deltas stay cumulative and the +Inf bucket
  (the request count) keeps its own rule. Changed bucket bounds are a new histogram: the delta is all of it.
- The engine's own process start (`process_start_time_seconds`, where it exports it) says when its counters began:
  a process that started after the previous scrape was restarted, so every series counts from zero (its whole
  value is the delta) even if it already passed its old value.
- First sight of an endpoint: if its process started after the agent was first told to scrape it, everything it
  counted was served while we watched, and counts. Otherwise (or without a start time) every series is taken as a
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
    """Return (cumulative bucket deltas, sum delta, a series was reset). ``prev`` is the stored [le, counts, sum];
    None (or other bounds) means the whole histogram is new."""
    counts = [round(c) for c in new.counts]
    if prev is None or tuple(prev[0]) != tuple(new.le) or len(prev[1]) != len(counts):
        return counts, max(0.0, new.sum), prev is not None
    p_counts = [round(c) for c in prev[1]]
    deltas = [n if n < p else n - p for n, p in zip(counts, p_counts, strict=True)]
    for i in range(len(deltas) - 2, -1, -1):  # keep them cumulative: never more below a bound than above it
        deltas[i] = min(deltas[i], deltas[i + 1])
    total = new.sum if new.sum < prev[2] else new.sum - prev[2]
    reset = any(n < p for n, p in zip(counts, p_counts, strict=True)) or new.sum < prev[2]
    return deltas, max(0.0, total), reset
def _hist_state(h: Hist) -> list:
    return [list(h.le), list(h.counts), h.sum]


class DeltaTracker:
    """Holds last-seen cumulative values; ``compute`` is pure, ``commit`` applies its updates after spooling."""

    def __init__(self, state: dict[str, Any] | None = None):
        self.state: dict[str, Any] = dict(state or {})

    def commit(self, updates: dict[str, Any]) -> None:
        self.state.update(updates)

    def compute(self, readings: list[EndpointReading], now: float | None = None) -> tuple[list[dict[str, Any]],
                                                                                      dict[str, Any]]:
        """Deltas of `readings` taken at `now` (the interval's end), and the state updates to commit with them."""
        updates: dict[str, Any] = {}
        engines: list[dict[str, Any]] = []
        seen: set[tuple[str, str]] = set()
        for r in readings:
            ep_key = f"ep|{r.endpoint}"
            known = ep_key in self.state
            configured = self.state.get(f"cfg|{r.endpoint}")
            if configured is None and now is not None:
                updates[f"cfg|{r.endpoint}"] = configured = now  # first told to scrape it (or first run)
            restarted = self._restarted(r, known, configured, now, updates)
            if r.up and not known:
                updates[ep_key] = 1
                if not restarted:
                    log.info("%s: first successful scrape, counters taken as baseline (delta 0)", r.endpoint)
            # A restarted (or, on first sight, newly started) engine counts from zero: no previous values.
            baseline = r.up and not known and not restarted
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
                    "token_families": [name[:128] for name in r.token_families][:16],
                }
                for fld in COUNTER_FIELDS:
                    total = 0
                    for series, value in m.counters.get(fld, {}).items():
                        key = f"c|{r.endpoint}|{model}|{series}"
                        prev = None if restarted else self.state.get(key)
                        delta = 0 if (prev is None and baseline) else counter_delta(prev, value)
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
                    rec[fld] = self._hist(r.endpoint, model, baseline, restarted, m.hists.get(fld, {}), updates)
                rec["settings"] = dict(m.settings)
                engines.append(rec)
        return engines, updates

    def _restarted(self, r: EndpointReading, known: bool, configured: float | None, now: float | None,
                   updates: dict[str, Any]) -> bool:
        """Whether the engine's process started after we last saw it (or, on first sight, after we were told to
        watch it): then all it counted is new."""
        key = f"at|{r.endpoint}"
        last = self.state.get(key)
        if r.up and now is not None:
            updates[key] = now
        if not r.up or r.process_start is None:
            return False
        since = last if known else configured
        if since is None or r.process_start <= since:
            return False
        log.info("%s: engine process started at %.0f, after %s at %.0f: its counters are all new", r.endpoint,
                 r.process_start, "the last scrape" if known else "the agent was told to scrape it", since)
        return True

    def _hist(self, endpoint: str, model: str, baseline: bool, restarted: bool, series: dict[str, Hist],
              updates: dict[str, Any]):
        merged: dict[str, Any] | None = None
        for name, h in sorted(series.items()):
            key = f"h|{endpoint}|{model}|{name}"
            prev = None if restarted else self.state.get(key)
            updates[key] = _hist_state(h)
            if prev is None and baseline:
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
