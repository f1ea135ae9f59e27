"""Agent batches that the contract (BatchIn) accepts, drawn from its own published JSON schema, so every bound it
publishes is exercised: `batches()` draws them at random (bounds included, often), `extreme_batch()` builds the two
batches with every number, text and list at its largest or smallest. The rules the schema cannot express (unique
UUIDs, util_max at least util_mean, a histogram's shape, times inside the accept window) are met by construction."""

import time
import uuid
from itertools import cycle, islice
from typing import Any

from hypothesis import strategies as st

from portal.telemetry.schemas import HISTOGRAMS, MAX_TOKENS_PER_INTERVAL, SECONDS_MAX, BatchIn

SCHEMA = BatchIn.model_json_schema()
# Text a batch may carry: anything but NUL, including other control characters, accents and emoji.
TEXT = st.characters(exclude_characters="\x00", exclude_categories=("Cs",))
WIDE_TEXT = "aé☃\U0001d11e\t<'\""  # for extremes: multi-byte, quotes, a control character
PROFILES = ["1g.10gb", "2g.20gb", "3g.40gb", "7g.141gb", "1g.24gb+me", "4g.71gb", "1g.18gb"]


def _resolve(schema: dict) -> dict:
    if "$ref" in schema:
        return SCHEMA["$defs"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def from_schema(schema: dict) -> st.SearchStrategy:
    schema = _resolve(schema)
    if "anyOf" in schema:
        return st.one_of(st.none(), *[from_schema(s) for s in schema["anyOf"] if s.get("type") != "null"])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object" and "properties" in schema:
        # Optional fields are sometimes left out, so their defaults are stored too.
        required = set(schema.get("required", []))
        fields = {name: from_schema(sub) for name, sub in schema["properties"].items()}
        return st.fixed_dictionaries({n: s for n, s in fields.items() if n in required},
                                     optional={n: s for n, s in fields.items() if n not in required})
    if kind == "object":  # a mapping of strings: engine settings
        value = next(iter(schema["patternProperties"].values()))
        return st.dictionaries(_text(schema["propertyNames"]), _text(value), max_size=3)
    if kind == "array":
        low = schema.get("minItems", 0)
        return st.lists(from_schema(schema["items"]), min_size=low, max_size=min(schema.get("maxItems", 8), low + 3))
    if kind == "integer":
        low, high = schema.get("minimum", -(2**63)), schema.get("maximum", 2**63 - 1)
        return st.one_of(st.sampled_from([low, high]), st.integers(low, high))
    if kind == "number":
        low, high = schema.get("minimum", -1e300), schema.get("maximum", 1e300)
        return st.one_of(st.sampled_from([low, high]), st.floats(low, high, allow_nan=False, allow_infinity=False))
    if kind == "boolean":
        return st.booleans()
    if kind == "string":
        return _text(schema)
    raise AssertionError(f"no strategy for {schema}")


def _text(schema: dict) -> st.SearchStrategy:
    return st.text(TEXT, min_size=schema.get("minLength", 0), max_size=schema.get("maxLength", 64))


def extreme_value(schema: dict, which: str) -> Any:
    """The value of `schema` with every bound at its "max" or "min"."""
    schema = _resolve(schema)
    top = which == "max"
    if "anyOf" in schema:
        return extreme_value(next(s for s in schema["anyOf"] if s.get("type") != "null"), which)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][-1 if top else 0]
    kind = schema.get("type")
    if kind == "object" and "properties" in schema:
        return {name: extreme_value(sub, which) for name, sub in schema["properties"].items()}
    if kind == "object":
        key, value = schema["propertyNames"], next(iter(schema["patternProperties"].values()))
        size = schema.get("maxProperties", 8) if top else 0
        return {f"{i:02d}{extreme_value(key, which)}"[:key["maxLength"]]: extreme_value(value, which)
                for i in range(size)}
    if kind == "array":
        size = schema.get("maxItems", 8) if top else schema.get("minItems", 0)
        return [extreme_value(schema["items"], which) for _ in range(size)]
    if kind in ("integer", "number"):
        return schema["maximum"] if top else schema["minimum"]
    if kind == "boolean":
        return top
    if kind == "string" or "maxLength" in schema:  # (dict keys' schemas carry no type)
        size = schema.get("maxLength", 64) if top else schema.get("minLength", 0)
        return "".join(islice(cycle(WIDE_TEXT), size))
    raise AssertionError(f"no extreme for {schema}")


@st.composite
def batches(draw, *, seq: int, now: float | None = None) -> dict[str, Any]:
    """A random batch BatchIn accepts and batch_accept takes."""
    batch = draw(from_schema(SCHEMA))
    end = (now or time.time()) - draw(st.floats(0, 29 * 86400))
    hists = [draw(_histograms()) for _ in range(len(HISTOGRAMS) * len(batch.get("engines", [])))]
    return _consistent(batch, seq=seq, end=end, span=draw(st.floats(0.001, 3600)), salt=draw(st.integers(0, 2**64)),
                       histograms=hists)


def extreme_batch(*, seq: int, which: str, now: float | None = None) -> dict[str, Any]:
    batch = extreme_value(SCHEMA, which)
    end = (now or time.time()) - (0 if which == "max" else 29 * 86400)
    size = 64 if which == "max" else 1
    histogram = {"le": [SECONDS_MAX - (size - i) * 1e9 for i in range(size)] if which == "max" else [-SECONDS_MAX],
                 "counts": [MAX_TOKENS_PER_INTERVAL if which == "max" else 0] * (size + 1),
                 "sum": SECONDS_MAX if which == "max" else 0.0}
    return _consistent(batch, seq=seq, end=end, span=3600 if which == "max" else 0.001, salt=seq,
                       histograms=[histogram] * (len(HISTOGRAMS) * len(batch["engines"])))


def _consistent(batch: dict, *, seq: int, end: float, span: float, salt: int, histograms: list[dict]) -> dict:
    batch.update(seq=seq, interval_end=end, interval_start=end - span)
    gpus = batch.get("gpus", [])
    for i, gpu in enumerate(gpus):
        hex_uuid = str(uuid.uuid5(uuid.NAMESPACE_OID, f"{salt}-{seq}-{i}"))
        # Any letter case: the portal stores NVML's form.
        gpu["uuid"] = "GPU-" + (hex_uuid.upper() if (salt + i) % 2 else hex_uuid)
        if gpu.get("util_mean") is not None and gpu.get("util_max") is not None:
            gpu["util_max"] = max(gpu["util_max"], gpu["util_mean"])
        if gpu.get("memory_used_mib") is not None and gpu.get("memory_total_mib") is not None:
            gpu["memory_used_mib"] = min(gpu["memory_used_mib"], gpu["memory_total_mib"])
        for gi_id, instance in enumerate(gpu.get("mig_instances", [])):
            instance.update(gi_id=gi_id, profile=PROFILES[(salt + gi_id) % len(PROFILES)])
    hists = iter(histograms)
    for i, engine in enumerate(batch.get("engines", [])):
        engine["endpoint"] = f"{i}|{engine['endpoint']}"[:500]  # (endpoint, model) is unique in a batch
        for name in HISTOGRAMS:
            histogram = next(hists)
            if engine.get(name) is not None:
                engine[name] = histogram
    for i, event in enumerate(batch.get("events", [])):
        event["ts"] = end - i % 60
        event["gpu_uuid"] = gpus[i % len(gpus)]["uuid"] if gpus and (salt + i) % 3 else None
    return batch


@st.composite
def _histograms(draw) -> dict:
    size = draw(st.integers(1, 20))
    bounds = sorted(draw(st.lists(st.floats(-SECONDS_MAX, SECONDS_MAX, allow_nan=False), min_size=size,
                                  max_size=size, unique=True)))
    steps = draw(st.lists(st.integers(0, MAX_TOKENS_PER_INTERVAL // 65), min_size=size + 1, max_size=size + 1))
    counts = [sum(steps[:i + 1]) for i in range(size + 1)]
    return {"le": bounds, "counts": counts, "sum": draw(st.floats(0, SECONDS_MAX))}
