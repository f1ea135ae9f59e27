"""Simulated backend: an object with pynvml's function names (so the real NVML collector code runs on it) and
simulated engine counters, both driven by one daily load curve. Used by ``--simulate N`` / ``[simulate]``.

Realistic figures come from the nvidia-smi captures in shared/fixtures (H100 80GB HBM3: 81559 MiB, 700 W limit,
~69 W / 41 C idle, SM 345 -> 1980 MHz, memory clock 2619 MHz, MIG layout 3g.40gb+2g.20gb+1g.10gb+1g.10gb with GI
ids 2/3/9/10; A100-SXM4-80GB: 81920 MiB, 400 W, SM 210 -> 1410 MHz, memory clock 1593 MHz).
"""

from __future__ import annotations

import hashlib
import math
import random
import time
import uuid as uuidlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from agents.config import SimulateConfig, Target
from agents.engine_specs import DIALECTS
from agents.engines import EndpointReading, Hist, ModelReading

MIB = 1024 * 1024
_NS = uuidlib.UUID("5b0c5a8e-6f7e-4d59-9a57-3d4f3d1f7a10")


@dataclass(frozen=True)
class GpuModel:
    name: str
    memory_mib: int
    power_limit_w: float
    idle_w: float
    sm_idle: int
    sm_max: int
    mem_clock: int
    mig_memory_mib: dict[str, int]


GPU_MODELS = {
    "H100": GpuModel("NVIDIA H100 80GB HBM3", 81559, 700.0, 69.0, 345, 1980, 2619,
                     {"1g.10gb": 9984, "1g.20gb": 20096, "2g.20gb": 20096, "3g.40gb": 40448, "4g.40gb": 40448,
                      "7g.80gb": 80896}),
    "A100": GpuModel("NVIDIA A100-SXM4-80GB", 81920, 400.0, 62.0, 210, 1410, 1593,
                     {"1g.10gb": 9728, "1g.20gb": 19968, "2g.20gb": 19968, "3g.40gb": 40192, "4g.40gb": 40192,
                      "7g.80gb": 80384}),
}
# (profile, gpu instance id) layouts that fill the 7 compute slices; valid on both H100 80GB and A100 80GB
MIG_LAYOUTS = (
    (("3g.40gb", 2), ("2g.20gb", 3), ("1g.10gb", 9), ("1g.10gb", 10)),
    (("4g.40gb", 1), ("3g.40gb", 2)),
    (("2g.20gb", 3), ("2g.20gb", 4), ("2g.20gb", 5), ("1g.10gb", 13)),
    tuple(("1g.10gb", gi) for gi in (7, 8, 9, 10, 11, 12, 13)),
)
PCI_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)
XIDS = ((13, 3.0), (31, 4.0), (43, 3.0), (63, 1.5), (79, 0.3), (94, 1.0))
XID_RATE_PER_GPU_S = 1.0 / (8 * 4 * 3600)  # an 8-GPU node sees about one XID every four hours
# CUDA driver API version each driver branch reports (NVML encodes 13.1 as 13010).
CUDA_BY_DRIVER_BRANCH = {"590": 13010, "580": 13000, "570": 12080, "560": 12060, "550": 12040, "535": 12020}


def _stable(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big")


def gpu_uuid(hostname: str, index: int) -> str:
    return f"GPU-{uuidlib.uuid5(_NS, f'{hostname}/{index}')}"


def daily_shape(hour_utc: float) -> float:
    """0.2 at 04:00 UTC, 1.0 at 16:00 UTC."""
    return 0.2 + 0.8 * (0.5 - 0.5 * math.cos(2 * math.pi * (hour_utc - 4.0) / 24.0))


class LoadCurve:
    def __init__(self, sim: SimulateConfig, salt: str = ""):
        self.sim, self.salt = sim, salt

    def _noise(self, bucket: int) -> float:
        return random.Random(_stable(self.sim.seed, self.salt, bucket)).uniform(-1.0, 1.0)

    def __call__(self, t: float) -> float:
        hour = (t % 86400.0) / 3600.0
        pos = t / 300.0
        b = math.floor(pos)
        noise = self._noise(b) + (self._noise(b + 1) - self._noise(b)) * (pos - b)
        return max(0.0, min(1.0, self.sim.load * daily_shape(hour) * (1.0 + 0.1 * noise)))


class _Gpu:
    def __init__(self, index: int, hostname: str, model: GpuModel, sim: SimulateConfig, serving: bool, now: float):
        self.index, self.model = index, model
        self.uuid = gpu_uuid(hostname, index)
        self.pci = f"00000000:{PCI_BUSES[index % 8] + 0x100 * (index // 8) & 0xFF:02X}:00.0"
        self.rng = random.Random(_stable(sim.seed, hostname, index))
        self.factor = self.rng.uniform(0.85, 1.0)
        self.serving = serving
        self.mig = None
        if sim.mig and index % 4 == 3:
            layout = MIG_LAYOUTS[(index // 4 + sim.seed) % len(MIG_LAYOUTS)]
            self.mig = [_Mig(self, gi, prof, model.mig_memory_mib[prof], hostname) for prof, gi in layout]
        self.t = now
        self.util = 0.0
        self.power = model.idle_w
        self.temp = 33.0 + self.rng.uniform(0, 6)
        self.energy_mj = 10**9 + self.rng.randrange(10**11)
        self.ecc = [0, 0]
        self.reasons = 0x1


class _Mig:
    def __init__(self, parent: _Gpu, gi: int, profile: str, mem_mib: int, hostname: str):
        self.parent, self.gi, self.profile, self.mem_mib = parent, gi, profile, mem_mib
        self.uuid = f"MIG-{uuidlib.uuid5(_NS, f'{hostname}/{parent.index}/mig/{gi}')}"


class SimNvml:
    """Implements the subset of pynvml the collector calls, with pynvml's own error classes."""

    def __init__(self, sim: SimulateConfig, hostname: str, serving: bool = False, clock=time.time):
        import pynvml  # error classes and constants only; the library itself is never loaded

        self._pynvml = pynvml
        self.NVMLError = pynvml.NVMLError
        for name in dir(pynvml):
            if name.startswith(("NVMLError_", "NVML_", "nvmlEventType", "nvmlClocks")):
                setattr(self, name, getattr(pynvml, name))
        self.sim, self.hostname, self.clock = sim, hostname, clock
        self.model = GPU_MODELS[sim.gpu_model]
        self.load = LoadCurve(sim, hostname)
        now = clock()
        self._gpus = [_Gpu(i, hostname, self.model, sim, serving, now) for i in range(sim.gpus)]
        self._events: list[Any] = []
        self._xid_rng = random.Random(_stable(sim.seed, hostname, "xid"))

    def _err(self, code: int):
        return self._pynvml.NVMLError(code)

    # ---- physics
    def _advance(self, g: _Gpu) -> _Gpu:
        now = self.clock()
        dt = now - g.t
        if dt <= 0:
            return g
        g.t = now
        m = self.model
        load = self.load(now)
        g.util = max(0.0, min(100.0, 100.0 * load * g.factor + g.rng.gauss(0, 3.0))) if load > 0.01 else 0.0
        target_w = m.idle_w + (m.power_limit_w * 0.93 - m.idle_w) * (g.util / 100.0) ** 0.85
        g.power = max(m.idle_w * 0.9, min(m.power_limit_w, target_w + g.rng.gauss(0, 6.0)))
        g.energy_mj += int(g.power * dt * 1000.0)
        target_t = 34.0 + 32.0 * g.util / 100.0
        g.temp += (target_t - g.temp) * (1.0 - math.exp(-dt / 60.0))
        g.reasons = 0x1 if g.util < 1.0 else (0x4 if g.power >= 0.97 * m.power_limit_w else 0)
        if self._xid_rng.random() < dt * XID_RATE_PER_GPU_S:
            codes, weights = zip(*XIDS, strict=True)
            xid = self._xid_rng.choices(codes, weights)[0]
            self._events.append(SimpleNamespace(device=g, eventType=0x8, eventData=xid, gpuInstanceId=0xFFFFFFFF,
                                                computeInstanceId=0xFFFFFFFF, timeStamp=int(now * 1e6)))
            if xid == 94:
                g.ecc[1] += 1
            elif xid == 63:
                g.ecc[0] += 1
        return g

    def _gpu(self, handle) -> _Gpu:
        if isinstance(handle, _Gpu):
            return self._advance(handle)
        raise self._err(self._pynvml.NVML_ERROR_INVALID_ARGUMENT)

    # ---- system
    def nvmlInit(self):
        return None

    def nvmlShutdown(self):
        return None

    def nvmlSystemGetDriverVersion(self):
        return self.sim.driver_version

    def nvmlSystemGetNVMLVersion(self):
        branch = self.sim.driver_version.split(".")[0]
        return f"{CUDA_BY_DRIVER_BRANCH.get(branch, 13010) // 1000}.{self.sim.driver_version}"

    def nvmlSystemGetCudaDriverVersion(self):
        return CUDA_BY_DRIVER_BRANCH.get(self.sim.driver_version.split(".")[0], 13010)

    def nvmlSystemGetConfComputeState(self):
        return SimpleNamespace(environment=0, ccFeature=0, devToolsMode=0)

    def nvmlDeviceGetCount(self):
        return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        return self._gpus[index]

    # ---- identity
    def nvmlDeviceGetUUID(self, h):
        return h.uuid

    def nvmlDeviceGetName(self, h):
        if isinstance(h, _Mig):
            return f"{self.model.name} MIG {h.profile}"
        return self.model.name

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=h.pci)

    # ---- samples
    def nvmlDeviceGetUtilizationRates(self, h):
        g = self._gpu(h)
        if g.mig:
            raise self._err(self._pynvml.NVML_ERROR_NOT_SUPPORTED)  # as real NVML in MIG mode
        return SimpleNamespace(gpu=round(g.util), memory=round(g.util * 0.35))

    def nvmlDeviceGetPowerUsage(self, h):
        return int(self._gpu(h).power * 1000)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return round(self._gpu(h).temp)

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self._gpu(h).reasons

    def nvmlDeviceGetMemoryInfo(self, h):
        if isinstance(h, _Mig):
            used = int(h.mem_mib * (0.85 if h.parent.serving else 0.02 * h.parent.util / 100.0 + 0.001))
            return SimpleNamespace(total=h.mem_mib * MIB, used=used * MIB, free=(h.mem_mib - used) * MIB)
        g = self._gpu(h)
        total = self.model.memory_mib
        used = int(total * 0.88) if g.serving else int(total * 0.2 * g.util / 100.0)
        if g.mig:
            used = sum(int(m.mem_mib * (0.85 if g.serving else 0.0)) for m in g.mig)
        return SimpleNamespace(total=total * MIB, used=used * MIB, free=(total - used) * MIB)

    def nvmlDeviceGetEnforcedPowerManagementLimit(self, h):
        return int(self.model.power_limit_w * 1000)

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return self._gpu(h).energy_mj

    def nvmlDeviceGetClockInfo(self, h, clock_type):
        g = self._gpu(h)
        if clock_type == self._pynvml.NVML_CLOCK_MEM:
            return self.model.mem_clock
        if g.util < 1.0:
            return self.model.sm_idle
        return self.model.sm_max - (120 if g.reasons & 0x4 else 0)

    def nvmlDeviceGetTotalEccErrors(self, h, error_type, counter_type):
        return self._gpu(h).ecc[1 if error_type == self._pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED else 0]

    def nvmlDeviceGetRemappedRows(self, h):
        self._gpu(h)
        return (0, 0, 0, 0)

    def nvmlDeviceGetRetiredPages(self, h, cause):
        raise self._err(self._pynvml.NVML_ERROR_NOT_SUPPORTED)

    # ---- MIG
    def nvmlDeviceGetMigMode(self, h):
        g = self._gpu(h)
        return [1, 1] if g.mig else [0, 0]

    def nvmlDeviceGetMaxMigDeviceCount(self, h):
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h, index):
        g = self._gpu(h)
        if not g.mig or index >= len(g.mig):
            raise self._err(self._pynvml.NVML_ERROR_NOT_FOUND)
        return g.mig[index]

    def nvmlDeviceGetGpuInstanceId(self, h):
        return h.gi

    # ---- events
    def nvmlEventSetCreate(self):
        return object()

    def nvmlDeviceRegisterEvents(self, h, types, event_set):
        return None

    def nvmlEventSetWait_v2(self, event_set, timeout_ms):
        if not self._events:
            raise self._err(self._pynvml.NVML_ERROR_TIMEOUT)
        return self._events.pop(0)

    def nvmlEventSetFree(self, event_set):
        return None


# ------------------------------------------------------------------------------------------------ engines

TTFT_LE = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
ITL_LE = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_LE = (1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
VERSIONS = {"vllm": "0.10.1", "tgi": "3.3.4", "triton": "2.59.0", "sglang": "0.4.10"}
DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
GEN_TOKENS_PER_REQUEST = 220


def _lognormal_hist(le: tuple[float, ...], n: int, median: float, sigma: float) -> tuple[list[int], float]:
    mu = math.log(median)
    counts = [round(n * 0.5 * (1.0 + math.erf((math.log(b) - mu) / (sigma * math.sqrt(2))))) for b in le]
    counts = [min(c, n) for c in counts] + [n]
    for i in range(1, len(counts)):
        counts[i] = max(counts[i], counts[i - 1])
    return counts, n * math.exp(mu + sigma * sigma / 2.0)


class SimEngines:
    """Per target: cumulative counters that grow with the load curve. Their state is kept in the agent's state
    table (keys ``sim|...``) and committed with the batch, so a restart continues the same counters."""

    def __init__(self, targets: tuple[Target, ...], sim: SimulateConfig, hostname: str, state: dict[str, Any]):
        self.sim, self.hostname = sim, hostname
        self.state = {k: v for k, v in state.items() if k.startswith("sim|")}
        self.targets = targets
        self.load = LoadCurve(sim, hostname)

    def set_targets(self, targets: tuple[Target, ...]) -> None:
        self.targets = targets

    def commit(self, updates: dict[str, Any]) -> None:
        self.state.update(updates)

    def collect(self, now: float) -> tuple[list[EndpointReading], dict[str, Any]]:
        readings, updates = [], {}
        for t in self.targets:
            reading, upd = self._one(t, now)
            readings.append(reading)
            updates.update(upd)
        return readings, updates

    def _one(self, target: Target, now: float) -> tuple[EndpointReading, dict[str, Any]]:
        model = target.model or DEFAULT_MODEL
        key = f"sim|{target.url}|{model}"
        rng = random.Random(_stable(self.sim.seed, self.hostname, target.url, int(now * 10)))
        prev = self.state.get(key)
        if prev is None:  # an engine that has been running for a while before the agent saw it
            seed_rng = random.Random(_stable(self.sim.seed, self.hostname, target.url))
            gen0 = seed_rng.randrange(10**6, 10**8)
            prev = {"p": gen0 * 3, "g": gen0, "ok": gen0 // GEN_TOKENS_PER_REQUEST, "fail": gen0 // 40000,
                    "ttft": [[0] * (len(TTFT_LE) + 1), 0.0], "itl": [[0] * (len(ITL_LE) + 1), 0.0],
                    "e2e": [[0] * (len(E2E_LE) + 1), 0.0],
                    "cap": seed_rng.uniform(1500.0, 4000.0), "pr": seed_rng.uniform(1.5, 3.5)}
        last_t = self.state.get(f"sim|t|{key}", now - 1.0)
        dt = max(0.0, min(now - last_t, 60.0))  # a stopped agent's simulated engines idle
        load = self.load(now)
        gen = max(0, round(prev["cap"] * load * dt * (1.0 + rng.gauss(0, 0.05))))
        prompt = max(0, round(gen * prev["pr"] * (1.0 + rng.gauss(0, 0.05))))
        reqs = gen // GEN_TOKENS_PER_REQUEST
        failed = sum(1 for _ in range(min(reqs, 2000)) if rng.random() < 0.003)
        ttft_med = 0.08 * (1.0 + 3.0 * load**4)
        itl_med = 0.018 * (1.0 + load * load)
        new = dict(prev)
        new.update(p=prev["p"] + prompt, g=prev["g"] + gen, ok=prev["ok"] + reqs - failed, fail=prev["fail"] + failed)
        for name, le, median, sigma in (("ttft", TTFT_LE, ttft_med, 0.6), ("itl", ITL_LE, itl_med, 0.35),
                                        ("e2e", E2E_LE, ttft_med + itl_med * GEN_TOKENS_PER_REQUEST, 0.5)):
            counts, total = _lognormal_hist(le, reqs, median, sigma)
            new[name] = [[a + b for a, b in zip(prev[name][0], counts, strict=True)], prev[name][1] + total]
        billable = target.url not in self.sim.unbillable
        tokens = {"prompt_tokens": {"sim_prompt": float(new["p"])},
                  "generation_tokens": {"sim_gen": float(new["g"])}} if billable else {}
        m = ModelReading(
            counters={**tokens, "requests_ok": {"sim_ok": float(new["ok"])},
                      "requests_failed": {"sim_fail": float(new["fail"])}},
            hists={name: {f"sim_{name}": Hist(le=le, counts=[float(c) for c in new[name][0]], sum=new[name][1])}
                   for name, le in (("ttft", TTFT_LE), ("itl", ITL_LE), ("e2e", E2E_LE))},
            gauges={"running": float(round(reqs / max(dt, 1.0) * (ttft_med + itl_med * GEN_TOKENS_PER_REQUEST))),
                    "waiting": float(max(0, round((load - 0.8) * 60))), "kv_cache_usage": round(0.05 + 0.85 * load, 3)},
            settings={"block_size": "16", "cache_dtype": "auto", "gpu_memory_utilization": "0.9"}
            if target.engine == "vllm" else {},
        )
        reading = EndpointReading(endpoint=target.url, engine=target.engine, up=True,
                                  latency_ms=round(1.5 + rng.random() * 2.5, 3), version=VERSIONS[target.engine],
                                  models={model: m},
                                  token_families=DIALECTS[target.engine][0].spec.token_samples() if billable else ())
        return reading, {key: new, f"sim|t|{key}": now}
