"""Engines as deployed, from real captures (tests/fixtures/ADDED.md): wrapped, renamed, prefixed, ensembled. Each is
either billed, counted once, or loudly unbillable; never a green light with zero tokens."""

from __future__ import annotations

import json
import logging
import time

import pytest
from agentkit import MetricsServer, fixture_text

from agents.config import Target
from agents.delta import DeltaTracker
from agents.engines import EngineCollector, fold_ensembles, parse_metrics

RAY = fixture_text("added/datadog_ray_vllm_metrics_fixture.txt")
NIM = fixture_text("added/datadog_nvidia_nim_llama31_8b_metrics_fixture.txt")
TGI = fixture_text("added/datadog_tgi_payload_fixture_EXCERPT.txt")
DYNAMO_TRTLLM = fixture_text("added/dynamo_docs_metrics_example_trtllm_worker.txt")
ENSEMBLE = fixture_text("added/triton_trtllm_ensemble_counts_tensorrtllm_backend_issue49_EXCERPT.txt")
V1_START = fixture_text("added/vllm_v1_0.8_process_start_time_production-stack_issue318_EXCERPT.txt")
V05 = fixture_text("vllm_metrics_v0.5_datadog_opt125m.txt")


def totals(mapped, model: str) -> dict[str, float]:
    return {fld: sum(series.values()) for fld, series in mapped.models[model].counters.items()}


def test_vllm_under_ray_serve_is_billed_from_its_prefixed_families():
    mapped = parse_metrics("vllm", RAY)
    assert mapped.dialect == "ray_vllm:"
    assert mapped.token_families == ("ray_vllm:generation_tokens_total", "ray_vllm:prompt_tokens_total")
    ray = totals(mapped, "neuralmagic/Meta-Llama-3.1-70B-Instruct-FP8")
    assert (ray["prompt_tokens"], ray["generation_tokens"], ray["requests_ok"]) == (58.0, 300.0, 1.0)
    # The process start in the capture is Ray's metrics agent's, not vLLM's: not used.
    assert mapped.process_start is None


def test_ray_vllm_with_underscores_and_a_counter_also_exported_as_a_gauge_is_counted_once():
    # vLLM >= 0.11 under Ray: every ':' becomes '_'; Ray also exports each counter as a gauge without _total.
    underscored = RAY.replace("ray_vllm:", "ray_vllm_")
    legacy = "\n".join(line.replace("_tokens_total", "_tokens") for line in underscored.splitlines()
                       if "prompt_tokens_total" in line)
    mapped = parse_metrics("vllm", underscored + "\n" + legacy + "\n")
    assert mapped.dialect == "ray_vllm_"
    assert totals(mapped, "neuralmagic/Meta-Llama-3.1-70B-Instruct-FP8")["prompt_tokens"] == 58.0


def test_nvidia_nim_is_billed_from_unprefixed_vllm_families():
    mapped = parse_metrics("vllm", NIM)
    assert mapped.dialect == "nim" and "prompt_tokens_total" in mapped.token_families
    nim = totals(mapped, "meta/llama-3.1-8b-instruct")
    assert (nim["prompt_tokens"], nim["generation_tokens"], nim["requests_ok"]) == (109.0, 174.0, 5.0)
    assert mapped.process_start == 1.7303128549e09


def test_hugging_face_tgi_real_capture():
    mapped = parse_metrics("tgi", TGI, "bigscience/bloom-560m")
    tgi = totals(mapped, "bigscience/bloom-560m")
    assert (tgi["prompt_tokens"], tgi["requests_ok"]) == (662.0, 109.0)
    assert mapped.token_families == ("tgi_request_input_length_sum",)


def test_an_endpoint_without_token_families_is_unbillable_and_said_so_once(caplog):
    # Dynamo's TensorRT-LLM worker (Jan 2026) exports requests and latency but no token counter yet.
    mapped = parse_metrics("triton", DYNAMO_TRTLLM)
    assert mapped.dialect == "trtllm-serve" and mapped.token_families == ()
    srv = MetricsServer(lambda: DYNAMO_TRTLLM)
    try:
        collector = EngineCollector([Target(srv.url, "triton", "Qwen/Qwen3-0.6B")], timeout_s=2.0)
        with caplog.at_level(logging.WARNING, logger="agents.engines"):
            for _ in range(3):
                (reading,) = collector.collect()
        assert reading.up and reading.token_families == ()
        warnings = [r for r in caplog.records if "none of the token families" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING  # once per change, not per scrape
        engines, _ = DeltaTracker().compute([reading], time.time())
        assert engines[0]["up"] is True and engines[0]["token_families"] == []
    finally:
        srv.stop()


# Triton's model config API, as it answers for tensorrtllm_backend's inflight_batcher_llm ensemble
# (all_models/inflight_batcher_llm/ensemble/config.pbtxt: steps preprocessing -> tensorrt_llm -> postprocessing).
ENSEMBLE_CONFIG = {"name": "ensemble", "platform": "ensemble", "ensemble_scheduling": {"step": [
    {"model_name": "preprocessing", "model_version": -1}, {"model_name": "tensorrt_llm", "model_version": -1},
    {"model_name": "postprocessing", "model_version": -1}]}}


def test_a_triton_ensemble_counts_each_request_once():
    mapped = parse_metrics("triton", ENSEMBLE)
    # The capture: one client request appears in the ensemble's counters and in each composing step's.
    assert sum(totals(mapped, name)["requests_ok"] for name in mapped.models) == 59 * 3
    folded = fold_ensembles(mapped.models, {"ensemble": ("preprocessing", "tensorrt_llm", "postprocessing")})
    assert list(folded) == ["ensemble"]
    assert sum(folded["ensemble"].counters["requests_ok"].values()) == 59


def test_the_collector_reads_triton_configs_and_folds_ensembles():
    pages = {"/v2": {"name": "triton", "version": "2.40.0"},
             "/v2/models/ensemble/config": ENSEMBLE_CONFIG,
             **{f"/v2/models/{m}/config": {"name": m, "backend": "python"}
                for m in ("preprocessing", "postprocessing")},
             "/v2/models/tensorrt_llm/config": {"name": "tensorrt_llm", "backend": "tensorrtllm"}}
    srv = MetricsServer(lambda: ENSEMBLE, pages=pages)
    try:
        collector = EngineCollector([Target(srv.url, "triton")], timeout_s=2.0)
        (reading,) = collector.collect()
        assert list(reading.models) == ["ensemble"] and reading.version == "2.40.0"
        assert sum(reading.models["ensemble"].counters["requests_ok"].values()) == 59
    finally:
        srv.stop()


def test_a_model_keeps_its_name_when_one_of_its_families_is_rejected():
    # The v0.5 capture with the e2e histogram's +Inf bucket and every token counter gone: what is left for the
    # model (a rejected histogram, settings, gauges) still carries its name, not "unknown".
    kept = [line for line in V05.splitlines()
            if not line.startswith(('vllm:e2e_request_latency_seconds_bucket{le="+Inf"', "vllm:prompt_tokens_total",
                                    "vllm:generation_tokens_total", "vllm:request_success_total",
                                    "vllm:num_requests"))]
    mapped = parse_metrics("vllm", "\n".join(kept) + "\n", "fallback")
    assert any("no +Inf bucket" in e for e in mapped.errors)
    assert list(mapped.models) == ["facebook/opt-125m"]
    assert mapped.models["facebook/opt-125m"].settings["block_size"] == "16"


def _reading(text: str, url: str = "http://127.0.0.1:8000/metrics"):
    from agents.engines import EndpointReading

    mapped = parse_metrics("vllm", text)
    return EndpointReading(endpoint=url, engine="vllm", up=True, models=mapped.models,
                           token_families=mapped.token_families, process_start=mapped.process_start)


def _with_tokens(text: str, prompt: float) -> str:
    return text.replace('vllm:prompt_tokens_total{model_name="facebook/opt-125m"} 5.0',
                        f'vllm:prompt_tokens_total{{model_name="facebook/opt-125m"}} {prompt}')


@pytest.mark.parametrize(("configured", "expected"), [
    (1_718_140_000.0, 5),  # told to scrape it before the engine started: its 5 tokens were served since
    (1_718_150_000.0, 0),  # the engine was already running when we were told: baseline
])
def test_the_first_scrape_counts_tokens_served_since_the_endpoint_was_assigned(configured, expected):
    # The v0.5 capture's engine started at 1718140558 (process_start_time_seconds).
    tracker = DeltaTracker({"cfg|http://127.0.0.1:8000/metrics": configured})
    engines, _ = tracker.compute([_reading(V05)], 1_718_150_100.0)
    assert engines[0]["prompt_tokens"] == expected


def test_a_restart_between_scrapes_counts_everything_even_past_the_old_value():
    tracker = DeltaTracker()
    url = "http://127.0.0.1:8000/metrics"
    tracker.commit(tracker.compute([_reading(_with_tokens(V05, 100.0), url)], 1_718_150_000.0)[1])  # baseline
    restarted = V05.replace("process_start_time_seconds 1.7181405583e+09", "process_start_time_seconds 1.71815005e+09")
    engines, updates = tracker.compute([_reading(_with_tokens(restarted, 150.0), url)], 1_718_150_100.0)
    assert engines[0]["prompt_tokens"] == 150  # not 50: the new process counted 150 from zero
    tracker.commit(updates)
    engines, _ = tracker.compute([_reading(_with_tokens(restarted, 180.0), url)], 1_718_150_110.0)
    assert engines[0]["prompt_tokens"] == 30


def test_vllm_v1_exports_its_process_start():
    assert parse_metrics("vllm", V1_START).process_start == 1.74262400557e09


def test_every_capture_reports_its_token_families_or_none():
    for name, engine in [("vllm_metrics_v1_2026-03_qwen25_05b_kops_cncf_ai_conformance.txt", "vllm"),
                         ("sglang_metrics_docs_2024_llama31_8b.txt", "sglang"),
                         ("excerpts/trtllm_serve_pytrtllm_deepseekv3_TensorRT-LLM_pr5560_excerpt.txt", "triton"),
                         ("added/trtllm-serve_unprefixed_2025-07_pr5785_EXCERPT.txt", "triton")]:
        mapped = parse_metrics(engine, fixture_text(name))
        assert json.dumps(mapped.token_families)  # plain strings, ready for the batch
        billable = name != "added/trtllm-serve_unprefixed_2025-07_pr5785_EXCERPT.txt"
        assert bool(mapped.token_families) == billable, name


def test_vllm_v1_time_in_prefill_and_decode_is_read_as_histograms():
    """The phase histograms behind the input/output cost split (economics.split): their sums as exported."""
    m = parse_metrics("vllm", RAY).models["facebook/opt-125m"]
    (prefill,) = m.hists["prefill"].values()
    (decode,) = m.hists["decode"].values()
    assert (prefill.counts[-1], prefill.sum) == (6.0, 0.2140041133388877)
    assert (decode.counts[-1], decode.sum) == (6.0, 0.6237391703762114)
    full = parse_metrics("vllm", fixture_text("vllm_metrics_v1_2026-03_qwen25_05b_kops_cncf_ai_conformance.txt"))
    (prefill,) = full.models["Qwen/Qwen2.5-0.5B-Instruct"].hists["prefill"].values()
    assert prefill.le[:3] == (0.3, 0.5, 0.8) and prefill.le[-1] == 7680.0 and prefill.counts[-1] == 0.0


def test_engines_without_phase_times_report_none():
    m = parse_metrics("vllm", V05).models["facebook/opt-125m"]
    assert "prefill" not in m.hists and "decode" not in m.hists
