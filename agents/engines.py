"""Inference-engine collector: scrape /metrics of vLLM, TGI, Triton/TensorRT-LLM and SGLang, map to one schema.

Output is *cumulative* readings per (endpoint, model, series); agents.delta turns them into interval deltas.
Mapping tables are data (see docs/agent.md for the same table in prose).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from agents.config import Target
from agents.promtext import ParseResult, parse

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024 * 1024
MAX_BOUNDS = 64
UNKNOWN_MODEL = "unknown"
VERSION_RETRY_S = 600.0

COUNTER_FIELDS = ("prompt_tokens", "generation_tokens", "requests_ok", "requests_failed")
GAUGE_FIELDS = ("running", "waiting", "kv_cache_usage")
HIST_FIELDS = ("ttft", "itl", "e2e")


@dataclass
class Hist:
    le: tuple[float, ...]  # finite upper bounds, strictly increasing
    counts: list[float]  # cumulative, len(le) + 1, +Inf last
    sum: float


@dataclass
class ModelReading:
    counters: dict[str, dict[str, float]] = field(default_factory=dict)  # field -> series -> cumulative value
    hists: dict[str, dict[str, Hist]] = field(default_factory=dict)  # ttft/itl/e2e -> series -> cumulative hist
    gauges: dict[str, float] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)


@dataclass
class EndpointReading:
    endpoint: str
    engine: str
    up: bool
    latency_ms: float | None = None
    version: str | None = None
    error: str | None = None
    models: dict[str, ModelReading] = field(default_factory=dict)


LabelFilter = Callable[[dict[str, str]], bool] | None


@dataclass(frozen=True)
class Rule:
    sample: str
    where: LabelFilter = None


@dataclass(frozen=True)
class EngineSpec:
    model_labels: tuple[str, ...]
    counters: dict[str, tuple[Rule, ...]]
    gauges: dict[str, tuple[Rule, ...]]  # first rule that has samples wins
    hists: dict[str, tuple[tuple[str, float], ...]]  # field -> ((base name, scale to seconds), ...), first wins
    settings_info: tuple[str, ...] = ()  # info-style gauges whose labels become settings

    def prefixes(self) -> tuple[str, ...]:
        names = {r.sample for rules in self.counters.values() for r in rules}
        names |= {r.sample for rules in self.gauges.values() for r in rules}
        names |= {base for cands in self.hists.values() for base, _ in cands}
        names |= set(self.settings_info)
        return tuple(sorted(names))


_VLLM_FAILED = frozenset({"abort", "error"})


def _vllm_ok(labels: dict[str, str]) -> bool:
    return labels.get("finished_reason") not in _VLLM_FAILED


def _vllm_failed(labels: dict[str, str]) -> bool:
    return labels.get("finished_reason") in _VLLM_FAILED


def _label_is(key: str, value: str) -> Callable[[dict[str, str]], bool]:
    return lambda labels: labels.get(key) == value


VLLM = EngineSpec(
    model_labels=("model_name",),
    counters={
        "prompt_tokens": (Rule("vllm:prompt_tokens_total"),),
        "generation_tokens": (Rule("vllm:generation_tokens_total"),),
        "requests_ok": (Rule("vllm:request_success_total", _vllm_ok),),
        "requests_failed": (Rule("vllm:request_success_total", _vllm_failed),),
    },
    gauges={
        "running": (Rule("vllm:num_requests_running"),),
        "waiting": (Rule("vllm:num_requests_waiting"),),
        # V1 renamed gpu_cache_usage_perc to kv_cache_usage_perc
        "kv_cache_usage": (Rule("vllm:kv_cache_usage_perc"), Rule("vllm:gpu_cache_usage_perc")),
    },
    hists={
        "ttft": (("vllm:time_to_first_token_seconds", 1.0),),
        # V1: inter_token_latency_seconds; V0: time_per_output_token_seconds (same observation, renamed)
        "itl": (("vllm:inter_token_latency_seconds", 1.0), ("vllm:time_per_output_token_seconds", 1.0)),
        "e2e": (("vllm:e2e_request_latency_seconds", 1.0),),
    },
    settings_info=("vllm:cache_config_info",),
)


def _sglang(p: str) -> EngineSpec:
    return EngineSpec(
        model_labels=("model_name", "name"),
        counters={
            "prompt_tokens": (Rule(f"{p}prompt_tokens_total"),),
            "generation_tokens": (Rule(f"{p}generation_tokens_total"),),
            # SGLang has no success counter in most versions: finished requests = e2e histogram count
            "requests_ok": (Rule(f"{p}e2e_request_latency_seconds_count"),),
            "requests_failed": (Rule(f"{p}num_aborted_requests_total"),),
        },
        gauges={
            "running": (Rule(f"{p}num_running_reqs"),),
            "waiting": (Rule(f"{p}num_queue_reqs"),),
            "kv_cache_usage": (Rule(f"{p}token_usage"),),
        },
        hists={
            "ttft": ((f"{p}time_to_first_token_seconds", 1.0),),
            "itl": ((f"{p}inter_token_latency_seconds", 1.0), (f"{p}time_per_output_token_seconds", 1.0)),
            "e2e": ((f"{p}e2e_request_latency_seconds", 1.0),),
        },
    )


_SGLANG_COLON = _sglang("sglang:")
_SGLANG_UNDERSCORE = _sglang("sglang_")
SGLANG = EngineSpec(
    model_labels=_SGLANG_COLON.model_labels,
    counters={k: _SGLANG_COLON.counters[k] + _SGLANG_UNDERSCORE.counters[k] for k in _SGLANG_COLON.counters},
    gauges={k: _SGLANG_COLON.gauges[k] + _SGLANG_UNDERSCORE.gauges[k] for k in _SGLANG_COLON.gauges},
    hists={k: _SGLANG_COLON.hists[k] + _SGLANG_UNDERSCORE.hists[k] for k in _SGLANG_COLON.hists},
)

# Hugging Face TGI: documented metric names (router/src/main.rs, docs "Metrics"); counters have no _total suffix
# in TGI's exporter (a counter TYPE line makes the parser add one; both spellings land on the same rule).
# No real TGI capture exists in our fixtures.
TGI = EngineSpec(
    model_labels=(),
    counters={
        "prompt_tokens": (Rule("tgi_request_input_length_sum"),),
        "generation_tokens": (Rule("tgi_request_generated_tokens_sum"),),
        "requests_ok": (Rule("tgi_request_success"),),
        "requests_failed": (Rule("tgi_request_failure"),),
    },
    gauges={
        "running": (Rule("tgi_batch_current_size"),),
        "waiting": (Rule("tgi_queue_size"),),
    },
    hists={
        "itl": (("tgi_request_mean_time_per_token_duration", 1.0),),
        "e2e": (("tgi_request_duration", 1.0),),
    },
)

TRITON = EngineSpec(
    model_labels=("model", "model_name"),
    counters={
        "prompt_tokens": (Rule("nv_llm_input_token_len_sum"), Rule("pytrtllm:prompt_tokens_total")),
        "generation_tokens": (Rule("nv_llm_output_token_len_sum"), Rule("pytrtllm:generation_tokens_total")),
        "requests_ok": (Rule("nv_inference_request_success"), Rule("pytrtllm:request_completed_total")),
        "requests_failed": (Rule("nv_inference_request_failure"), Rule("pytrtllm:request_failed_total")),
    },
    gauges={
        "running": (
            Rule("nv_trt_llm_request_metrics", _label_is("request_type", "active")),
            Rule("pytrtllm:num_requests_running"),
        ),
        "waiting": (
            Rule("nv_trt_llm_request_metrics", _label_is("request_type", "waiting")),
            Rule("pytrtllm:num_requests_waiting"),
            Rule("nv_inference_pending_request_count"),
        ),
        "kv_cache_usage": (Rule("nv_trt_llm_kv_cache_block_metrics", _label_is("kv_cache_block_type", "fraction")),),
    },
    hists={"ttft": (("nv_inference_first_response_histogram_ms", 0.001),)},
)

SPECS: dict[str, EngineSpec] = {"vllm": VLLM, "tgi": TGI, "triton": TRITON, "sglang": SGLANG}
_PREFIXES = {name: spec.prefixes() for name, spec in SPECS.items()}
_GAUGE_MEAN = {"kv_cache_usage"}


def _model_of(labels: dict[str, str], spec: EngineSpec, default: str) -> str:
    for key in spec.model_labels:
        value = labels.get(key)
        if value:
            return value[:200]
    return default


def _series(labels: dict[str, str], spec: EngineSpec, drop: Iterable[str] = ()) -> str:
    skip = set(spec.model_labels) | set(drop)
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels) if k not in skip)


def _hists(pr: ParseResult, base: str, scale: float, spec: EngineSpec, default: str, errors: list[str]):
    """Build cumulative Hist per (model, series) from base_bucket/_sum/_count samples; incomplete ones rejected."""
    buckets: dict[tuple[str, str], dict[float, float]] = {}
    for labels, value in pr.get(f"{base}_bucket"):
        if "le" not in labels:
            continue
        try:
            bound = float(labels["le"])
        except ValueError:
            continue
        key = (_model_of(labels, spec, default), _series(labels, spec, ("le",)))
        buckets.setdefault(key, {})[bound] = value
    sums = {(_model_of(lb, spec, default), _series(lb, spec)): v for lb, v in pr.get(f"{base}_sum")}
    out: dict[tuple[str, str], Hist] = {}
    for key, by_bound in buckets.items():
        if math.inf not in by_bound:
            errors.append(f"{base}{{{key[1]}}} for {key[0]}: histogram has no +Inf bucket (truncated?); skipped")
            continue
        if key not in sums:
            errors.append(f"{base} for {key[0]}: histogram has no _sum; skipped")
            continue
        finite = sorted(b for b in by_bound if b != math.inf)
        if len(finite) > MAX_BOUNDS or not finite:
            errors.append(f"{base} for {key[0]}: {len(finite)} finite bounds unsupported; skipped")
            continue
        counts = [by_bound[b] for b in finite] + [by_bound[math.inf]]
        if any(c < 0 for c in counts) or any(b < a for a, b in itertools.pairwise(counts)):
            errors.append(f"{base} for {key[0]}: bucket counts not cumulative; skipped")
            continue
        out[key] = Hist(le=tuple(b * scale for b in finite), counts=counts, sum=max(0.0, sums[key] * scale))
    return out


def map_samples(engine: str, pr: ParseResult, default_model: str) -> tuple[dict[str, ModelReading], list[str]]:
    """Map parsed samples of one engine to ModelReadings keyed by model. Returns (models, problems)."""
    spec = SPECS[engine]
    errors: list[str] = list(pr.errors)
    models: dict[str, ModelReading] = {}

    def model(name: str) -> ModelReading:
        return models.setdefault(name, ModelReading())

    for fld, rules in spec.counters.items():
        for rule in rules:
            for labels, value in pr.get(rule.sample):
                if rule.where is not None and not rule.where(labels):
                    continue
                if value < 0:
                    errors.append(f"negative counter {rule.sample}{labels}: skipped")
                    continue
                m = model(_model_of(labels, spec, default_model))
                m.counters.setdefault(fld, {})[f"{rule.sample}|{_series(labels, spec)}"] = value
    for fld, rules in spec.gauges.items():
        for rule in rules:
            per_model: dict[str, list[float]] = {}
            for labels, value in pr.get(rule.sample):
                if rule.where is not None and not rule.where(labels):
                    continue
                if value < 0:
                    continue  # e.g. vLLM's -1 "unknown" sentinels
                per_model.setdefault(_model_of(labels, spec, default_model), []).append(value)
            if per_model:
                for name, values in per_model.items():
                    agg = sum(values) / len(values) if fld in _GAUGE_MEAN else sum(values)
                    if fld == "kv_cache_usage":
                        agg = min(1.0, agg)
                    model(name).gauges[fld] = min(agg, 1e6)
                break
    for fld, candidates in spec.hists.items():
        for base, scale in candidates:
            built = _hists(pr, base, scale, spec, default_model, errors)
            if built:
                for (name, series), hist in built.items():
                    model(name).hists.setdefault(fld, {})[f"{base}|{series}"] = hist
                break
    settings: dict[str, str] = {}
    for info in spec.settings_info:
        for labels, _value in pr.get(info):
            for k, v in sorted(labels.items()):
                if k in spec.model_labels or k == "engine":
                    continue
                settings[k[:64]] = v[:128]
    if settings:
        settings = dict(list(sorted(settings.items()))[:32])
        for m in models.values() or [model(default_model)]:
            m.settings.update(settings)
    return models, errors


def parse_metrics(
    engine: str, text: str, default_model: str | None = None
) -> tuple[dict[str, ModelReading], list[str]]:
    pr = parse(text, _PREFIXES[engine])
    return map_samples(engine, pr, default_model or UNKNOWN_MODEL)


# --------------------------------------------------------------------------------------------------- scraping

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Accept": "text/plain;version=0.0.4, */*;q=0.1",  # noqa: S310
                                               "User-Agent": "tokenmill-agent"})
    try:
        with _NO_PROXY.open(req, timeout=timeout) as resp:
            return resp.status, resp.read(MAX_BODY + 1)
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def _base(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "", "", ""))


def _info_urls(target: Target) -> list[str]:
    base = _base(target.url)
    if target.engine == "vllm":
        return [base + "/version"]
    if target.engine == "tgi":
        return [base + "/info"]
    if target.engine == "sglang":
        return [base + "/get_server_info", base + "/version"]
    urls = [base + "/v2"]
    parts = urlsplit(target.url)
    if parts.port == 8002:  # Triton's metrics port; its HTTP API is on 8000 by default
        urls.append(urlunsplit((parts.scheme, f"{parts.hostname}:8000", "/v2", "", "")))
    return urls


_TGI_SETTINGS = ("model_dtype", "max_concurrent_requests", "max_input_tokens", "max_total_tokens",
                 "max_batch_total_tokens", "model_sha")


@dataclass
class _TargetState:
    version: str | None = None
    info_model: str | None = None
    info_settings: dict[str, str] = field(default_factory=dict)
    info_at: float = -math.inf
    info_done: bool = False
    known_models: tuple[str, ...] = ()
    last_errors: tuple[str, ...] = ()


class EngineCollector:
    """Scrapes every configured target once per interval (concurrently, short timeouts)."""

    def __init__(self, targets: Iterable[Target], timeout_s: float = 2.0, getter=http_get):
        self.timeout_s = timeout_s
        self._get = getter
        self._targets: tuple[Target, ...] = ()
        self._state: dict[Target, _TargetState] = {}
        self._pool = None
        self.set_targets(targets)

    def set_targets(self, targets: Iterable[Target]) -> None:
        targets = tuple(targets)
        if targets != self._targets:
            # changed targets: fetch versions again (config change is one of the two moments we look)
            self._state = {t: _TargetState(known_models=self._state.get(t, _TargetState()).known_models)
                           for t in targets}
            self._targets = targets

    @property
    def targets(self) -> tuple[Target, ...]:
        return self._targets

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def collect(self) -> list[EndpointReading]:
        if not self._targets:
            return []
        if len(self._targets) == 1:
            return [self._collect_one(self._targets[0])]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=min(8, len(self._targets)), thread_name_prefix="scrape")
        return list(self._pool.map(self._collect_one, self._targets))

    def _fetch_info(self, target: Target, st: _TargetState) -> None:
        st.info_at = time.monotonic()
        for url in _info_urls(target):
            try:
                status, body = self._get(url, self.timeout_s)
                if status != 200:
                    continue
                data = json.loads(body)
            except (OSError, ValueError) as exc:
                log.debug("version probe %s failed: %s", url, exc)
                continue
            if isinstance(data, dict) and data.get("version"):
                st.version = str(data["version"])[:64]
                st.info_done = True
                if target.engine == "tgi":
                    if isinstance(data.get("model_id"), str) and data["model_id"]:
                        st.info_model = data["model_id"][:200]
                    st.info_settings = {k: str(data[k])[:128] for k in _TGI_SETTINGS if data.get(k) is not None}
                return

    def _collect_one(self, target: Target) -> EndpointReading:
        st = self._state.setdefault(target, _TargetState())
        if not st.info_done and time.monotonic() - st.info_at >= VERSION_RETRY_S:
            self._fetch_info(target, st)
        default_model = target.model or st.info_model or UNKNOWN_MODEL
        reading = EndpointReading(endpoint=target.url, engine=target.engine, up=False, version=st.version)
        start = time.perf_counter()
        try:
            status, body = self._get(target.url, self.timeout_s)
            reading.latency_ms = round((time.perf_counter() - start) * 1000.0, 3)
            if status != 200:
                reading.error = f"HTTP {status}"
            elif len(body) > MAX_BODY:
                reading.error = f"response larger than {MAX_BODY} bytes"
            else:
                models, errors = parse_metrics(target.engine, body.decode("utf-8", "replace"), default_model)
                reading.up = True
                reading.models = models
                self._log_problems(target, st, errors)
        except (OSError, ValueError) as exc:  # URLError, timeouts, connection refused, bad URL
            reading.error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a scrape must never take the daemon down
            log.exception("unexpected error scraping %s", target.url)
            reading.error = f"{type(exc).__name__}: {exc}"
        if reading.error:
            self._log_problems(target, st, (f"scrape failed: {reading.error}",))
        if reading.up:
            if not reading.models:
                reading.models = {default_model: ModelReading()}
            for m in reading.models.values():
                for k, v in st.info_settings.items():
                    m.settings.setdefault(k, v)
            st.known_models = tuple(sorted(reading.models))
        else:
            reading.models = {name: ModelReading() for name in (st.known_models or (default_model,))}
        return reading

    @staticmethod
    def _log_problems(target: Target, st: _TargetState, errors: Iterable[str]) -> None:
        errors = tuple(errors)
        if errors and errors != st.last_errors:
            log.error("%s (%s): %s", target.url, target.engine, "; ".join(errors[:5]))
        elif not errors and st.last_errors:
            log.info("%s (%s): metrics readable again", target.url, target.engine)
        st.last_errors = errors
