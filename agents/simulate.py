"""Simulated backend: an object with pynvml's function names (so the real NVML collector code runs on it) and
simulated engine counters, both driven by one daily load curve. Used by ``--simulate N`` / ``[simulate]``.

Realistic figures come from the nvidia-smi captures in shared/fixtures (H100 80GB HBM3: 81559 MiB, 700 W limit,
~69 W / 41 C idle, SM 345 -> 1980 MHz, memory clock 2619 MHz, MIG layout 3g.40gb+2g.20gb+1g.10gb+1g.10gb with GI
ids 2/3/9/10; A100-SXM4-80GB: 81920 MiB, 400 W, SM 210 -> 1410 MHz, memory clock 1593 MHz).
"""

from __future__ import annotations

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
from agents.loadmodel import (
    FAILED_SHARE,
    GEN_TOKENS_PER_REQUEST,
    PHASE_ENGINES,
    SIGMA,
    LoadCurve,
    endpoint_profile,
    gpu_factor,
    gpu_util,
    lognormal_hist,
    memory_used_mib,
    mig_memory_used_mib,
    power_w,
    stable,
    temperature_c,
)

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


def simulated_cc_on(*, seed: int, hostname: str, gpu_model: str, mig: bool) -> bool:
    """Simulated: whether a node runs in confidential-computing mode. Hopper (H100) has CC and A100 has not; CC on
    H100 excludes MIG, so it is on for about half of the H100 nodes without MIG, chosen by a stable hash. The
    demo seed sets Gpu.cc_mode from the same rule."""
    return gpu_model == "H100" and not mig and stable(seed, hostname, "cc") % 2 == 0


def gpu_uuid(hostname: str, index: int) -> str:
    return f"GPU-{uuidlib.uuid5(_NS, f'{hostname}/{index}')}"


class _Gpu:
    def __init__(self, index: int, hostname: str, model: GpuModel, sim: SimulateConfig, serving: bool, now: float):
        self.index, self.model = index, model
        self.uuid = gpu_uuid(hostname, index)
        self.pci = f"00000000:{PCI_BUSES[index % 8] + 0x100 * (index // 8) & 0xFF:02X}:00.0"
        self.rng = random.Random(stable(sim.seed, hostname, index))
        self.factor = gpu_factor(sim.seed, hostname, index)
        self.serving = serving if sim.serving_gpus is None else index in sim.serving_gpus
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
        self._xid_rng = random.Random(stable(sim.seed, hostname, "xid"))

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
        expected = gpu_util(self.load(now), g.factor, g.serving)  # agents.loadmodel; sampling noise on top
        g.util = max(0.0, min(100.0, expected + g.rng.gauss(0, 3.0))) if expected else 0.0
        target_w = power_w(m.idle_w, m.power_limit_w, g.util)
        g.power = max(m.idle_w * 0.9, min(m.power_limit_w, target_w + g.rng.gauss(0, 6.0)))
        g.energy_mj += int(g.power * dt * 1000.0)
        g.temp += (temperature_c(g.util) - g.temp) * (1.0 - math.exp(-dt / 60.0))
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
        on = simulated_cc_on(seed=self.sim.seed, hostname=self.hostname, gpu_model=self.sim.gpu_model,
                             mig=self.sim.mig)
        return SimpleNamespace(environment=2 if on else 0, ccFeature=int(on), devToolsMode=0)

    def nvmlSystemGetConfComputeGpusReadyState(self):
        return self._pynvml.NVML_CC_ACCEPTING_CLIENT_REQUESTS_TRUE  # attested and set ready, as in production

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
            used = mig_memory_used_mib(h.mem_mib, h.parent.serving)
            return SimpleNamespace(total=h.mem_mib * MIB, used=used * MIB, free=(h.mem_mib - used) * MIB)
        g = self._gpu(h)
        total = self.model.memory_mib
        used = memory_used_mib(total, g.serving)
        if g.mig:
            used = sum(mig_memory_used_mib(m.mem_mib, g.serving) for m in g.mig)
        return SimpleNamespace(total=total * MIB, used=used * MIB, free=(total - used) * MIB)

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
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

    # ---- what `tokenmill-agent selftest` asks beyond the collector (healthy, as the captures)
    def nvmlDeviceGetPowerManagementDefaultLimit(self, h):
        self._gpu(h)
        return int(self.model.power_limit_w * 1000)

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h):
        # Ampere and Hopper remap rows instead of retiring pages: nvidia-smi -q prints
        # "Pending Page Blacklist: N/A"
        raise self._err(self._pynvml.NVML_ERROR_NOT_SUPPORTED)


class SelftestSimNvml(SimNvml):
    """SimNvml whose GPUs show the faults ``[simulate] selftest_fail`` names, through the NVML calls
    a real faulty GPU answers differently, so ``tokenmill-agent selftest`` runs its real checks."""

    XID_FELL_OFF_THE_BUS = 79
    CAPPED_SHARE = 0.8

    def __init__(self, sim: SimulateConfig, hostname: str, serving: bool = False, clock=time.time):
        super().__init__(sim, hostname, serving=serving, clock=clock)
        self._faults = {g.index: {check for index, check in sim.selftest_fail
                                  if index in (None, g.index)}
                        for g in self._gpus}

    def _faulty(self, h, check: str) -> bool:
        return isinstance(h, _Gpu) and check in self._faults.get(h.index, ())

    def nvmlDeviceGetHandleByIndex(self, index):
        if "answers" in self._faults.get(index, ()):
            raise self._err(self._pynvml.NVML_ERROR_GPU_IS_LOST)  # counted, but fell off the bus
        return super().nvmlDeviceGetHandleByIndex(index)

    def nvmlDeviceRegisterEvents(self, h, types, event_set):
        if self._faulty(h, "xid"):  # the XID arrives while selftest waits on the event set
            self._events.append(SimpleNamespace(
                device=h, eventType=0x8, eventData=self.XID_FELL_OFF_THE_BUS, gpuInstanceId=0xFFFFFFFF,
                computeInstanceId=0xFFFFFFFF, timeStamp=int(self.clock() * 1e6)))
        return super().nvmlDeviceRegisterEvents(h, types, event_set)

    def nvmlDeviceGetRemappedRows(self, h):
        if self._faulty(h, "memory"):
            return (0, 1, 0, 1)  # an uncorrectable error whose row could not be remapped
        return super().nvmlDeviceGetRemappedRows(h)

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        if self._faulty(h, "power"):
            return int(self.model.power_limit_w * self.CAPPED_SHARE * 1000)
        return super().nvmlDeviceGetEnforcedPowerLimit(h)

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        if self._faulty(h, "clocks"):
            return super().nvmlDeviceGetCurrentClocksEventReasons(h) | 0x8  # HW slowdown
        return super().nvmlDeviceGetCurrentClocksEventReasons(h)


# ------------------------------------------------------------------------------------------------ engines

VERSIONS = {"vllm": "0.10.1", "tgi": "3.3.4", "triton": "2.59.0", "sglang": "0.4.10"}
DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


class SimEngines:
    """Per target: cumulative counters that grow with the load curve. Their state is kept in the agent's state
    table (keys ``sim|...``) and committed with the batch, so a restart continues the same counters."""

    def __init__(self, targets: tuple[Target, ...], sim: SimulateConfig, hostname: str, state: dict[str, Any]):
        self.sim, self.hostname = sim, hostname
        self.state = {k: v for k, v in state.items() if k.startswith("sim|")}
        self.targets = targets
        self.load = LoadCurve(sim, hostname)
        self.capacity = dict(sim.capacity)

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
        rng = random.Random(stable(self.sim.seed, self.hostname, target.url, int(now * 10)))
        prev = self.state.get(key)
        if prev is None:  # an engine that has been running for a while before the agent saw it
            gen0 = random.Random(stable(self.sim.seed, self.hostname, target.url)).randrange(10**6, 10**8)
            prev = {"p": gen0 * 3, "g": gen0, "ok": gen0 // GEN_TOKENS_PER_REQUEST, "fail": gen0 // 40000}
        last_t = self.state.get(f"sim|t|{key}", now - 1.0)
        dt = max(0.0, min(now - last_t, 60.0))  # a stopped agent's simulated engines idle
        load = self.load(now)
        profile = endpoint_profile(self.sim.seed, self.hostname, target.url, self.capacity.get(target.url))
        gen = max(0, round(profile.generation_tps(load) * dt * (1.0 + rng.gauss(0, 0.05))))
        prompt = max(0, round(gen * profile.prompt_ratio * (1.0 + rng.gauss(0, 0.05))))
        reqs = gen // GEN_TOKENS_PER_REQUEST
        failed = sum(1 for _ in range(min(reqs, 2000)) if rng.random() < FAILED_SHARE)
        ttft_med, itl_med = profile.ttft_median(load), profile.itl_median(load)
        new = dict(prev)
        new.update(p=prev["p"] + prompt, g=prev["g"] + gen, ok=prev["ok"] + reqs - failed, fail=prev["fail"] + failed)
        medians = profile.medians(load, phases=target.engine in PHASE_ENGINES)
        for name, (le, median) in medians.items():
            counts, total = lognormal_hist(le, reqs, median, SIGMA[name])
            before = prev.get(name) or [[0] * (len(le) + 1), 0.0]
            new[name] = [[a + b for a, b in zip(before[0], counts, strict=True)], before[1] + total]
        billable = target.url not in self.sim.unbillable
        tokens = {"prompt_tokens": {"sim_prompt": float(new["p"])},
                  "generation_tokens": {"sim_gen": float(new["g"])}} if billable else {}
        m = ModelReading(
            counters={**tokens, "requests_ok": {"sim_ok": float(new["ok"])},
                      "requests_failed": {"sim_fail": float(new["fail"])}},
            hists={name: {f"sim_{name}": Hist(le=le, counts=[float(c) for c in new[name][0]], sum=new[name][1])}
                   for name, (le, _median) in medians.items()},
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
