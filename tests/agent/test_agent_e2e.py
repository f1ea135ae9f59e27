"""End to end: real loopback engine servers with fixture text, the real daemon in a subprocess, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from agentkit import PYTHON, REPO, FakePortal, MetricsServer, agent_env, fixture_text, validate, wait_for
from fakenvml import FakeGpu, FakeNvml

from agents import config as cfgmod
from agents.daemon import Agent
from agents.spool import decode

V05 = fixture_text("vllm_metrics_v0.5_datadog_opt125m.txt")
T0 = 1_800_000_000.0  # intervals after the capture's process start (2024-06-11), as on a real clock
PROMPT_LINE = 'vllm:prompt_tokens_total{model_name="facebook/opt-125m"} 5.0'
GEN_LINE = 'vllm:generation_tokens_total{model_name="facebook/opt-125m"} 7.0'
TTFT_INF = 'vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="facebook/opt-125m"} 1.0'
TTFT_COUNT = 'vllm:time_to_first_token_seconds_count{model_name="facebook/opt-125m"} 1.0'
TTFT_SUM = 'vllm:time_to_first_token_seconds_sum{model_name="facebook/opt-125m"} 0.31326723098754883'
for line in (PROMPT_LINE, GEN_LINE, TTFT_INF, TTFT_COUNT, TTFT_SUM):
    assert line in V05


class CountingVllm:
    """vLLM v0.5 fixture text whose token counters follow a script (increase, reset, ...)."""

    def __init__(self, values):
        self.values = list(values)  # (prompt, generation, ttft_inf_count) per scrape; last one repeats
        self.served: list[tuple[float, float, float]] = []
        self.lock = threading.Lock()

    def render(self) -> str:
        with self.lock:
            v = self.values.pop(0) if len(self.values) > 1 else self.values[0]
            self.served.append(v)
        p, g, n = v
        # histogram: the extra observations land in +Inf only (the finite buckets keep the fixture's values)
        return (V05.replace(PROMPT_LINE, PROMPT_LINE[:-3] + f"{p:.1f}").replace(GEN_LINE, GEN_LINE[:-3] + f"{g:.1f}")
                .replace(TTFT_INF, TTFT_INF[:-3] + f"{n:.1f}").replace(TTFT_COUNT, TTFT_COUNT[:-3] + f"{n:.1f}")
                .replace(TTFT_SUM, TTFT_SUM.rsplit(" ", 1)[0] + f" {0.3 + n}"))


def agent_for(tmp_path, targets, **kw):
    cfg = cfgmod.Config(state_dir=tmp_path / "state", targets=tuple(targets), hostname="n1", **kw)
    return Agent(cfg, nvml=FakeNvml([FakeGpu(0)]))


def test_exact_token_deltas_with_resets_end_to_end(tmp_path):
    script = [(5, 7, 1), (105, 57, 3), (1105, 557, 10), (40, 20, 2), (140, 70, 5), (140, 70, 5)]
    eng = CountingVllm(script)
    srv = MetricsServer(eng.render, info={"version": "0.5.0"})
    try:
        agent = agent_for(tmp_path, [cfgmod.Target(srv.url, "vllm")])
        agent.start_nvml()
        got = []
        for k in range(len(script)):
            agent.sample()
            batch, upd, sim = agent.build_batch(T0 + 10 * k, T0 + 10 + 10 * k)
            validate(batch)
            agent.commit(upd, sim)
            (e,) = batch["engines"]
            assert e["model"] == "facebook/opt-125m" and e["version"] == "0.5.0" and e["up"] is True
            assert e["settings"]["block_size"] == "16"
            got.append((e["prompt_tokens"], e["generation_tokens"], e["ttft"]["counts"][-1] if e["ttft"] else 0))
        # baseline, +100/+50/+2, +1000/+500/+7, reset -> new value 40/20/2, +100/+50/+3, nothing
        assert got == [(0, 0, 0), (100, 50, 2), (1000, 500, 7), (40, 20, 2), (100, 50, 3), (0, 0, 0)]
    finally:
        srv.stop()


@pytest.mark.parametrize("case", ["http500", "timeout", "truncated", "nan_negative_unknown", "refused"])
def test_malformed_engine_output_never_crashes(tmp_path, case, caplog):
    render = {
        "truncated": lambda: V05[: V05.index('vllm:e2e_request_latency_seconds_bucket{le="5.0"')],
        "nan_negative_unknown": lambda: (V05.replace(PROMPT_LINE, PROMPT_LINE[:-3] + "NaN")
                                         .replace(GEN_LINE, GEN_LINE[:-3] + "-3") + "made_up_metric{x=\"1\"} 4\n"),
    }.get(case, lambda: V05)
    srv = MetricsServer(render, status=500 if case == "http500" else 200, delay_s=1.0 if case == "timeout" else 0)
    url = srv.url
    if case == "refused":
        srv.stop()
    try:
        agent = agent_for(tmp_path, [cfgmod.Target(url, "vllm", "fallback-model")], scrape_timeout_s=0.3)
        for k in range(2):
            batch, upd, sim = agent.build_batch(T0 + 10 * k, T0 + 10 + 10 * k)
            validate(batch)
            agent.commit(upd, sim)
        (e,) = batch["engines"]
        if case in ("http500", "timeout", "refused"):
            assert e["up"] is False and e["model"] == "fallback-model" and e["prompt_tokens"] == 0
        elif case == "truncated":
            assert e["up"] is True and e["ttft"] is None and e["e2e"] is None  # nothing new, nothing invented
        else:
            assert e["up"] is True and e["prompt_tokens"] == 0 and e["generation_tokens"] == 0
        assert any(r.levelname == "ERROR" for r in caplog.records)
    finally:
        if case != "refused":
            srv.stop()


def write_config(tmp_path: Path, portal_url: str, targets: list[str], extra: str = "") -> Path:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    (state / "credential").write_text(FakePortal.CREDENTIAL + "\n")
    lines = [f'portal_url = "{portal_url}"', f'state_dir = "{state}"', "interval_s = 1", "sample_s = 0.25",
             'hostname = "e2e-node"', "backoff_base_s = 0.1", "backoff_max_s = 0.3", "send_timeout_s = 2.0",
             "send_period_s = 0.5", extra]
    for url in targets:
        lines += ["[[targets]]", f'url = "{url}"', 'engine = "vllm"']
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_agent(config: Path, log: Path, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, "-m", "agents.cli", "run", "--config", str(config), "--log-level", "DEBUG"],
        cwd=REPO, env=agent_env(TOKENMILL_AGENT_NVML_MODULE="fakenvml:ZeroCostNvml",
                                PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests' / 'agent'}", **env),
        stdout=subprocess.DEVNULL, stderr=log.open("ab"))


def spool_rows(state: Path) -> dict[int, dict]:
    db = sqlite3.connect(f"file:{state / 'spool.sqlite3'}?mode=ro", uri=True)
    try:
        return {seq: decode(body) for seq, body in db.execute("SELECT seq, body FROM batches")}
    finally:
        db.close()


def test_daemon_survives_portal_outage_and_sigkill_without_loss_or_duplication(tmp_path, portal):
    eng = CountingVllm([(1000 + 37 * i, 500 + 11 * i, 1 + i) for i in range(100000)])
    srv = MetricsServer(eng.render, info={"version": "0.5.0"})
    log = tmp_path / "agent.log"
    config = write_config(tmp_path, portal.url, [srv.url])
    state = tmp_path / "state"
    try:
        portal.fail_status = 503
        proc = start_agent(config, log)
        assert wait_for(lambda: any(p[2] == 503 for p in portal.posts), 15), log.read_text()
        portal.stop()  # connection refused; the agent keeps collecting and spooling
        time.sleep(1.5)
        status = json.loads(subprocess.run(
            [PYTHON, "-m", "agents.cli", "status", "--json", "--config", str(config)], cwd=REPO, env=agent_env(),
            capture_output=True, text=True, check=True).stdout)
        assert status["spool_depth"] >= 2 and status["credential_present"] and status["last_error"]
        proc.send_signal(signal.SIGKILL)  # between spool and send
        proc.wait(5)
        proc = start_agent(config, log)
        time.sleep(1.2)
        portal.fail_status = None
        portal.server.start()
        assert wait_for(lambda: len(portal.stored_order) >= status["spool_depth"] + 2, 15), log.read_text()
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        proc = start_agent(config, log)
        n = len(portal.stored_order)
        assert wait_for(lambda: len(portal.stored_order) >= n + 2, 15), log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0  # clean stop after spooling the current interval
    finally:
        if proc.poll() is None:
            proc.kill()
        srv.stop()
    text = log.read_text()
    assert "Traceback" not in text, text
    assert "stopping: current interval spooled" in text
    leftover = spool_rows(state)
    seqs = portal.stored_order + sorted(leftover)
    assert seqs == list(range(1, len(seqs) + 1))  # every seq exactly once, sent in order
    assert portal.conflicts == 0
    batches = list(portal.batches.values()) + list(leftover.values())
    for b in batches:
        validate(b)
    prompt = sum(e["prompt_tokens"] for b in batches for e in b["engines"])
    gen = sum(e["generation_tokens"] for b in batches for e in b["engines"])
    db = sqlite3.connect(f"file:{state / 'spool.sqlite3'}?mode=ro", uri=True)
    last = {k: json.loads(v) for k, v in db.execute("SELECT k, v FROM state WHERE k LIKE 'c|%'")}
    db.close()
    last_prompt = last[f"c|{srv.url}|facebook/opt-125m|vllm:prompt_tokens_total|"]
    last_gen = last[f"c|{srv.url}|facebook/opt-125m|vllm:generation_tokens_total|"]
    first_prompt, first_gen, _ = eng.served[0]  # the very first scrape is the baseline
    assert prompt == last_prompt - first_prompt > 0  # served between baseline and last committed scrape: exact
    assert gen == last_gen - first_gen > 0
    assert any(b["gpus"] for b in batches) and all(len(b["gpus"]) == 8 for b in batches if b["gpus"])


def test_a_credential_rejected_for_a_while_loses_no_batch_and_no_token(tmp_path, portal):
    # The portal answers 401 for several intervals (the credential was rotated there, the node's file is stale),
    # then the node gets the new one: every batch of the window arrives, none is quarantined.
    eng = CountingVllm([(1000 + 37 * i, 500 + 11 * i, 1 + i) for i in range(100000)])
    srv = MetricsServer(eng.render, info={"version": "0.5.0"})
    log = tmp_path / "agent.log"
    config = write_config(tmp_path, portal.url, [srv.url])
    state = tmp_path / "state"
    (state / "credential").write_text("tmn_rotated_away\n")
    proc = start_agent(config, log)
    try:
        assert wait_for(lambda: sum(p[2] == 401 for p in portal.posts) >= 5, 20), log.read_text()
        time.sleep(2.5)  # several intervals spooled behind the rejected one
        status = subprocess.run([PYTHON, "-m", "agents.cli", "status", "--config", str(config)], cwd=REPO,
                                env=agent_env(), capture_output=True, text=True, check=True).stdout
        assert "REJECTED by the portal since" in status and "quarantined:      0 batch(es)" in status
        (state / "credential").write_text(FakePortal.CREDENTIAL + "\n")
        assert wait_for(lambda: len(portal.stored_order) >= 6 and not spool_rows(state), 20), log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        srv.stop()
    leftover = spool_rows(state)
    seqs = portal.stored_order + sorted(leftover)
    assert seqs == list(range(1, len(seqs) + 1))
    db = sqlite3.connect(f"file:{state / 'spool.sqlite3'}?mode=ro", uri=True)
    assert db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0] == 0
    last = {k: json.loads(v) for k, v in db.execute("SELECT k, v FROM state WHERE k LIKE 'c|%'")}
    db.close()
    batches = list(portal.batches.values()) + list(leftover.values())
    prompt = sum(e["prompt_tokens"] for b in batches for e in b["engines"])
    assert prompt == last[f"c|{srv.url}|facebook/opt-125m|vllm:prompt_tokens_total|"] - eng.served[0][0] > 0
    assert all(b["quarantined_batches"] == 0 for b in batches)


def test_enroll_status_and_once_commands(tmp_path, portal):
    portal.config = {"config_version": 5, "interval_s": 15, "sample_s": 1.0,
                     "targets": [{"url": "http://127.0.0.1:1/metrics", "engine": "vllm", "model": "m"}]}
    config = tmp_path / "agent.toml"
    state = tmp_path / "st"
    config.write_text(f'portal_url = "{portal.url}"\nstate_dir = "{state}"\n')
    env = agent_env()
    r = subprocess.run([PYTHON, "-m", "agents.cli", "--config", str(config), "--simulate", "2", "enroll",
                        "--token", "enroll-token-abc"], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cred = state / "credential"
    assert cred.read_text().strip() == FakePortal.CREDENTIAL
    assert stat.S_IMODE(cred.stat().st_mode) == 0o600
    assert portal.enrolled_host.simulated is True and portal.enrolled_host.hostname
    assert cfgmod.load(config, env={}).config_version == 5  # the returned config is stored and applied
    r = subprocess.run([PYTHON, "-m", "agents.cli", "enroll", "--config", str(config), "--token", "enroll-token-abc"],
                       cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "403" in r.stderr  # one-time token
    r = subprocess.run([PYTHON, "-m", "agents.cli", "status", "--config", str(config)], cwd=REPO, env=env,
                       capture_output=True, text=True, check=True)
    assert "credential:       present" in r.stdout and "quarantined:      0 batch(es), 0 tokens" in r.stdout
    r = subprocess.run([PYTHON, "-m", "agents.cli", "requeue", "--config", str(config), "--all"], cwd=REPO, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "no spool: nothing is quarantined\n"


NO_DJANGO = """
import io, json, sys, contextlib
from agents import cli
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    rc = cli.main(["--simulate", "2", "once", "--print"])
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("django", "pydantic", "portal", "ninja"))
print(json.dumps({"rc": rc, "bad": bad, "batch": json.loads(buf.getvalue())}))
"""


def test_agent_never_imports_django_or_pydantic(tmp_path):
    env = agent_env(TOKENMILL_AGENT_STATE_DIR=str(tmp_path / "s"))
    env.pop("DJANGO_SETTINGS_MODULE", None)
    r = subprocess.run([PYTHON, "-c", NO_DJANGO], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    out = json.loads(r.stdout)
    assert out["rc"] == 0 and out["bad"] == []
    batch = validate(out["batch"])
    assert batch.host.simulated and len(batch.gpus) == 2
    assert not (tmp_path / "s" / "spool.sqlite3").exists()  # once: nothing spooled
