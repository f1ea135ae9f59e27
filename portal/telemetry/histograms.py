"""Prometheus-style cumulative histograms: merging deltas and computing quantiles like histogram_quantile()."""

import math

Histogram = dict  # {"le": [finite bounds...], "counts": [cumulative..., +Inf], "sum": float}


def merge(a: Histogram | None, b: Histogram | None) -> Histogram | None:
    """Sum two histogram deltas. When their bounds differ (an engine upgrade changed buckets) the result keeps only
    the bounds both share, where cumulative counts are still exact."""
    if a is None:
        return b
    if b is None:
        return a
    if a["le"] == b["le"]:
        return {"le": list(a["le"]), "counts": [x + y for x, y in zip(a["counts"], b["counts"], strict=True)],
                "sum": a["sum"] + b["sum"]}
    shared = sorted(set(a["le"]) & set(b["le"]))
    pick_a = [a["le"].index(bound) for bound in shared]
    pick_b = [b["le"].index(bound) for bound in shared]
    counts = [a["counts"][i] + b["counts"][j] for i, j in zip(pick_a, pick_b, strict=True)]
    counts.append(a["counts"][-1] + b["counts"][-1])
    return {"le": shared, "counts": counts, "sum": a["sum"] + b["sum"]}


def quantile(q: float, h: Histogram | None) -> float | None:
    """The q-quantile by linear interpolation inside the bucket, exactly as Prometheus' histogram_quantile():
    the lowest bucket interpolates from 0, and a rank in the +Inf bucket returns the highest finite bound."""
    if h is None or not 0 <= q <= 1:
        return None
    total = h["counts"][-1]
    if total == 0:
        return None
    rank = q * total
    bounds = [*h["le"], math.inf]
    for i, cumulative in enumerate(h["counts"]):
        if cumulative >= rank:
            if bounds[i] == math.inf:
                return h["le"][-1]
            lower = bounds[i - 1] if i > 0 else 0.0
            below = h["counts"][i - 1] if i > 0 else 0
            in_bucket = cumulative - below
            if in_bucket == 0:
                return bounds[i]
            return lower + (bounds[i] - lower) * (rank - below) / in_bucket
    return h["le"][-1]


def share_at_most(bound: float, h: Histogram | None) -> float | None:
    """The share of observations at most `bound`, by the same linear interpolation inside a bucket as quantile()
    (its inverse: the lowest bucket from 0). Observations in the +Inf bucket are never counted as within a bound:
    how far above the highest finite bound they lie is not known. None when there is nothing observed."""
    if h is None or bound < 0:
        return None
    total = h["counts"][-1]
    if total == 0:
        return None
    below, lower = 0, 0.0
    for upper, cumulative in zip(h["le"], h["counts"], strict=False):
        if bound < upper:
            return (below + (cumulative - below) * (bound - lower) / (upper - lower)) / total
        below, lower = cumulative, upper
    return below / total
