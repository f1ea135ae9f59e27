"""Counter and histogram deltas: Prometheus reset rule, baselines, and the sum-of-deltas property."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from agents.delta import DeltaTracker, counter_delta, hist_delta
from agents.engines import EndpointReading, Hist, ModelReading

LE = (0.1, 0.5, 1.0)

# a step is either an increase ("inc", k) or a detectable reset to a smaller value ("reset", r)
steps = st.lists(st.one_of(st.tuples(st.just("inc"), st.integers(0, 10**9)),
                           st.tuples(st.just("reset"), st.integers(0, 10**9))), max_size=40)


@settings(max_examples=300, deadline=None)
@given(start=st.integers(0, 10**12), steps=steps)
def test_counter_deltas_sum_to_true_increase(start, steps):
    value, prev, true_increase, summed = start, float(start), 0, 0
    for kind, amount in steps:
        if kind == "inc":
            value += amount
            true_increase += amount
        else:
            if value == 0:
                continue  # a reset from 0 is not observable
            value = amount % value  # strictly below the previous reading: a visible reset
            true_increase += value  # tokens since the restart
        d = counter_delta(prev, float(value))
        assert d >= 0
        summed += d
        prev = float(value)
    assert summed == true_increase


bucket_incs = st.lists(st.integers(0, 1000), min_size=len(LE) + 1, max_size=len(LE) + 1)


def cumulative(per_bucket):
    out, acc = [], 0
    for c in per_bucket:
        acc += c
        out.append(acc)
    return out


@settings(max_examples=200, deadline=None)
@given(seq=st.lists(st.tuples(st.booleans(), bucket_incs, st.floats(0, 1e6)), min_size=1, max_size=25))
def test_histogram_deltas_sum_to_true_increase(seq):
    per_bucket = [0] * (len(LE) + 1)
    total_sum = 0.0
    true_counts = [0] * (len(LE) + 1)
    true_sum = 0.0
    prev = None
    got_counts = [0] * (len(LE) + 1)
    got_sum = 0.0
    for reset, incs, s in seq:
        if reset and sum(per_bucket) > 0:
            per_bucket, total_sum = [0] * (len(LE) + 1), 0.0
            # a reset is only observable when the new count is below the old one: make sure it is
            incs = [0] * (len(LE) + 1)
            s = 0.0
        per_bucket = [a + b for a, b in zip(per_bucket, incs, strict=True)]
        total_sum += s
        true_counts = [a + b for a, b in zip(true_counts, incs, strict=True)]
        true_sum += s
        h = Hist(le=LE, counts=[float(c) for c in cumulative(per_bucket)], sum=total_sum)
        counts, dsum, _ = hist_delta(prev, h)
        assert all(b >= a for a, b in itertools.pairwise(counts))  # still cumulative
        got_counts = [a + b for a, b in zip(got_counts, counts, strict=True)]
        got_sum += dsum
        prev = [list(h.le), list(h.counts), h.sum]
    assert got_counts == cumulative(true_counts)
    assert abs(got_sum - true_sum) <= 1e-6 * max(1.0, true_sum)


def test_a_histogram_applies_the_reset_rule_per_series():
    prev = [list(LE), [5, 8, 9, 10], 4.0]
    # One bucket down while the count rises: that bucket alone is reset (its new value), the count's own rule
    # gives one request, and the lower buckets are lowered to stay cumulative: not a reset of all 11.
    counts, s, reset = hist_delta(prev, Hist(LE, [6, 7, 9, 11], 5.0))
    assert reset and counts == [0, 0, 0, 1] and s == 1.0
    # The sum is a series too: one that went down was reset.
    counts, s, reset = hist_delta(prev, Hist(LE, [6, 9, 10, 12], 1.5))
    assert reset and counts == [1, 1, 1, 2] and s == 1.5
    # Everything down (a restart): every series' new value.
    counts, s, reset = hist_delta(prev, Hist(LE, [1, 1, 2, 3], 0.5))
    assert reset and counts == [1, 1, 2, 3] and s == 0.5
    counts, s, reset = hist_delta(prev, Hist((0.1, 0.5, 2.0), [6, 9, 10, 11], 5.0))  # bounds changed
    assert reset
    counts, s, reset = hist_delta(prev, Hist(LE, [6, 9, 10, 12], 6.5))
    assert not reset and counts == [1, 1, 1, 2] and s == 2.5


def reading(endpoint, value, up=True, model="m", series="vllm:prompt_tokens_total|"):
    return EndpointReading(endpoint=endpoint, engine="vllm", up=up,
                           models={model: ModelReading(counters={"prompt_tokens": {series: value}})})


def test_first_sight_of_endpoint_is_baseline_then_new_series_count_fully():
    t = DeltaTracker()
    engines, upd = t.compute([reading("http://e/metrics", 1000.0)])
    assert engines[0]["prompt_tokens"] == 0  # tokens served before the agent existed are not billed
    t.commit(upd)
    engines, upd = t.compute([reading("http://e/metrics", 1010.0)])
    assert engines[0]["prompt_tokens"] == 10
    t.commit(upd)
    # a model that appears later on a known endpoint started from zero after the baseline
    engines, upd = t.compute([reading("http://e/metrics", 7.0, model="new-model")])
    assert engines[0]["prompt_tokens"] == 7
    t.commit(upd)
    # the endpoint goes down: an up=False record, deltas zero, state untouched
    engines, upd = t.compute([reading("http://e/metrics", 0.0, up=False)])
    assert engines[0]["up"] is False
    # engine restarted: the counter went down -> the new value is the delta
    engines, upd = t.compute([reading("http://e/metrics", 3.0)])
    assert engines[0]["prompt_tokens"] == 3


def test_compute_is_pure_until_commit():
    t = DeltaTracker()
    t.commit(t.compute([reading("http://e/metrics", 100.0)])[1])
    first, _ = t.compute([reading("http://e/metrics", 150.0)])
    again, _ = t.compute([reading("http://e/metrics", 150.0)])  # e.g. the spool write failed: same delta again
    assert first[0]["prompt_tokens"] == again[0]["prompt_tokens"] == 50


def test_float_counters_round_and_telescope():
    assert counter_delta(8.128902e06, 8.128902e06 + 0.4) == 0
    assert counter_delta(1.4, 2.6) == 2
    assert counter_delta(None, 5.0) == 5


def test_nodes_end_their_intervals_at_spread_but_stable_phases():
    from agents.daemon import _next_boundary, send_phase

    phases = {send_phase(f"gpu-node-{i:03d}", 10) for i in range(200)}
    assert all(0 <= p < 10 for p in phases) and len(phases) > 150  # spread over the interval
    assert send_phase("gpu-node-001", 10) == send_phase("gpu-node-001", 10)
    phase = send_phase("gpu-node-001", 10)
    boundary = _next_boundary(1_000_000.0, 10, 1.0, phase)
    assert (boundary - phase) % 10 == 0 and 1_000_001.0 <= boundary < 1_000_011.0
