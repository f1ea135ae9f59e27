"""The collection loop: sample GPUs every sample_s, close an interval every interval_s (wall-clock aligned),
compute deltas, spool the batch; a separate sender thread ships the spool, so the portal being down never stalls
collection. SIGTERM/SIGINT close the current (partial) interval into the spool, then exit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import threading
import time
from dataclasses import replace
from typing import Any

from agents import __version__
from agents import config as config_mod
from agents.config import Config
from agents.delta import DeltaTracker
from agents.engines import EngineCollector

log = logging.getLogger(__name__)

MAX_EVENTS = 1000
NVML_RETRY_S = 300.0


def os_name() -> str | None:
    try:
        with open("/etc/os-release") as fh:
            for line in fh:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')[:128]
    except OSError:
        pass
    return f"{platform.system()}"[:128] or None


class Agent:
    def __init__(self, cfg: Config, *, nvml: Any = None, state: dict[str, Any] | None = None, http_get=None):
        self.base_cfg = cfg
        self.cfg = cfg
        self._nvml_module = nvml
        self.nvml = None
        self._nvml_failed_at = -math.inf
        kwargs = {"getter": http_get} if http_get is not None else {}
        self.sim_engines = None
        state = state or {}
        if cfg.simulate is not None:
            from agents.simulate import SimEngines

            self.sim_engines = SimEngines(cfg.targets, cfg.simulate, cfg.hostname, state)
            self.engines = None
        else:
            self.engines = EngineCollector(cfg.targets, cfg.scrape_timeout_s, **kwargs)
        self.delta = DeltaTracker({k: v for k, v in state.items() if not k.startswith("sim|")})
        self._config_lock = threading.Lock()
        self._pending_config: dict[str, Any] | None = None

    # ------------------------------------------------------------------ pieces
    def _make_nvml(self):
        if self._nvml_module is not None:
            return self._nvml_module
        if self.cfg.simulate is not None:
            from agents.simulate import SimNvml

            return SimNvml(self.cfg.simulate, self.cfg.hostname, serving=bool(self.cfg.targets))
        from agents.nvml import load_nvml_module

        return load_nvml_module()

    def start_nvml(self) -> None:
        if self.nvml is not None or time.monotonic() - self._nvml_failed_at < NVML_RETRY_S:
            return
        from agents.nvml import NvmlCollector

        try:
            collector = NvmlCollector(self._make_nvml())
            collector.start()
        except Exception as exc:  # no driver / no library: keep collecting engines
            self._nvml_failed_at = time.monotonic()
            log.error("NVML unavailable (%s: %s); GPU metrics off, retry in %ds", type(exc).__name__, exc,
                      int(NVML_RETRY_S))
            return
        self.nvml = collector
        log.info("NVML: %d GPU(s), driver %s", len(collector.gpus), collector.host.get("driver_version"))

    def host(self) -> dict[str, Any]:
        facts = self.nvml.host if self.nvml is not None else {}
        return {
            "hostname": self.cfg.hostname[:253],
            "os": os_name(),
            "kernel": platform.release()[:128] or None,
            "driver_version": facts.get("driver_version"),
            "cuda_driver_version": facts.get("cuda_driver_version"),
            "nvml_version": facts.get("nvml_version"),
            "agent_version": __version__,
            "simulated": self.cfg.simulate is not None,
        }

    def sample(self) -> None:
        if self.nvml is None:
            self.start_nvml()
        if self.nvml is not None:
            try:
                self.nvml.sample()
            except Exception:  # one bad sample must not stop the loop
                log.exception("GPU sampling failed")

    def build_batch(self, start: float, end: float) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Close the interval: returns (batch without seq, delta-state updates, simulator-state updates)."""
        gpus: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        if self.nvml is not None:
            try:
                gpus, events = self.nvml.finish_interval(end)
            except Exception:  # one bad summary must not stop the loop
                log.exception("GPU summary failed")
        sim_updates: dict[str, Any] = {}
        if self.sim_engines is not None:
            readings, sim_updates = self.sim_engines.collect(end)
        else:
            readings = self.engines.collect()
        engines, updates = self.delta.compute(readings, end)
        if len(events) > MAX_EVENTS:
            log.error("%d health events in one interval; only the first %d are sent", len(events), MAX_EVENTS)
            events = events[:MAX_EVENTS]
        batch = {
            "schema_version": 1,
            "seq": 1,
            "interval_start": round(max(start, end - 3600.0), 3),  # the contract caps an interval at 1 h
            "interval_end": round(max(end, start + 0.001), 3),
            "host": self.host(),
            "gpus": gpus[:64],
            "engines": engines[:64],
            "events": events,
            "dropped_batches": 0,
        }
        return batch, updates, sim_updates

    def commit(self, updates: dict[str, Any], sim_updates: dict[str, Any]) -> None:
        self.delta.commit(updates)
        if self.sim_engines is not None:
            self.sim_engines.commit(sim_updates)

    # ------------------------------------------------------------------ config from the portal
    def offer_config(self, raw: dict[str, Any]) -> None:
        """Called by the sender with the reply's config; applied by the main loop if its version is newer."""
        if not config_mod.portal_config_ok(raw):
            log.warning("ignoring malformed config from portal: %r", raw)
            return
        if int(raw["config_version"]) <= self.cfg.config_version:
            return
        config_mod.persist_applied(self.cfg.state_dir, raw)
        with self._config_lock:
            self._pending_config = raw

    def apply_pending_config(self) -> bool:
        with self._config_lock:
            raw, self._pending_config = self._pending_config, None
        if raw is None:
            return False
        new = config_mod.apply_portal_config(self.base_cfg, raw)
        if new.config_version <= self.cfg.config_version:
            return False
        log.info("applying portal config v%d: interval %ss, sample %ss, %d target(s)", new.config_version,
                 new.interval_s, new.sample_s, len(new.targets))
        self.cfg = replace(self.cfg, interval_s=new.interval_s, sample_s=new.sample_s, targets=new.targets,
                           config_version=new.config_version)
        if self.engines is not None:
            self.engines.set_targets(new.targets)
        if self.sim_engines is not None:
            self.sim_engines.set_targets(new.targets)
        return True

    def close(self) -> None:
        if self.engines is not None:
            self.engines.close()
        if self.nvml is not None:
            self.nvml.shutdown()

    # ------------------------------------------------------------------ one-shot
    def once(self, state_seq: int = 1) -> dict[str, Any]:
        start = time.time()
        self.sample()
        time.sleep(min(self.cfg.sample_s, 1.0))
        self.sample()
        batch, _updates, _sim = self.build_batch(start, time.time())
        batch["seq"] = max(1, state_seq)
        return batch


def send_phase(hostname: str, interval: int) -> float:
    """This node's offset into each interval, stable per hostname. Intervals end at k x interval + phase, so a
    fleet's batches arrive spread over the interval instead of all at the same second (benchmarks/bench_ingest.py
    measured that herd at p99 1.6 s for 125 nodes)."""
    digest = hashlib.sha256(hostname.encode()).digest()
    return int.from_bytes(digest[:4], "big") % (interval * 1000) / 1000


def _next_boundary(now: float, interval: int, sample_s: float, phase: float = 0.0) -> float:
    boundary = (math.floor((now - phase) / interval) + 1) * interval + phase
    if boundary - now < sample_s:
        boundary += interval
    return boundary


def run(cfg: Config, stop: threading.Event, *, nvml: Any = None, http_get=None) -> int:
    """The daemon. Returns when ``stop`` is set, after spooling the current partial interval."""
    from agents.sender import Sender
    from agents.spool import Spool

    spool = Spool(cfg.spool_path, cfg.spool_max_bytes)
    agent = Agent(cfg, nvml=nvml, state=spool.load_state(), http_get=http_get)
    sender = Sender(spool_path=cfg.spool_path, portal_url=cfg.portal_url, credential_path=cfg.credential_path,
                    timeout_s=cfg.send_timeout_s, backoff_base_s=cfg.backoff_base_s, backoff_max_s=cfg.backoff_max_s,
                    on_config=agent.offer_config, max_bytes=cfg.spool_max_bytes, send_period_s=cfg.send_period_s,
                    post_max_intervals=cfg.post_max_intervals)
    sender.start()
    agent.start_nvml()
    log.info("tokenmill-agent %s running: portal %s, interval %ss, sample %ss, %d target(s)%s", __version__,
             cfg.portal_url, cfg.interval_s, cfg.sample_s, len(cfg.targets),
             f", simulating {cfg.simulate.gpus} {cfg.simulate.gpu_model}" if cfg.simulate else "")

    def close_interval(start: float, end: float) -> None:
        try:
            batch, updates, sim_updates = agent.build_batch(start, end)
            unbillable = sorted({e["endpoint"] for e in batch["engines"] if e["up"] and not e["token_families"]})
            seq = spool.append(batch, {**updates, **sim_updates}, meta={"unbillable": json.dumps(unbillable)})
        except Exception:  # never die in the loop; the next interval retries from the same state
            log.exception("could not close interval %.0f-%.0f", start, end)
            return
        agent.commit(updates, sim_updates)
        log.debug("spooled seq %d (%d gpus, %d engines, %d events)", seq, len(batch["gpus"]), len(batch["engines"]),
                  len(batch["events"]))
        sender.wake.set()

    def next_boundary(now: float) -> float:
        interval = agent.cfg.interval_s
        return _next_boundary(now, interval, agent.cfg.sample_s, send_phase(agent.cfg.hostname, interval))

    start = time.time()
    boundary = next_boundary(start)
    next_sample = time.monotonic()
    try:
        while not stop.is_set():
            if time.monotonic() >= next_sample:
                agent.sample()
                next_sample += agent.cfg.sample_s
                if next_sample < time.monotonic():
                    next_sample = time.monotonic() + agent.cfg.sample_s
            now = time.time()
            if now >= boundary:
                close_interval(start, boundary if boundary > start else now)
                start = boundary if boundary > start else now
                if agent.apply_pending_config():
                    next_sample = time.monotonic()
                boundary = next_boundary(max(now, start))
            elif now < start:  # wall clock stepped back: restart the interval
                start = now
                boundary = next_boundary(now)
            wait = min(next_sample - time.monotonic(), boundary - time.time())
            stop.wait(max(0.0, min(wait, agent.cfg.sample_s)))
        end = time.time()
        if end > start:
            close_interval(start, end)
        log.info("stopping: current interval spooled")
    finally:
        sender.stop()
        sender.join(timeout=cfg.send_timeout_s + 2.0)
        agent.close()
        spool.close()
    return 0
