"""Inference-engine collector: scrape /metrics of vLLM, TGI, Triton/TensorRT-LLM and SGLang, map to one schema.

Output is *cumulative* readings per (endpoint, model, series); agents.delta turns them into interval deltas. What
each engine exports is data, in agents.engine_specs; docs/agent.md has the same table in prose.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

from agents.config import Target
from agents.engine_specs import DIALECTS, TOKEN_FIELDS, Dialect, EngineSpec
from agents.promtext import ParseResult, parse

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024 * 1024
MAX_BOUNDS = 64
UNKNOWN_MODEL = "unknown"
VERSION_RETRY_S = 600.0

COUNTER_FIELDS = ("prompt_tokens", "generation_tokens", "requests_ok", "requests_failed")
GAUGE_FIELDS = ("running", "waiting", "kv_cache_usage")
HIST_FIELDS = ("ttft", "itl", "e2e", "prefill", "decode")


@dataclass
class Hist:
    le: tuple[float, ...]  # finite upper bounds, strictly increasing
    counts: list[float]  # cumulative, len(le) + 1, +Inf last
    sum: float


@dataclass
class ModelReading:
    counters: dict[str, dict[str, float]] = field(default_factory=dict)  # field -> series -> cumulative value
    hists: dict[str, dict[str, Hist]] = field(default_factory=dict)  # HIST_FIELDS -> series -> cumulative hist
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
    dialect: str | None = None  # which of the engine's dialects the scrape matched (agents.engine_specs)
    token_families: tuple[str, ...] = ()  # the token counters found: none on an answering endpoint = unbillable
    process_start: float | None = None  # the engine process's start, epoch seconds, where it exports it


@dataclass
class Mapped:
    """One scrape mapped to the schema."""

    models: dict[str, ModelReading]
    errors: list[str]
    dialect: str
    token_families: tuple[str, ...]
    process_start: float | None


_PREFIXES = {engine: tuple(sorted({n for d in dialects for n in d.spec.names()}))
             for engine, dialects in DIALECTS.items()}
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


def _dialect(engine: str, pr: ParseResult) -> Dialect:
    """The first dialect whose token families have samples; failing that, the first with any family; else the
    engine's own."""
    dialects = DIALECTS[engine]
    for dialect in dialects:
        if any(pr.get(name) for name in dialect.spec.token_samples()):
            return dialect
    for dialect in dialects:
        if any(pr.get(name) for name in dialect.spec.names() if name != dialect.spec.process_start):
            return dialect
    return dialects[0]


def map_samples(engine: str, pr: ParseResult, default_model: str) -> Mapped:
    """Map parsed samples of one engine to ModelReadings keyed by model."""
    dialect = _dialect(engine, pr)
    spec = dialect.spec
    errors: list[str] = list(pr.errors)
    models: dict[str, ModelReading] = {}
    families: set[str] = set()

    def model(name: str) -> ModelReading:
        return models.setdefault(name, ModelReading())

    # A model named by any family keeps its name even when that family is rejected below (a histogram without
    # +Inf, say): its record must not fall back to the default model.
    for name in spec.names():
        for labels, _value in pr.get(name):
            if any(labels.get(key) for key in spec.model_labels):
                model(_model_of(labels, spec, default_model))
    for fld, rules in spec.counters.items():
        taken: set[str] = set()  # per model, the first rule with samples wins
        for rule in rules:
            found: set[str] = set()
            for labels, value in pr.get(rule.sample):
                if rule.where is not None and not rule.where(labels):
                    continue
                name = _model_of(labels, spec, default_model)
                if name in taken:
                    continue
                if value < 0:
                    errors.append(f"negative counter {rule.sample}{labels}: skipped")
                    continue
                model(name).counters.setdefault(fld, {})[f"{rule.sample}|{_series(labels, spec)}"] = value
                found.add(name)
                if fld in TOKEN_FIELDS:
                    families.add(rule.sample)
            taken |= found
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
    starts = [value for _labels, value in pr.get(spec.process_start)] if spec.process_start else []
    return Mapped(models=models, errors=errors, dialect=dialect.name, token_families=tuple(sorted(families)),
                  process_start=max(starts) if starts else None)


def fold_ensembles(models: dict[str, ModelReading], ensembles: dict[str, tuple[str, ...]]) -> dict[str, ModelReading]:
    """Triton counts a request through an ensemble in the ensemble's counters *and* in each composing model's. Keep
    the ensemble only: its own requests, and the tokens (and latency) of whichever composing model has them, when
    the ensemble itself reports none. A composing model is never reported on its own."""
    composing = {step for steps in ensembles.values() for step in steps}
    out = {name: m for name, m in models.items() if name not in composing or name in ensembles}
    for name, steps in ensembles.items():
        ensemble = out.get(name)
        if ensemble is None:
            continue
        for fld in TOKEN_FIELDS:
            if not ensemble.counters.get(fld):
                merged = {f"{step}|{series}": value for step in steps if step in models
                          for series, value in models[step].counters.get(fld, {}).items()}
                if merged:
                    ensemble.counters[fld] = merged
        for fld in HIST_FIELDS:
            if not ensemble.hists.get(fld):
                merged_h = {f"{step}|{series}": h for step in steps if step in models
                            for series, h in models[step].hists.get(fld, {}).items()}
                if merged_h:
                    ensemble.hists[fld] = merged_h
    return out


def parse_metrics(engine: str, text: str, default_model: str | None = None) -> Mapped:
    return map_samples(engine, parse(text, _PREFIXES[engine]), default_model or UNKNOWN_MODEL)


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
    api_base: str | None = None  # Triton's HTTP API (model configs), once the version probe found it
    ensembles: dict[str, tuple[str, ...]] = field(default_factory=dict)  # Triton ensemble -> composing models
    configs_at: dict[str, float] = field(default_factory=dict)  # model -> when its config was last read
    unbillable: bool = False  # answered with none of the token families (logged once per change)


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
                if target.engine == "triton":
                    st.api_base = url.removesuffix("/v2")
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
                mapped = parse_metrics(target.engine, body.decode("utf-8", "replace"), default_model)
                reading.up = True
                reading.models = mapped.models
                reading.dialect, reading.token_families = mapped.dialect, mapped.token_families
                reading.process_start = mapped.process_start
                if target.engine == "triton":
                    reading.models = fold_ensembles(mapped.models, self._ensembles(target, st, mapped.models))
                self._log_problems(target, st, mapped.errors)
        except (OSError, ValueError) as exc:  # URLError, timeouts, connection refused, bad URL
            reading.error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a scrape must never take the daemon down
            log.exception("unexpected error scraping %s", target.url)
            reading.error = f"{type(exc).__name__}: {exc}"
        if reading.error:
            self._log_problems(target, st, (f"scrape failed: {reading.error}",))
        if reading.up:
            self._log_billable(target, st, reading)
            if not reading.models:
                reading.models = {default_model: ModelReading()}
            for m in reading.models.values():
                for k, v in st.info_settings.items():
                    m.settings.setdefault(k, v)
            st.known_models = tuple(sorted(reading.models))
        else:
            reading.models = {name: ModelReading() for name in (st.known_models or (default_model,))}
        return reading

    def _ensembles(self, target: Target, st: _TargetState, models: dict[str, ModelReading]) -> dict:
        """Triton's ensembles among the scraped models, from each model's config (GET /v2/models/<m>/config, read
        once and again every 10 minutes)."""
        if st.api_base is None:
            if models and not st.configs_at:
                log.warning("%s: Triton's HTTP API did not answer, so its ensembles are unknown: a request through "
                            "an ensemble counts once per composing model until it does", target.url)
                st.configs_at = {name: time.monotonic() for name in models}
            return st.ensembles
        now = time.monotonic()
        for name in models:
            if now - st.configs_at.get(name, -math.inf) < VERSION_RETRY_S:
                continue
            st.configs_at[name] = now
            try:
                status, body = self._get(f"{st.api_base}/v2/models/{quote(name, safe='')}/config", self.timeout_s)
                config = json.loads(body) if status == 200 else None
            except (OSError, ValueError) as exc:
                log.debug("model config of %s at %s: %s", name, st.api_base, exc)
                continue
            if not isinstance(config, dict):
                continue
            steps = (config.get("ensemble_scheduling") or {}).get("step") or []
            if config.get("platform") == "ensemble" and isinstance(steps, list):
                st.ensembles[name] = tuple(str(step.get("model_name")) for step in steps if isinstance(step, dict))
                log.info("%s: %s is an ensemble of %s; counted once, as itself", target.url, name,
                         ", ".join(st.ensembles[name]))
            else:
                st.ensembles.pop(name, None)
        return st.ensembles

    @staticmethod
    def _log_billable(target: Target, st: _TargetState, reading: EndpointReading) -> None:
        unbillable = not reading.token_families
        if unbillable and not st.unbillable:
            log.warning("%s (%s): answers but exposes none of the token families the agent knows (%s); its tokens "
                        "cannot be billed", target.url, target.engine,
                        ", ".join(sorted({n for d in DIALECTS[target.engine] for n in d.spec.token_samples()})))
        elif not unbillable and st.unbillable:
            log.info("%s (%s): token families found again (%s)", target.url, target.engine,
                     ", ".join(reading.token_families))
        st.unbillable = unbillable

    @staticmethod
    def _log_problems(target: Target, st: _TargetState, errors: Iterable[str]) -> None:
        errors = tuple(errors)
        if errors and errors != st.last_errors:
            log.error("%s (%s): %s", target.url, target.engine, "; ".join(errors[:5]))
        elif not errors and st.last_errors:
            log.info("%s (%s): metrics readable again", target.url, target.engine)
        st.last_errors = errors
