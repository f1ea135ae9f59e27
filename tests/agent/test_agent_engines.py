"""Every engine capture in tests/fixtures parsed and mapped, with concrete values asserted."""

from __future__ import annotations

import logging
import math

import pytest
from agentkit import fixture_text

from agents.engines import parse_metrics


def models_and_errors(engine: str, text: str, default_model: str | None = None):
    mapped = parse_metrics(engine, text, default_model)
    return mapped.models, mapped.errors


def one(models, name):
    assert name in models, sorted(models)
    return models[name]


def total(m, fld):
    return sum(m.counters.get(fld, {}).values())


def test_vllm_v05_datadog():
    models, errors = models_and_errors("vllm", fixture_text("vllm_metrics_v0.5_datadog_opt125m.txt"))
    assert errors == []
    m = one(models, "facebook/opt-125m")
    assert total(m, "prompt_tokens") == 5.0
    assert total(m, "generation_tokens") == 7.0
    assert total(m, "requests_ok") == 1.0  # finished_reason="length"
    assert total(m, "requests_failed") == 0
    assert m.gauges == {"running": 0.0, "waiting": 0.0, "kv_cache_usage": 0.0}  # V0 gpu_cache_usage_perc
    (ttft,) = m.hists["ttft"].values()
    assert ttft.le[:3] == (0.001, 0.005, 0.01) and ttft.le[-1] == 10.0 and len(ttft.le) == 16
    assert ttft.counts[-1] == 1.0 and ttft.counts[8] == 0.0 and ttft.counts[9] == 1.0  # le=0.5 holds it
    assert ttft.sum == pytest.approx(0.31326723098754883)
    (itl,) = m.hists["itl"].values()  # V0 time_per_output_token_seconds
    assert itl.counts[-1] == 6.0 and itl.sum == pytest.approx(0.19016313552856445)
    (e2e,) = m.hists["e2e"].values()
    assert e2e.le == (1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0) and e2e.counts[0] == 1.0
    assert m.settings["block_size"] == "16"
    assert m.settings["cache_dtype"] == "auto"
    assert m.settings["num_gpu_blocks"] == "7281"
    assert len(m.settings) == 10


def test_vllm_v07_truncated_mid_histogram_keeps_complete_families():
    text = fixture_text("vllm_metrics_v0.7_qwen25coder15b_aibrix_docs_truncated.txt")
    models, _errors = models_and_errors("vllm", text)
    m = one(models, "Qwen/Qwen2.5-Coder-1.5B-Instruct")
    assert total(m, "prompt_tokens") == 148.0
    assert total(m, "generation_tokens") == 955.0
    assert m.counters["requests_ok"] == {"vllm:request_success_total|finished_reason=stop": 4.0}
    assert m.hists == {}  # the truncated family is not one we map, and nothing is invented
    assert m.settings["num_gpu_blocks"] == "81767"
    assert m.gauges["kv_cache_usage"] == 0.0


def test_truncated_histogram_we_map_is_rejected_with_an_error():
    text = fixture_text("vllm_metrics_v0.5_datadog_opt125m.txt")
    cut = text.index('vllm:time_to_first_token_seconds_bucket{le="0.5"')
    models, errors = models_and_errors("vllm", text[:cut])
    m = one(models, "facebook/opt-125m")
    assert "ttft" not in m.hists
    assert any("no +Inf bucket" in e for e in errors)
    assert total(m, "prompt_tokens") == 5.0


def test_vllm_v1_2026_full_scrape():
    text = fixture_text("vllm_metrics_v1_2026-03_qwen25_05b_kops_cncf_ai_conformance.txt")
    models, errors = models_and_errors("vllm", text)
    assert errors == []
    m = one(models, "Qwen/Qwen2.5-0.5B-Instruct")
    assert set(m.counters["requests_ok"]) == {
        "vllm:request_success_total|engine=0,finished_reason=stop",
        "vllm:request_success_total|engine=0,finished_reason=length",
        "vllm:request_success_total|engine=0,finished_reason=repetition",
    }
    assert set(m.counters["requests_failed"]) == {
        "vllm:request_success_total|engine=0,finished_reason=abort",
        "vllm:request_success_total|engine=0,finished_reason=error",
    }
    assert total(m, "prompt_tokens") == 0.0 and total(m, "generation_tokens") == 0.0
    assert m.gauges["kv_cache_usage"] == 0.0  # V1 kv_cache_usage_perc
    assert set(m.hists) == {"ttft", "itl", "e2e", "prefill", "decode"}  # V1 exports time per phase
    (itl_name,) = m.hists["itl"]
    assert itl_name.startswith("vllm:inter_token_latency_seconds|")  # V1 name preferred
    assert m.settings["prefix_caching_hash_algo"] == "sha256"
    assert m.settings["num_gpu_blocks"] == "101625"
    assert "engine" not in m.settings and len(m.settings) == 24


def test_vllm_docs_example_with_literal_ellipsis(caplog):
    models, errors = models_and_errors("vllm", fixture_text("vllm_metrics_docs_usage_metrics_md_example.txt"))
    assert models == {}  # its only family (iteration_tokens_total) is not one we map; nothing invented
    assert any("'...'" in e for e in errors)


def test_vllm_ellipsis_in_middle_costs_only_its_block():
    text = fixture_text("vllm_metrics_v0.5_datadog_opt125m.txt").replace(
        "# TYPE vllm:generation_tokens_total counter\n", "# TYPE vllm:generation_tokens_total counter\n...\n")
    models, errors = models_and_errors("vllm", text)
    m = one(models, "facebook/opt-125m")
    assert total(m, "prompt_tokens") == 5.0
    assert "generation_tokens" not in m.counters
    assert len(m.hists["ttft"]) == 1 and errors


@pytest.mark.parametrize("name", [
    "excerpts/vllm_metrics_v0.5-0.6_help_type_no_samples_functionary263_excerpt.txt",
    "excerpts/vllm_metrics_v0.2_aioprometheus_pr1890_excerpt.txt",
])
def test_vllm_excerpts_without_samples(name):
    models, errors = models_and_errors("vllm", fixture_text(name), "my-model")
    assert errors == []
    assert models == {}


def test_vllm_nim_cache_config_info_excerpt():
    models, _errors = models_and_errors(
        "vllm", fixture_text("excerpts/vllm_metrics_2026_nim_qwen3vl_cache_config_info_grep_excerpt.txt"))
    m = one(models, "qwen3-vl-235b-awq")
    assert m.gauges == {"kv_cache_usage": 0.0}
    assert m.settings["kv_cache_size_tokens"] == "551520"
    assert m.settings["_block_size_resolved"] == "True"
    assert len(m.settings) == 28  # 29 labels minus engine


def test_sglang_docs_2024():
    models, errors = models_and_errors("sglang", fixture_text("sglang_metrics_docs_2024_llama31_8b.txt"))
    assert errors == []
    m = one(models, "meta-llama/Llama-3.1-8B-Instruct")
    assert total(m, "prompt_tokens") == 8128902.0
    assert total(m, "generation_tokens") == 7557572.0
    assert total(m, "requests_ok") == 11228.0  # e2e histogram count
    assert m.gauges == {"running": 162.0, "waiting": 2826.0, "kv_cache_usage": 0.28}
    (ttft,) = m.hists["ttft"].values()
    assert ttft.counts[-1] == 11008.0 and ttft.sum == pytest.approx(2351897.9474117756)
    assert ttft.counts[4] == 1.0  # le=0.04
    (itl,) = m.hists["itl"].values()
    assert itl.counts[-1] == 7400757.0
    (e2e,) = m.hists["e2e"].values()
    assert e2e.counts[-1] == 11228.0
    assert "generate_request" not in models  # func_latency_seconds{name=...} is not mapped


def test_sglang_pr1853_name_label():
    text = fixture_text("excerpts/sglang_metrics_2024-11_llama32_3b_pr1853_excerpt.txt")
    models, _ = models_and_errors("sglang", text)
    (name,) = models
    assert name.startswith("/shared/public/elr-models/meta-llama/Llama-3.2-3B/")
    assert total(models[name], "prompt_tokens") == 230794.0


def test_sglang_underscore_reexport():
    models, errors = models_and_errors(
        "sglang", fixture_text("excerpts/sglang_metrics_via_smg_grpc_sidecar_pr813_excerpt.txt"), "fallback")
    assert errors == []
    assert models == {}  # none of the four families is a token/request/latency family we map


def test_triton_densenet_datadog():
    models, errors = models_and_errors("triton", fixture_text("triton_metrics_datadog_densenet_trimmed.txt"))
    assert errors == []
    assert len(models) == 8
    d = one(models, "densenet_onnx")
    assert total(d, "requests_ok") == 3.0 and total(d, "requests_failed") == 0.0
    assert total(d, "prompt_tokens") == 0 and "prompt_tokens" not in d.counters  # no token metrics in Triton core
    assert d.gauges == {"waiting": 0.0}  # nv_inference_pending_request_count
    assert total(one(models, "simple"), "requests_ok") == 0.0


def test_triton_trtllm_backend_inflight():
    models, _errors = models_and_errors("triton", fixture_text("triton_trtllm_backend_metrics_readme_inflight.txt"))
    m = one(models, "tensorrt_llm")
    assert m.gauges == {"running": 0.0, "waiting": 1.0, "kv_cache_usage": 0.4875}
    assert m.counters == {}  # per-iteration token gauges are never billed as counters


def test_triton_trtllm_v1_and_summary_give_no_invented_numbers():
    models, errors = models_and_errors("triton", fixture_text("triton_trtllm_backend_metrics_readme_v1.txt"))
    assert models == {} and errors == []
    models, errors = models_and_errors("triton", fixture_text("triton_summary_docs_example.txt"))
    assert models == {} and errors == []


def test_triton_float_values_and_no_samples():
    models, _ = models_and_errors("triton", fixture_text("excerpts/triton_2021_float_values_server_pr3569_excerpt.txt"))
    assert total(models["simple_identity"], "requests_ok") == 40.0
    assert total(models["simple"], "requests_ok") == 20.0
    assert total(models["simple_string"], "requests_failed") == 0.0
    models, errors = models_and_errors(
        "triton", fixture_text("excerpts/triton_20.03_help_type_no_samples_server_issue2755_excerpt.txt"))
    assert models == {} and errors == []


def test_trtllm_serve_pytrtllm_prefix():
    models, _ = models_and_errors(
        "triton", fixture_text("excerpts/trtllm_serve_pytrtllm_deepseekv3_TensorRT-LLM_pr5560_excerpt.txt"))
    m = one(models, "deepseek-ai/DeepSeek-V3-0324")
    assert total(m, "prompt_tokens") == 201121.0
    assert total(m, "generation_tokens") == 81896.0
    assert total(m, "requests_ok") == 707.0 and total(m, "requests_failed") == 0.0
    assert m.gauges == {"running": 1.0, "waiting": 0.0}


def test_tgis_style_excerpt():
    models, _errors = models_and_errors(
        "tgi", fixture_text("excerpts/tgis_style_metrics_from_vllm_tgis_adapter_ibm_vllm_pr18_excerpt.txt"), "ibm/m")
    m = one(models, "ibm/m")  # TGI has no model label: the target's model
    assert m.gauges == {"running": 0.0, "waiting": 0.0}
    assert m.hists == {}


def test_tgi_documented_names():
    text = """# TYPE tgi_request_success counter
tgi_request_success 12
# TYPE tgi_request_failure counter
tgi_request_failure{err="validation"} 2
tgi_request_failure{err="overloaded"} 1
# TYPE tgi_request_input_length histogram
tgi_request_input_length_bucket{le="10"} 3
tgi_request_input_length_bucket{le="+Inf"} 12
tgi_request_input_length_sum 1234
tgi_request_input_length_count 12
# TYPE tgi_request_generated_tokens histogram
tgi_request_generated_tokens_bucket{le="+Inf"} 12
tgi_request_generated_tokens_bucket{le="100"} 10
tgi_request_generated_tokens_sum 987
tgi_request_generated_tokens_count 12
# TYPE tgi_request_duration histogram
tgi_request_duration_bucket{le="0.5"} 4
tgi_request_duration_bucket{le="1"} 10
tgi_request_duration_bucket{le="+Inf"} 12
tgi_request_duration_sum 9.5
tgi_request_duration_count 12
tgi_batch_current_size 3
tgi_queue_size 5
"""
    models, errors = models_and_errors("tgi", text, "bigscience/bloom")
    assert errors == []
    m = models["bigscience/bloom"]
    assert total(m, "requests_ok") == 12 and total(m, "requests_failed") == 3
    assert total(m, "prompt_tokens") == 1234 and total(m, "generation_tokens") == 987
    (e2e,) = m.hists["e2e"].values()
    assert e2e.le == (0.5, 1.0) and e2e.counts == [4, 10, 12] and e2e.sum == 9.5
    assert m.gauges == {"running": 3.0, "waiting": 5.0}


def test_triton_ms_histogram_converted_to_seconds():
    text = """# TYPE nv_inference_first_response_histogram_ms histogram
nv_inference_first_response_histogram_ms_bucket{model="llm",version="1",le="100"} 2
nv_inference_first_response_histogram_ms_bucket{model="llm",version="1",le="500"} 5
nv_inference_first_response_histogram_ms_bucket{model="llm",version="1",le="+Inf"} 6
nv_inference_first_response_histogram_ms_sum{model="llm",version="1"} 1500
nv_inference_first_response_histogram_ms_count{model="llm",version="1"} 6
"""
    models, _ = models_and_errors("triton", text)
    (h,) = models["llm"].hists["ttft"].values()
    assert h.le == (0.1, 0.5) and h.counts == [2, 5, 6] and h.sum == pytest.approx(1.5)


@pytest.mark.parametrize("text,expect", [
    ('vllm:prompt_tokens_total{model_name="m"} NaN\nvllm:generation_tokens_total{model_name="m"} 4\n', "non-finite"),
    ('vllm:prompt_tokens_total{model_name="m"} -5\nvllm:generation_tokens_total{model_name="m"} 4\n', "negative"),
    ('vllm:prompt_tokens_total{model_name="m" 5\nvllm:generation_tokens_total{model_name="m"} 4\n', "unparseable"),
])
def test_malformed_values_are_skipped(text, expect):
    models, errors = models_and_errors("vllm", text)
    assert any(expect in e for e in errors), errors
    assert "prompt_tokens" not in models.get("m", type("X", (), {"counters": {}})()).counters
    if expect != "unparseable":
        assert total(models["m"], "generation_tokens") == 4


def test_unknown_metric_names_and_garbage_never_crash():
    for text in ("", "\n\n", "foo_bar 1\n", "\x00\x01garbage{", "# TYPE x histogram\nx_bucket{le=\"a\"} 1\n",
                 "vllm:time_to_first_token_seconds_bucket{le=\"1\",model_name=\"m\"} 5\n"
                 "vllm:time_to_first_token_seconds_bucket{le=\"+Inf\",model_name=\"m\"} 3\n"
                 "vllm:time_to_first_token_seconds_sum{model_name=\"m\"} 1\n"):
        models, _errors = models_and_errors("vllm", text)
        for m in models.values():
            assert "ttft" not in m.hists  # non-cumulative buckets rejected
    assert math.isfinite(0.0)


def test_engine_collector_logs_problems_once(caplog):
    from agents.config import Target
    from agents.engines import EngineCollector

    calls = []

    def getter(url, timeout):
        calls.append(url)
        if url.endswith("/metrics"):
            return 200, b'vllm:prompt_tokens_total{model_name="m"} NaN\n'
        return 404, b""

    c = EngineCollector([Target("http://x:1/metrics", "vllm")], getter=getter)
    with caplog.at_level(logging.ERROR, logger="agents.engines"):
        c.collect()
        c.collect()
    assert sum("non-finite" in r.getMessage() for r in caplog.records) == 1
    assert calls.count("http://x:1/version") == 1  # version fetched once, not per scrape
