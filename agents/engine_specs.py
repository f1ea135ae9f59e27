"""What each serving engine exports, as data: the families that carry tokens, requests, queue gauges and latency
histograms, per engine and per *dialect* (the same engine deployed under another prefix or an older set of names).
docs/agent.md has the same table in prose, with the capture behind each dialect.

Within one field, rules are alternatives: for each model the first rule that has samples wins, so an engine that
exports the same quantity twice (a renamed family kept for compatibility, Ray's counter also exported as a gauge)
is counted once. Per endpoint, one dialect is used: the first whose token families are present.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

LabelFilter = Callable[[dict[str, str]], bool] | None
TOKEN_FIELDS = ("prompt_tokens", "generation_tokens")
PROCESS_START = "process_start_time_seconds"


@dataclass(frozen=True)
class Rule:
    sample: str
    where: LabelFilter = None


@dataclass(frozen=True)
class EngineSpec:
    model_labels: tuple[str, ...]
    counters: dict[str, tuple[Rule, ...]]
    gauges: dict[str, tuple[Rule, ...]]
    hists: dict[str, tuple[tuple[str, float], ...]]  # field -> ((base name, scale to seconds), ...), first wins
    settings_info: tuple[str, ...] = ()  # info-style gauges whose labels become settings
    # The engine's own process start (prometheus_client's process collector), when the process that exports the
    # families is the engine itself (not, say, Ray's metrics agent).
    process_start: str | None = PROCESS_START

    def names(self) -> tuple[str, ...]:
        names = {r.sample for rules in self.counters.values() for r in rules}
        names |= {r.sample for rules in self.gauges.values() for r in rules}
        names |= {base for cands in self.hists.values() for base, _ in cands}
        names |= set(self.settings_info)
        if self.process_start:
            names.add(self.process_start)
        return tuple(sorted(names))

    def token_samples(self) -> tuple[str, ...]:
        return tuple(r.sample for fld in TOKEN_FIELDS for r in self.counters.get(fld, ()))

    def renamed(self, rename: Callable[[str], str], **changes) -> EngineSpec:
        """The same spec with every family name passed through `rename` (a prefix, a separator)."""
        def rules(table: dict[str, tuple[Rule, ...]]) -> dict[str, tuple[Rule, ...]]:
            return {f: tuple(replace(r, sample=rename(r.sample)) for r in rs) for f, rs in table.items()}

        return replace(
            self,
            counters=rules(self.counters),
            gauges=rules(self.gauges),
            hists={f: tuple((rename(b), s) for b, s in c) for f, c in self.hists.items()},
            settings_info=tuple(rename(n) for n in self.settings_info),
            **changes,
        )


@dataclass(frozen=True)
class Dialect:
    name: str
    spec: EngineSpec


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
        # 0.9 renamed gpu_cache_usage_perc to kv_cache_usage_perc (both exported until 0.11)
        "kv_cache_usage": (Rule("vllm:kv_cache_usage_perc"), Rule("vllm:gpu_cache_usage_perc")),
    },
    hists={
        "ttft": (("vllm:time_to_first_token_seconds", 1.0),),
        # V1: inter_token_latency_seconds; V0: time_per_output_token_seconds (same observation, renamed)
        "itl": (("vllm:inter_token_latency_seconds", 1.0), ("vllm:time_per_output_token_seconds", 1.0)),
        "e2e": (("vllm:e2e_request_latency_seconds", 1.0),),
        # V1's time per request in each phase: their sums split a GPU-hour into prefill and decode
        # (economics.split).
        "prefill": (("vllm:request_prefill_time_seconds", 1.0),),
        "decode": (("vllm:request_decode_time_seconds", 1.0),),
    },
    settings_info=("vllm:cache_config_info",),
)


def _ray(separator: str) -> Callable[[str], str]:
    """vLLM under Ray Serve: `ray_vllm:` until vLLM 0.11, `ray_vllm_` after (vLLM PR 25439 maps every character
    outside [a-zA-Z0-9_] to `_`). Ray's metrics agent exports them, so process_start_time_seconds is the agent's."""
    return lambda name: "ray_" + (name if separator == ":" else name.replace(":", "_"))


def _counter_or_gauge(spec: EngineSpec) -> EngineSpec:
    """Ray also exports (and from 2.52 may only export) each counter as a gauge without `_total`: the bare name is
    the second choice, never added to the first."""
    return replace(spec, counters={f: (*rules, *(replace(r, sample=r.sample.removesuffix("_total")) for r in rules
                                                 if r.sample.endswith("_total")))
                                   for f, rules in spec.counters.items()})


def _sglang(p: str) -> EngineSpec:
    return EngineSpec(
        model_labels=("model_name", "name"),
        counters={
            "prompt_tokens": (Rule(f"{p}prompt_tokens_total"),),
            "generation_tokens": (Rule(f"{p}generation_tokens_total"),),
            # Finished requests: the counter where the version has one, else the e2e histogram's count
            "requests_ok": (Rule(f"{p}num_requests_total"), Rule(f"{p}e2e_request_latency_seconds_count")),
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
        process_start=None,  # SGLang's multiprocess registry has no process collector
    )


# Hugging Face TGI (router/src/server.rs): counters have no _total suffix in TGI's exporter (a counter TYPE line
# makes the parser add one; both spellings land on the same rule). Tokens are the sums of the length histograms.
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
    process_start=None,  # TGI's Rust exporter has no process collector
)

# Triton with the TensorRT-LLM backend: per-model request counters, token-length histograms.
TRITON = EngineSpec(
    model_labels=("model", "model_name"),
    counters={
        "prompt_tokens": (Rule("nv_llm_input_token_len_sum"),),
        "generation_tokens": (Rule("nv_llm_output_token_len_sum"),),
        "requests_ok": (Rule("nv_inference_request_success"),),
        "requests_failed": (Rule("nv_inference_request_failure"),),
    },
    gauges={
        "running": (Rule("nv_trt_llm_request_metrics", _label_is("request_type", "active")),),
        "waiting": (Rule("nv_trt_llm_request_metrics", _label_is("request_type", "waiting")),
                    Rule("nv_inference_pending_request_count")),
        "kv_cache_usage": (Rule("nv_trt_llm_kv_cache_block_metrics", _label_is("kv_cache_block_type", "fraction")),),
    },
    hists={"ttft": (("nv_inference_first_response_histogram_ms", 0.001),)},
    process_start=None,  # Triton is C++: no process collector
)

# TensorRT-LLM's own server (trtllm-serve, `/prometheus/metrics`; tensorrt_llm/metrics/collector.py): `trtllm_`
# since late 2025, no prefix before (PR 5785), `pytrtllm:` in the PyTorch-backend builds (PR 5560).
TRTLLM_SERVE = EngineSpec(
    model_labels=("model_name",),
    counters={
        "prompt_tokens": (Rule("trtllm_prompt_tokens_total"),),
        "generation_tokens": (Rule("trtllm_generation_tokens_total"),),
        "requests_ok": (Rule("trtllm_request_success_total", _vllm_ok),),
        "requests_failed": (Rule("trtllm_request_error_total"), Rule("trtllm_request_success_total", _vllm_failed)),
    },
    gauges={
        "running": (Rule("trtllm_num_requests_running"),),
        "waiting": (Rule("trtllm_num_requests_waiting"),),
        "kv_cache_usage": (Rule("trtllm_kv_cache_utilization"),),
    },
    hists={
        "ttft": (("trtllm_time_to_first_token_seconds", 1.0),),
        "itl": (("trtllm_time_per_output_token_seconds", 1.0),),
        "e2e": (("trtllm_e2e_request_latency_seconds", 1.0),),
    },
    process_start=None,  # multiprocess registry
)
PYTRTLLM = EngineSpec(
    model_labels=("model_name",),
    counters={
        "prompt_tokens": (Rule("pytrtllm:prompt_tokens_total"),),
        "generation_tokens": (Rule("pytrtllm:generation_tokens_total"),),
        "requests_ok": (Rule("pytrtllm:request_completed_total"),),
        "requests_failed": (Rule("pytrtllm:request_failed_total"),),
    },
    gauges={
        "running": (Rule("pytrtllm:num_requests_running"),),
        "waiting": (Rule("pytrtllm:num_requests_waiting"),),
    },
    hists={},
    process_start=None,
)

DIALECTS: dict[str, tuple[Dialect, ...]] = {
    "vllm": (
        Dialect("vllm", VLLM),
        Dialect("ray_vllm:", _counter_or_gauge(VLLM.renamed(_ray(":"), process_start=None))),
        Dialect("ray_vllm_", _counter_or_gauge(VLLM.renamed(_ray("_"), process_start=None))),
        # NVIDIA NIM for LLMs (vLLM inside) exports vLLM's families without the prefix
        Dialect("nim", VLLM.renamed(lambda name: name.removeprefix("vllm:"))),
    ),
    "sglang": (Dialect("sglang:", _sglang("sglang:")), Dialect("sglang_", _sglang("sglang_"))),
    "tgi": (Dialect("tgi", TGI),),
    "triton": (
        Dialect("triton", TRITON),
        Dialect("trtllm-serve", TRTLLM_SERVE),
        Dialect("trtllm-serve (unprefixed)", TRTLLM_SERVE.renamed(lambda name: name.removeprefix("trtllm_"))),
        Dialect("pytrtllm:", PYTRTLLM),
    ),
}
