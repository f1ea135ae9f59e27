"""The agent <-> portal batch contract, version 1. Defined once, here; published as OpenAPI (docs/openapi.json).

The agent (agents/, which must not import Django) produces plain JSON that validates against BatchIn; its tests
check that against this module. Counters arrive as exact integer deltas over [interval_start, interval_end);
gauges as the interval's summary. Timestamps are UTC epoch seconds.
"""

import re
from typing import Annotated, Any, Literal

from ninja import Schema
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1
ENGINES = ("vllm", "tgi", "triton", "sglang")
EVENT_KINDS = (
    "xid",
    "ecc_uncorrected",
    "ecc_corrected",
    "remapped_rows",
    "thermal_throttle",
    "power_throttle",
    "gpu_lost",
)
# Latencies (the SLA quantiles and goodput), then time per request in prefill and in decode (vLLM V1 exports
# them; their sums split a GPU-hour between input and output tokens, economics.split).
HISTOGRAMS = ("ttft", "itl", "e2e", "prefill", "decode")

# Largest delta a single interval may carry: guards against a counter wrapped through a bad reset reaching billing.
MAX_TOKENS_PER_INTERVAL = 10**12
MAX_ENERGY_MJ_PER_INTERVAL = 5_000 * 1_000 * 3_600  # 5 kW for an hour, in millijoules
# Every bound below fits the column it is stored in (a signed 64-bit integer at most, a finite double, text without
# NUL), so a batch accepted by the request can always be stored: nothing accepted fails later.
BIGINT_MAX = 2**63 - 1
INT_MAX = 2**31 - 1
# Epoch seconds: the accept step narrows this to its clock window; the schema keeps any value a datetime can hold.
EPOCH_MIN, EPOCH_MAX = 0.0, 4_102_444_800.0  # 1970-01-01 .. 2100-01-01 UTC
# Histogram bounds and sums in seconds: far beyond any latency, well inside a double and a JSON number.
SECONDS_MAX = 1e12

NonNegInt = Annotated[int, Field(ge=0, le=MAX_TOKENS_PER_INTERVAL)]
Percent = Annotated[float, Field(ge=0, le=100)]
Epoch = Annotated[float, Field(ge=EPOCH_MIN, le=EPOCH_MAX)]
# PostgreSQL text and jsonb refuse NUL; the other control characters are harmless but never meaningful here.
_NO_NUL = r"^[^\x00]*$"


def Text(max_length: int, min_length: int = 0):
    return Annotated[str, Field(min_length=min_length, max_length=max_length, pattern=_NO_NUL)]


ShortStr = Text(128)

_GPU_UUID = re.compile(r"^GPU-[0-9a-z-]{8,64}$")
_MIG_PROFILE = re.compile(r"^[1-8]g\.\d{1,4}gb(\+[a-z]{1,8})?$")


def nvml_uuid(value: str, prefix: str) -> str:
    """NVML's form of a UUID: upper-case prefix, lower-case rest. A UUID differing only in case is the same
    device, so it is stored once, in this form."""
    if value[:len(prefix)].upper() == prefix:
        return prefix + value[len(prefix):].lower()
    return value


def _gpu_uuid(value: str) -> str:
    value = nvml_uuid(value, "GPU-")
    if not _GPU_UUID.match(value):
        raise ValueError("GPU UUID must be NVML's form 'GPU-xxxxxxxx-...'")
    return value


class _Strict(BaseModel):
    # Plain pydantic, not ninja.Schema: ninja's wrap validator runs each nested model twice and through a getter
    # proxy, which made validating a batch 8-14x slower (benchmarks/bench_ingest.py). Requests are parsed with
    # model_validate_json in the view, so nothing here needs ninja. Strict: true is not 1 and "1028" is not a
    # number (an integer is still a valid float).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class MigInstanceIn(_Strict):
    uuid: Text(80) | None = None
    gi_id: Annotated[int, Field(ge=0, le=64)]
    profile: Annotated[str, Field(max_length=32, examples=["1g.10gb", "3g.40gb"])]
    memory_total_mib: Annotated[int, Field(ge=0, le=1_048_576)] | None = None
    memory_used_mib: Annotated[int, Field(ge=0, le=1_048_576)] | None = None

    @field_validator("profile")
    @classmethod
    def _profile(cls, value: str) -> str:
        if not _MIG_PROFILE.match(value):
            raise ValueError("MIG profile must look like '1g.10gb' or '4g.40gb' (1 to 8 compute slices)")
        return value


class GpuIn(_Strict):
    uuid: Annotated[str, Field(max_length=72, examples=["GPU-6a5d4f0e-1234-5678-9abc-def012345678"])] = Field(
        description="NVML's UUID; the letters' case does not matter (stored as NVML prints it)")
    index: Annotated[int, Field(ge=0, le=63)]
    name: ShortStr
    pci_bus_id: Text(32) | None = None
    samples: Annotated[int, Field(ge=0, le=3_600)] = Field(description="1 s samples summarised in this interval")
    util_mean: Percent | None = None
    util_max: Percent | None = None
    mem_util_mean: Percent | None = None
    memory_used_mib: Annotated[int, Field(ge=0, le=1_048_576)] | None = None
    memory_total_mib: Annotated[int, Field(ge=0, le=1_048_576)] | None = None
    power_mean_w: Annotated[float, Field(ge=0, le=5_000)] | None = None
    power_limit_w: Annotated[float, Field(ge=0, le=5_000)] | None = None
    energy_mj: Annotated[int, Field(ge=0, le=MAX_ENERGY_MJ_PER_INTERVAL)] | None = Field(
        default=None, description="Energy used in the interval (delta of NVML's cumulative counter), millijoules"
    )
    temp_max_c: Annotated[float, Field(ge=-40, le=150)] | None = None
    sm_clock_mhz: Annotated[int, Field(ge=0, le=10_000)] | None = None
    mem_clock_mhz: Annotated[int, Field(ge=0, le=20_000)] | None = None
    throttle_reasons: Annotated[list[Text(48)], Field(max_length=16)] = []
    ecc_corrected_total: Annotated[int, Field(ge=0, le=BIGINT_MAX)] | None = None
    ecc_uncorrected_total: Annotated[int, Field(ge=0, le=BIGINT_MAX)] | None = None
    retired_pages: Annotated[int, Field(ge=0, le=100_000)] | None = None
    remapped_rows_pending: bool | None = None
    remapped_rows_failure: bool | None = None
    mig_mode: bool | None = None
    mig_instances: Annotated[list[MigInstanceIn], Field(max_length=7)] = []
    cc_mode: Text(32) | None = None

    @field_validator("uuid")
    @classmethod
    def _uuid(cls, value: str) -> str:
        return _gpu_uuid(value)

    @model_validator(mode="after")
    def _consistent(self) -> "GpuIn":
        if self.util_mean is not None and self.util_max is not None and self.util_max < self.util_mean:
            raise ValueError("util_max is below util_mean")
        if (
            self.memory_used_mib is not None
            and self.memory_total_mib is not None
            and self.memory_used_mib > self.memory_total_mib
        ):
            raise ValueError("memory_used_mib exceeds memory_total_mib")
        gi_ids = [m.gi_id for m in self.mig_instances]
        if len(gi_ids) != len(set(gi_ids)):
            raise ValueError("duplicate MIG gi_id")
        return self


class HistogramIn(_Strict):
    """Delta of a Prometheus histogram over the interval: finite upper bounds, cumulative counts (+Inf last)."""

    le: Annotated[list[Annotated[float, Field(ge=-SECONDS_MAX, le=SECONDS_MAX)]], Field(min_length=1, max_length=64)]
    counts: Annotated[list[NonNegInt], Field(min_length=2, max_length=65)]
    sum: Annotated[float, Field(ge=0, le=SECONDS_MAX)]

    @model_validator(mode="after")
    def _shape(self) -> "HistogramIn":
        if len(self.counts) != len(self.le) + 1:
            raise ValueError("counts must have one entry per bound plus the +Inf bucket")
        if any(b <= a for a, b in zip(self.le, self.le[1:], strict=False)):
            raise ValueError("le bounds must be strictly increasing")
        if any(b < a for a, b in zip(self.counts, self.counts[1:], strict=False)):
            raise ValueError("cumulative bucket counts must not decrease")
        return self


class EngineIn(_Strict):
    endpoint: Annotated[str, Field(max_length=500, pattern=_NO_NUL, examples=["http://127.0.0.1:8000/metrics"])]
    engine: Literal["vllm", "tgi", "triton", "sglang"]
    model: Text(200, min_length=1)
    up: bool
    probe_latency_ms: Annotated[float, Field(ge=0, le=600_000)] | None = None
    version: Text(64) | None = None
    prompt_tokens: NonNegInt = 0
    generation_tokens: NonNegInt = 0
    requests_ok: NonNegInt = 0
    requests_failed: NonNegInt = 0
    running: Annotated[float, Field(ge=0, le=1e6)] | None = None
    waiting: Annotated[float, Field(ge=0, le=1e6)] | None = None
    kv_cache_usage: Annotated[float, Field(ge=0, le=1)] | None = None
    ttft: HistogramIn | None = None
    itl: HistogramIn | None = None
    e2e: HistogramIn | None = None
    prefill: HistogramIn | None = None
    decode: HistogramIn | None = None
    token_families: Annotated[list[Text(128)], Field(max_length=16)] | None = Field(
        default=None, description="The token counters the agent found on the endpoint (e.g. vllm:prompt_tokens_total). "
        "Empty while the endpoint answers: it exposes no tokens the agent can read, so none can be billed. "
        "Absent from older agents.")
    settings: Annotated[dict[Text(64), Text(128)], Field(
        max_length=32, description="Engine settings the engine exposes (e.g. vLLM cache_config_info labels)"
    )] = {}


class HostIn(_Strict):
    hostname: Text(253, min_length=1)
    os: ShortStr | None = None
    kernel: ShortStr | None = None
    driver_version: Text(32) | None = None
    cuda_driver_version: Text(32) | None = None
    nvml_version: Text(32) | None = None
    agent_version: Text(32) | None = None
    simulated: bool = False


class HealthEventIn(_Strict):
    ts: Epoch
    gpu_uuid: Annotated[str, Field(max_length=72)] | None = None
    kind: Literal[
        "xid", "ecc_uncorrected", "ecc_corrected", "remapped_rows", "thermal_throttle", "power_throttle", "gpu_lost"
    ]
    code: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    detail: Text(500) = ""

    @field_validator("gpu_uuid")
    @classmethod
    def _uuid(cls, value: str | None) -> str | None:
        return None if value is None else _gpu_uuid(value)


def _not_a_bool(value):
    if isinstance(value, bool):  # True == 1 in Python, but not in the contract
        raise ValueError("schema_version must be the integer 1")
    return value


SchemaVersion = Annotated[Literal[1], BeforeValidator(_not_a_bool)]


class BatchIn(_Strict):
    schema_version: SchemaVersion
    seq: Annotated[int, Field(ge=1, le=2**62)]
    interval_start: Epoch
    interval_end: Epoch
    host: HostIn
    gpus: Annotated[list[GpuIn], Field(max_length=64)] = []
    engines: Annotated[list[EngineIn], Field(max_length=64)] = []
    events: Annotated[list[HealthEventIn], Field(max_length=1_000)] = []
    dropped_batches: Annotated[int, Field(ge=0, le=INT_MAX)] = Field(
        default=0, description="Batches the agent's spool dropped (full) since it last reported"
    )
    quarantined_batches: Annotated[int, Field(ge=0, le=INT_MAX)] = Field(
        default=0, description="Batches the portal refused for good (409, 413, 422), held in the agent's quarantine "
        "until `tokenmill-agent requeue` sends them again")
    quarantined_tokens: Annotated[int, Field(ge=0, le=BIGINT_MAX)] = Field(
        default=0, description="Input + output tokens those quarantined batches hold")

    @model_validator(mode="after")
    def _intervals(self) -> "BatchIn":
        if not self.interval_end > self.interval_start:
            raise ValueError("interval_end must be after interval_start")
        if self.interval_end - self.interval_start > 3_600:
            raise ValueError("an interval may not exceed one hour")
        uuids = [g.uuid for g in self.gpus]
        if len(uuids) != len(set(uuids)):
            raise ValueError("duplicate GPU uuid in batch")
        keys = [(e.endpoint, e.model) for e in self.engines]
        if len(keys) != len(set(keys)):
            raise ValueError("duplicate (endpoint, model) in batch")
        return self


# Intervals one request may carry: two hours of 10 s intervals, so a node back from an outage drains hours of
# backlog in a few requests (the body's byte limit still applies).
MAX_INTERVALS_PER_POST = 720


_Intervals = Field(min_length=1, max_length=MAX_INTERVALS_PER_POST)


class BatchesEnvelopeIn(_Strict):
    """What the view validates first: the envelope, so that each interval is then judged on its own."""

    schema_version: SchemaVersion
    batches: Annotated[list[Any], _Intervals]


class BatchesIn(BatchesEnvelopeIn):
    """Several intervals of one node in one request (agent 0.3+). Each is judged on its own: one refused does not
    refuse the others, and each is answered in the order sent."""

    batches: Annotated[list[BatchIn], _Intervals]


class TargetOut(Schema):
    url: str
    engine: Literal["vllm", "tgi", "triton", "sglang"]
    model: str | None = None


class AgentConfigOut(Schema):
    config_version: int
    interval_s: int
    sample_s: float
    targets: list[TargetOut]


class IngestOut(Schema):
    seq: int
    status: Literal["stored", "duplicate"]
    config: AgentConfigOut


class IntervalOut(Schema):
    seq: int | None = Field(description="The interval's seq (null when the interval had none the portal could read)")
    status: Literal["stored", "duplicate", "conflict", "rejected"] = Field(
        description="stored / duplicate: durably held, do not send again; conflict: the seq holds other content "
        "(see last_seq); rejected: invalid, never storable (see detail)")
    detail: str | list[dict] | None = None
    last_seq: int | None = Field(default=None, description="With conflict: the highest seq the portal holds")


class BatchesOut(Schema):
    results: list[IntervalOut] = Field(description="One per interval sent, in the order sent")
    config: AgentConfigOut


class EnrollIn(_Strict):
    token: Text(200, min_length=8)
    host: HostIn


class EnrollOut(Schema):
    node_id: int
    credential: str = Field(description="Bearer credential for ingest; shown once, store it 0600")
    config: AgentConfigOut


class ErrorOut(Schema):
    detail: str | list[dict]


class SeqConflictOut(ErrorOut):
    last_seq: int = Field(description="The highest seq the portal holds for this node: an agent whose numbering "
                                      "fell behind it (its state restored or lost) continues after it")
