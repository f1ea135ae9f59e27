"""Agent configuration: TOML file, environment overrides, and the config the portal hands back.

Precedence, lowest to highest: built-in defaults < TOML file < TOKENMILL_AGENT_* environment variables < the
portal's config (``interval_s``, ``sample_s``, ``targets``) once one with ``config_version >= 1`` has been applied
and persisted in ``{state_dir}/applied_config.json``.
"""

from __future__ import annotations

import json
import os
import socket
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = "/etc/tokenmill/agent.toml"
ENGINES = ("vllm", "tgi", "triton", "sglang")
GPU_MODELS = ("H100", "A100")
# The checks of `tokenmill-agent selftest` (agents/selftest.py); [simulate] selftest_fail names them.
SELFTEST_CHECKS = ("answers", "xid", "memory", "power", "clocks")
APPLIED_CONFIG_FILE = "applied_config.json"


class ConfigError(ValueError):
    """The configuration cannot be used."""


@dataclass(frozen=True)
class Target:
    url: str
    engine: str
    model: str | None = None


@dataclass(frozen=True)
class SimulateConfig:
    gpus: int = 8
    gpu_model: str = "H100"
    mig: bool = False
    seed: int = 42
    load: float = 0.6
    driver_version: str = "590.48.01"
    # Endpoints this simulated node serves without any token counter (as Dynamo's TensorRT-LLM worker of January
    # 2026 does): they answer, count requests, and are reported unbillable.
    unbillable: tuple[str, ...] = ()
    # The GPUs that serve a deployment (the rest idle); None: every GPU serves when the node has targets.
    serving_gpus: tuple[int, ...] | None = None
    # Generation tokens/s at full load per endpoint URL (the demo seed sets it from the model and the GPUs held);
    # an endpoint not listed draws its own (agents.loadmodel.endpoint_profile).
    capacity: tuple[tuple[str, float], ...] = ()
    # Faults the simulated GPUs show to `tokenmill-agent selftest` (tests, demos of a failed
    # burn-in): (GPU index, or None for every GPU; check name), from entries such as "power"
    # (every GPU) or "1:xid" (GPU 1 only).
    selftest_fail: tuple[tuple[int | None, str], ...] = ()


@dataclass(frozen=True)
class Config:
    portal_url: str = "http://127.0.0.1:8000"
    state_dir: Path = Path("/var/lib/tokenmill-agent")
    interval_s: int = 10
    sample_s: float = 1.0
    hostname: str = field(default_factory=socket.gethostname)
    simulate: SimulateConfig | None = None
    targets: tuple[Target, ...] = ()
    spool_max_bytes: int = 256 * 1024 * 1024
    scrape_timeout_s: float = 2.0
    send_timeout_s: float = 10.0
    # Intervals stay interval_s long; the sender posts what the spool holds this often (0: as each closes).
    send_period_s: float = 30.0
    post_max_intervals: int = 360
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    config_version: int = 0

    @property
    def credential_path(self) -> Path:
        return self.state_dir / "credential"

    @property
    def spool_path(self) -> Path:
        return self.state_dir / "spool.sqlite3"

    @property
    def applied_config_path(self) -> Path:
        return self.state_dir / APPLIED_CONFIG_FILE


def _target(raw: Any, where: str) -> Target:
    if not isinstance(raw, dict) or not isinstance(raw.get("url"), str) or not raw["url"]:
        raise ConfigError(f"{where}: a target needs a 'url' string")
    engine = raw.get("engine")
    if engine not in ENGINES:
        raise ConfigError(f"{where}: engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    model = raw.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise ConfigError(f"{where}: model must be a non-empty string")
    return Target(url=raw["url"], engine=engine, model=model)


def _simulate(raw: Any) -> SimulateConfig:
    if not isinstance(raw, dict):
        raise ConfigError("[simulate] must be a table")
    unknown = set(raw) - {"gpus", "gpu_model", "mig", "seed", "load", "driver_version", "unbillable", "serving_gpus",
                          "capacity", "selftest_fail"}
    if unknown:
        raise ConfigError(f"[simulate]: unknown keys {sorted(unknown)}")
    sim = SimulateConfig(
        gpus=int(raw.get("gpus", 8)),
        gpu_model=str(raw.get("gpu_model", "H100")),
        mig=bool(raw.get("mig", False)),
        seed=int(raw.get("seed", 42)),
        load=float(raw.get("load", 0.6)),
        driver_version=str(raw.get("driver_version", SimulateConfig.driver_version)),
        unbillable=tuple(str(url) for url in raw.get("unbillable", ())),
        serving_gpus=None if "serving_gpus" not in raw else tuple(int(i) for i in raw["serving_gpus"]),
        capacity=_capacity(raw.get("capacity", {})),
        selftest_fail=_selftest_fail(raw.get("selftest_fail", [])),
    )
    return _check_sim(sim)


def _selftest_fail(raw: Any) -> tuple[tuple[int | None, str], ...]:
    where = "simulate.selftest_fail"
    if not isinstance(raw, list) or not all(isinstance(entry, str) for entry in raw):
        raise ConfigError(f'{where} must be a list of strings such as "power" or "1:xid"')
    out: list[tuple[int | None, str]] = []
    for entry in raw:
        index, _, check = entry.rpartition(":")
        if check not in SELFTEST_CHECKS:
            names = ", ".join(SELFTEST_CHECKS)
            raise ConfigError(f"{where}: {entry!r} names no check (one of {names})")
        if index and not index.isdigit():
            raise ConfigError(f"{where}: {entry!r}: the GPU index before ':' must be a number")
        out.append((int(index) if index else None, check))
    return tuple(out)


def _capacity(raw: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(raw, dict) or not all(isinstance(v, int | float) and v >= 0 for v in raw.values()):
        raise ConfigError("[simulate.capacity] must map endpoint URLs to tokens per second (>= 0)")
    return tuple(sorted((str(url), float(tps)) for url, tps in raw.items()))


def _check_sim(sim: SimulateConfig) -> SimulateConfig:
    if not 1 <= sim.gpus <= 64:
        raise ConfigError("simulate.gpus must be 1..64")
    if sim.gpu_model not in GPU_MODELS:
        raise ConfigError(f"simulate.gpu_model must be one of {GPU_MODELS}")
    if not 0.0 <= sim.load <= 1.0:
        raise ConfigError("simulate.load must be within 0..1")
    if any(index is not None and index >= sim.gpus for index, _check in sim.selftest_fail):
        raise ConfigError("simulate.selftest_fail names a GPU index the node does not have")
    return sim


_TOP_KEYS = {
    "portal_url", "state_dir", "interval_s", "sample_s", "hostname", "simulate", "targets", "spool_max_bytes",
    "scrape_timeout_s", "send_timeout_s", "backoff_base_s", "backoff_max_s", "send_period_s", "post_max_intervals",
}


def from_mapping(data: dict[str, Any]) -> Config:
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"unknown configuration keys: {sorted(unknown)}")
    cfg = Config()
    values: dict[str, Any] = {}
    for key in ("portal_url", "hostname"):
        if key in data:
            values[key] = str(data[key])
    if "state_dir" in data:
        values["state_dir"] = Path(str(data["state_dir"]))
    for key in ("interval_s", "spool_max_bytes", "post_max_intervals"):
        if key in data:
            values[key] = int(data[key])
    for key in ("sample_s", "scrape_timeout_s", "send_timeout_s", "backoff_base_s", "backoff_max_s", "send_period_s"):
        if key in data:
            values[key] = float(data[key])
    if "simulate" in data:
        values["simulate"] = _simulate(data["simulate"])
    if "targets" in data:
        if not isinstance(data["targets"], list):
            raise ConfigError("[[targets]] must be an array of tables")
        values["targets"] = tuple(_target(t, f"targets[{i}]") for i, t in enumerate(data["targets"]))
    return validate(replace(cfg, **values))


def validate(cfg: Config) -> Config:
    if not cfg.portal_url.startswith(("http://", "https://")):
        raise ConfigError("portal_url must be an http:// or https:// URL")
    if not 1 <= cfg.interval_s <= 3600:
        raise ConfigError("interval_s must be 1..3600")
    if not 0.05 <= cfg.sample_s <= cfg.interval_s:
        raise ConfigError("sample_s must be at least 0.05 and at most interval_s")
    if not 0 <= cfg.send_period_s <= 300:
        raise ConfigError("send_period_s must be 0..300")
    if not 1 <= cfg.post_max_intervals <= 720:
        raise ConfigError("post_max_intervals must be 1..720 (the portal takes at most 720 a request)")
    if cfg.spool_max_bytes < 64 * 1024:
        raise ConfigError("spool_max_bytes must be at least 65536")
    if not cfg.hostname:
        raise ConfigError("hostname must not be empty")
    return cfg


def _env_overrides(cfg: Config, env: dict[str, str]) -> Config:
    values: dict[str, Any] = {}
    try:
        if env.get("TOKENMILL_AGENT_PORTAL_URL"):
            values["portal_url"] = env["TOKENMILL_AGENT_PORTAL_URL"]
        if env.get("TOKENMILL_AGENT_STATE_DIR"):
            values["state_dir"] = Path(env["TOKENMILL_AGENT_STATE_DIR"])
        if env.get("TOKENMILL_AGENT_INTERVAL_S"):
            values["interval_s"] = int(env["TOKENMILL_AGENT_INTERVAL_S"])
        if env.get("TOKENMILL_AGENT_SAMPLE_S"):
            values["sample_s"] = float(env["TOKENMILL_AGENT_SAMPLE_S"])
        if env.get("TOKENMILL_AGENT_SIMULATE"):
            gpus = int(env["TOKENMILL_AGENT_SIMULATE"])
            if gpus > 0:
                values["simulate"] = _check_sim(replace(cfg.simulate or SimulateConfig(), gpus=gpus))
    except ValueError as exc:
        raise ConfigError(f"bad TOKENMILL_AGENT_* environment value: {exc}") from exc
    return replace(cfg, **values)


def load(
    path: str | os.PathLike[str] | None, *, simulate: int | None = None, env: dict[str, str] | None = None
) -> Config:
    """Load the TOML file (``None``: the default path, which may be absent), then env, then --simulate."""
    env = dict(os.environ) if env is None else env
    data: dict[str, Any] = {}
    file_path = Path(path) if path is not None else Path(DEFAULT_CONFIG_PATH)
    if file_path.exists():
        try:
            with file_path.open("rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {file_path}: {exc}") from exc
    elif path is not None:
        raise ConfigError(f"configuration file {file_path} does not exist")
    cfg = _env_overrides(from_mapping(data), env)
    if simulate:
        cfg = replace(cfg, simulate=_check_sim(replace(cfg.simulate or SimulateConfig(), gpus=int(simulate))))
    cfg = validate(cfg)
    return apply_portal_config(cfg, read_applied(cfg.state_dir))


def read_applied(state_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((state_dir / APPLIED_CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None


def portal_config_ok(raw: Any) -> bool:
    try:
        int(raw["config_version"])
        int(raw["interval_s"])
        float(raw["sample_s"])
        for t in raw["targets"]:
            _target(t, "portal config")
    except (KeyError, TypeError, ValueError):
        return False
    return True


def apply_portal_config(cfg: Config, raw: dict[str, Any] | None) -> Config:
    """Overlay a portal AgentConfigOut dict (if valid and versioned >= 1) on the local configuration."""
    if not raw or not portal_config_ok(raw) or int(raw["config_version"]) < 1:
        return cfg
    interval = min(3600, max(1, int(raw["interval_s"])))
    sample = min(float(interval), max(0.05, float(raw["sample_s"])))
    targets = tuple(_target(t, "portal config") for t in raw["targets"])
    version = int(raw["config_version"])
    return replace(cfg, interval_s=interval, sample_s=sample, targets=targets, config_version=version)


def persist_applied(state_dir: Path, raw: dict[str, Any]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (APPLIED_CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(raw, sort_keys=True))
    os.replace(tmp, state_dir / APPLIED_CONFIG_FILE)
