"""Configuration (TOML, env, portal config) and the simulated backend."""

from __future__ import annotations

import time

import pytest
from agentkit import REPO, validate

from agents import config as cfgmod
from agents.config import ConfigError, Target
from agents.daemon import Agent

TOML = """
portal_url = "http://portal.example:8000"
state_dir = "{state}"
interval_s = 10
sample_s = 1.0
hostname = "gpu-node-01"
[simulate]
gpus = 8
gpu_model = "A100"
mig = true
seed = 7
load = 0.9
[[targets]]
url = "http://127.0.0.1:8001/metrics"
engine = "vllm"
model = "meta-llama/Llama-3.1-8B-Instruct"
[[targets]]
url = "http://127.0.0.1:8002/metrics"
engine = "triton"
"""


def write(tmp_path, text=TOML):
    p = tmp_path / "agent.toml"
    p.write_text(text.replace("{state}", str(tmp_path / "state")))
    return p


def test_toml_keys_and_env_overrides(tmp_path):
    cfg = cfgmod.load(write(tmp_path), env={})
    assert cfg.portal_url == "http://portal.example:8000" and cfg.hostname == "gpu-node-01"
    assert cfg.simulate.gpus == 8 and cfg.simulate.gpu_model == "A100" and cfg.simulate.mig is True
    assert cfg.targets == (Target("http://127.0.0.1:8001/metrics", "vllm", "meta-llama/Llama-3.1-8B-Instruct"),
                           Target("http://127.0.0.1:8002/metrics", "triton", None))
    env = {"TOKENMILL_AGENT_PORTAL_URL": "https://p2", "TOKENMILL_AGENT_STATE_DIR": str(tmp_path / "s2"),
           "TOKENMILL_AGENT_INTERVAL_S": "30", "TOKENMILL_AGENT_SAMPLE_S": "0.5", "TOKENMILL_AGENT_SIMULATE": "2"}
    cfg = cfgmod.load(write(tmp_path), env=env)
    assert (cfg.portal_url, cfg.interval_s, cfg.sample_s, cfg.simulate.gpus) == ("https://p2", 30, 0.5, 2)
    assert cfg.simulate.gpu_model == "A100"  # the rest of [simulate] is kept
    assert cfgmod.load(write(tmp_path), simulate=3, env={}).simulate.gpus == 3


def test_example_toml_is_valid():
    cfg = cfgmod.load(REPO / "agents" / "agent.example.toml", env={})
    assert cfg.interval_s == 10 and cfg.targets[0].engine == "vllm" and cfg.simulate is None
    assert (cfg.send_period_s, cfg.post_max_intervals) == (30.0, 360)


def test_the_send_period_and_request_bound_are_read(tmp_path):
    cfg = cfgmod.load(write(tmp_path, "send_period_s = 0\npost_max_intervals = 720"), env={})
    assert (cfg.send_period_s, cfg.post_max_intervals) == (0.0, 720)


@pytest.mark.parametrize("bad", ['interval_s = 0', 'bogus = 1', '[[targets]]\nurl = "x"\nengine = "ollama"',
                                 '[simulate]\ngpu_model = "V100"', 'portal_url = "ftp://x"',
                                 'send_period_s = -1', 'post_max_intervals = 721'])
def test_bad_config_is_refused(tmp_path, bad):
    with pytest.raises(ConfigError):
        cfgmod.load(write(tmp_path, bad), env={})


def test_missing_explicit_file_is_an_error_but_default_may_be_absent(tmp_path):
    with pytest.raises(ConfigError):
        cfgmod.load(tmp_path / "nope.toml", env={})


def test_portal_config_overrides_and_persists(tmp_path):
    cfg = cfgmod.load(write(tmp_path), env={})
    raw = {"config_version": 2, "interval_s": 5, "sample_s": 0.5,
           "targets": [{"url": "http://10.0.0.1:8080/metrics", "engine": "tgi", "model": "bigscience/bloom"}]}
    cfgmod.persist_applied(cfg.state_dir, raw)
    cfg2 = cfgmod.load(write(tmp_path), env={})
    assert (cfg2.config_version, cfg2.interval_s, cfg2.sample_s) == (2, 5, 0.5)
    assert cfg2.targets == (Target("http://10.0.0.1:8080/metrics", "tgi", "bigscience/bloom"),)
    cfgmod.persist_applied(cfg.state_dir, dict(raw, config_version=0))  # version 0: the local file rules
    assert cfgmod.load(write(tmp_path), env={}).targets == cfg.targets


def test_agent_applies_newer_config_without_restart(tmp_path):
    cfg = cfgmod.load(write(tmp_path), env={})
    agent = Agent(cfg)
    agent.offer_config({"config_version": 4, "interval_s": 20, "sample_s": 2.0,
                        "targets": [{"url": "http://h:1/metrics", "engine": "sglang", "model": None}]})
    assert agent.apply_pending_config()
    assert agent.cfg.interval_s == 20 and agent.sim_engines.targets == (Target("http://h:1/metrics", "sglang"),)
    agent.offer_config({"config_version": 3, "interval_s": 99, "sample_s": 1.0, "targets": []})  # older: ignored
    assert not agent.apply_pending_config() and agent.cfg.interval_s == 20
    assert cfgmod.read_applied(cfg.state_dir)["config_version"] == 4


def run_sim(cfg, intervals=3, state=None):
    agent = Agent(cfg, state=state or {})
    agent.start_nvml()
    out = []
    t = float(int(time.time())) + 100.0  # ahead of the simulator's construction time
    clock = agent.nvml.nv
    for k in range(intervals):
        for i in range(cfg.interval_s):
            clock.clock = lambda t=t + k * cfg.interval_s + i + 1: t  # deterministic time for the physics
            agent.nvml.sample(t + k * cfg.interval_s + i + 1)
        batch, upd, sim_upd = agent.build_batch(t + k * cfg.interval_s, t + (k + 1) * cfg.interval_s)
        validate(batch)
        agent.commit(upd, sim_upd)
        out.append((batch, upd, sim_upd))
    return agent, out


def test_simulated_node_h100_mig_batches_validate(tmp_path):
    cfg = cfgmod.load(write(tmp_path, TOML.replace('"A100"', '"H100"')), env={})
    _agent, out = run_sim(cfg)
    batch = out[-1][0]
    assert batch["host"]["simulated"] is True and batch["host"]["driver_version"] == "590.48.01"
    gpus = batch["gpus"]
    assert len(gpus) == 8 and {g["name"] for g in gpus} == {"NVIDIA H100 80GB HBM3"}
    assert all(g["memory_total_mib"] == 81559 and g["power_limit_w"] == 700.0 for g in gpus)
    mig = [g for g in gpus if g["mig_mode"]]
    assert [g["index"] for g in mig] == [3, 7]
    assert all(sum(int(m["profile"][0]) for m in g["mig_instances"]) == 7 for g in mig)
    assert all(g["util_mean"] is None for g in mig)  # NVML gives no utilization in MIG mode
    plain = [g for g in gpus if not g["mig_mode"]]
    assert all(0 < g["energy_mj"] <= 700 * 10 * 1000 for g in plain)
    engines = {e["endpoint"]: e for e in batch["engines"]}
    assert set(engines) == {"http://127.0.0.1:8001/metrics", "http://127.0.0.1:8002/metrics"}
    assert engines["http://127.0.0.1:8001/metrics"]["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert out[0][0]["engines"][0]["generation_tokens"] == 0  # first sight: baseline
    assert batch["engines"][0]["generation_tokens"] > 0 and batch["engines"][0]["ttft"]["counts"][-1] > 0


def test_simulated_uuids_are_stable_and_util_follows_tokens(tmp_path):
    from agents.simulate import SimNvml, gpu_uuid

    cfg = cfgmod.load(write(tmp_path), env={})
    a = SimNvml(cfg.simulate, "node-a")
    b = SimNvml(cfg.simulate, "node-a")
    assert [a.nvmlDeviceGetUUID(a.nvmlDeviceGetHandleByIndex(i)) for i in range(8)] == \
           [b.nvmlDeviceGetUUID(b.nvmlDeviceGetHandleByIndex(i)) for i in range(8)] == \
           [gpu_uuid("node-a", i) for i in range(8)]
    assert gpu_uuid("node-b", 0) != gpu_uuid("node-a", 0)
    from agents.simulate import LoadCurve

    curve = LoadCurve(cfg.simulate, "node-a")
    night, afternoon = curve(1_790_000_000 - 1_790_000_000 % 86400 + 4 * 3600), \
        curve(1_790_000_000 - 1_790_000_000 % 86400 + 16 * 3600)
    assert night < 0.35 < afternoon


def test_sim_engine_state_continues_across_restart(tmp_path):
    cfg = cfgmod.load(write(tmp_path), env={})
    agent, _out = run_sim(cfg, intervals=2)
    state = dict(agent.delta.state)
    state.update(agent.sim_engines.state)
    _agent2, out2 = run_sim(cfg, intervals=2, state=state)
    # no fake reset on restart: the first batch after restart has ordinary (not cumulative-sized) deltas
    assert 0 <= out2[0][0]["engines"][0]["generation_tokens"] < 10**6
