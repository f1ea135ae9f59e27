"""NVML collector (nvidia-ml-py's ``pynvml``): 1 s samples summarised per GPU per interval, plus health events.

The NVML module is injected (``nvml=``) so that tests, the simulator and the benchmark can hand in an object with
pynvml's function names, constants and error classes. A field a GPU does not support is None, never a crash; a GPU
that reports GPU_IS_LOST yields one ``gpu_lost`` event and is skipped from then on.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# nvmlClocksEventReason* bits (stable ABI; same values as pynvml's nvmlClocksThrottleReason* constants)
THROTTLE_REASONS = (
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)
THERMAL = frozenset({"sw_thermal_slowdown", "hw_thermal_slowdown"})
POWER = frozenset({"sw_power_cap", "hw_power_brake_slowdown"})
XID_EVENT = 0x8  # nvmlEventTypeXidCriticalError
_PROFILE = re.compile(r"(\d+g\.\d+gb(?:\+[a-z]+)?)")
MIB = 1024 * 1024


def decode_throttle(mask: int | None) -> list[str]:
    if not mask:
        return []
    return [name for bit, name in THROTTLE_REASONS if mask & bit]


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def load_nvml_module(name: str | None = None):
    """pynvml, or what TOKENMILL_AGENT_NVML_MODULE names (test/benchmark hook): ``module`` or ``module:attr``
    (a class there is instantiated without arguments)."""
    spec = name or os.environ.get("TOKENMILL_AGENT_NVML_MODULE") or "pynvml"
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    if not attr:
        return module
    obj = getattr(module, attr)
    return obj() if isinstance(obj, type) else obj


class _GpuLost(Exception):
    pass


@dataclass
class _Gpu:
    index: int
    handle: Any
    uuid: str
    name: str
    pci_bus_id: str | None
    unsupported: set[str] = field(default_factory=set)
    logged: set[str] = field(default_factory=set)
    lost: bool = False
    # interval accumulators
    samples: int = 0
    util: list[float] = field(default_factory=list)
    mem_util: list[float] = field(default_factory=list)
    power: list[float] = field(default_factory=list)
    temp_max: float | None = None
    reasons: int = 0
    energy_integrated_mj: float = 0.0
    last_sample_t: float | None = None
    energy_counter: int | None = None
    # previous-interval values for event edges
    prev_reasons: frozenset[str] = frozenset()
    prev_ecc: dict[str, int] = field(default_factory=dict)
    prev_remap: tuple[bool, bool] = (False, False)

    def reset(self) -> None:
        self.samples = 0
        self.util, self.mem_util, self.power = [], [], []
        self.temp_max = None
        self.reasons = 0
        self.energy_integrated_mj = 0.0


class NvmlCollector:
    def __init__(self, nvml: Any = None):
        self.nv = nvml if nvml is not None else load_nvml_module()
        self.gpus: list[_Gpu] = []
        self.events: list[dict[str, Any]] = []
        self.host: dict[str, str | None] = {}
        self.cc_mode: str | None = None
        self._event_set = None
        self._started = False
        err = self.nv.NVMLError
        self._E = err
        self._E_lost = getattr(self.nv, "NVMLError_GpuIsLost", ())
        self._E_timeout = getattr(self.nv, "NVMLError_Timeout", ())
        self._E_unsupported = tuple(
            c for c in (getattr(self.nv, "NVMLError_NotSupported", None),
                        getattr(self.nv, "NVMLError_FunctionNotFound", None))
            if c is not None
        )

    # ------------------------------------------------------------------ lifecycle
    def start(self, now: float | None = None) -> None:
        if self._started:
            return
        now = time.time() if now is None else now
        self.nv.nvmlInit()
        self._started = True
        self.host = {
            "driver_version": self._sys("nvmlSystemGetDriverVersion"),
            "cuda_driver_version": self._cuda_version(),
            "nvml_version": self._sys("nvmlSystemGetNVMLVersion"),
        }
        self.cc_mode = self._cc_mode()
        try:
            count = int(self.nv.nvmlDeviceGetCount())
        except self._E as exc:
            log.error("NVML: cannot count GPUs: %s", exc)
            count = 0
        try:
            self._event_set = self.nv.nvmlEventSetCreate()
        except self._E as exc:
            log.warning("NVML: no event set, XID events unavailable: %s", exc)
            self._event_set = None
        for index in range(count):
            try:
                handle = self.nv.nvmlDeviceGetHandleByIndex(index)
                gpu = _Gpu(index=index, handle=handle, uuid=_text(self.nv.nvmlDeviceGetUUID(handle)),
                           name=_text(self.nv.nvmlDeviceGetName(handle))[:128], pci_bus_id=None)
            except self._E as exc:
                kind = "gpu_lost" if isinstance(exc, self._E_lost or ()) else None
                log.error("NVML: GPU %d unusable: %s", index, exc)
                if kind:
                    self.events.append({"ts": now, "gpu_uuid": None, "kind": "gpu_lost", "code": None,
                                        "detail": f"GPU index {index}: {exc}"[:500]})
                continue
            try:
                gpu.pci_bus_id = _text(self.nv.nvmlDeviceGetPciInfo(handle).busId)[:32]
            except self._E:
                gpu.pci_bus_id = None
            if self._event_set is not None:
                try:
                    xid_type = getattr(self.nv, "nvmlEventTypeXidCriticalError", XID_EVENT)
                    self.nv.nvmlDeviceRegisterEvents(handle, xid_type, self._event_set)
                except self._E as exc:
                    log.info("NVML: GPU %d: XID events not available: %s", index, exc)
            try:
                gpu.energy_counter = self._call(gpu, "energy", self.nv.nvmlDeviceGetTotalEnergyConsumption, handle)
                gpu.prev_ecc = {k: v for k, v in self._ecc(gpu).items() if v is not None}
                remap = self._remapped(gpu)
                gpu.prev_remap = (bool(remap[2]), bool(remap[3])) if remap else (False, False)
            except _GpuLost as exc:
                self._lost(gpu, now, str(exc))
            gpu.last_sample_t = now
            self.gpus.append(gpu)

    def shutdown(self) -> None:
        if not self._started:
            return
        try:
            if self._event_set is not None:
                self.nv.nvmlEventSetFree(self._event_set)
            self.nv.nvmlShutdown()
        except self._E:
            pass
        self._started = False

    # ------------------------------------------------------------------ helpers
    def _sys(self, fn: str) -> str | None:
        try:
            return _text(getattr(self.nv, fn)())[:32]
        except (self._E, AttributeError):
            return None

    def _cuda_version(self) -> str | None:
        try:
            v = int(self.nv.nvmlSystemGetCudaDriverVersion())
        except (self._E, AttributeError):
            return None
        return f"{v // 1000}.{(v % 1000) // 10}"

    def _cc_mode(self) -> str | None:
        """The confidential-computing mode: the system's (nvmlSystemGetConfComputeState: it applies to every GPU of
        the host; NVML has no per-device mode), then, while CC is on, the GPUs' own state where the driver reports
        it (nvmlSystemGetConfComputeGpusReadyState: a CC GPU refuses work until attested and set ready). None where
        the driver has no CC support."""
        try:
            state = self.nv.nvmlSystemGetConfComputeState()
        except (self._E, AttributeError):
            return None
        if getattr(state, "devToolsMode", 0):
            mode = "devtools"
        elif getattr(state, "ccFeature", 0):
            mode = "on"
        else:
            return "off"
        try:
            ready = self.nv.nvmlSystemGetConfComputeGpusReadyState()
        except (self._E, AttributeError):
            return mode
        return mode if ready else f"{mode}, GPUs not ready"

    def _call(self, gpu: _Gpu, name: str, fn, *args):
        if name in gpu.unsupported:
            return None
        try:
            return fn(*args)
        except self._E as exc:
            if self._E_lost and isinstance(exc, self._E_lost):
                raise _GpuLost(f"{name}: {exc}") from exc
            if self._E_unsupported and isinstance(exc, self._E_unsupported):
                gpu.unsupported.add(name)
                log.debug("GPU %s: %s not supported", gpu.index, name)
            elif name not in gpu.logged:
                gpu.logged.add(name)
                log.warning("GPU %s: %s failed: %s", gpu.index, name, exc)
            return None

    def _lost(self, gpu: _Gpu, now: float, detail: str) -> None:
        if gpu.lost:
            return
        gpu.lost = True
        log.error("GPU %d (%s) is lost: %s; skipped from now on", gpu.index, gpu.uuid, detail)
        self.events.append({"ts": now, "gpu_uuid": gpu.uuid, "kind": "gpu_lost", "code": None,
                            "detail": f"GPU {gpu.index} {gpu.pci_bus_id or ''}: {detail}"[:500]})

    def _ecc(self, gpu: _Gpu) -> dict[str, int | None]:
        nv = self.nv
        vol = getattr(nv, "NVML_VOLATILE_ECC", 0)
        return {
            "corrected": self._call(gpu, "ecc", nv.nvmlDeviceGetTotalEccErrors, gpu.handle,
                                    getattr(nv, "NVML_MEMORY_ERROR_TYPE_CORRECTED", 0), vol),
            "uncorrected": self._call(gpu, "ecc", nv.nvmlDeviceGetTotalEccErrors, gpu.handle,
                                      getattr(nv, "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1), vol),
        }

    def _remapped(self, gpu: _Gpu):
        return self._call(gpu, "remapped_rows", self.nv.nvmlDeviceGetRemappedRows, gpu.handle)

    # ------------------------------------------------------------------ sampling
    def sample(self, now: float | None = None) -> None:
        """One 1 s sample of every GPU (cheap calls only) and a non-blocking poll of the XID event set."""
        now = time.time() if now is None else now
        nv = self.nv
        for gpu in self.gpus:
            if gpu.lost:
                continue
            try:
                util = self._call(gpu, "utilization", nv.nvmlDeviceGetUtilizationRates, gpu.handle)
                power_mw = self._call(gpu, "power", nv.nvmlDeviceGetPowerUsage, gpu.handle)
                temp = self._call(gpu, "temperature", nv.nvmlDeviceGetTemperature, gpu.handle,
                                  getattr(nv, "NVML_TEMPERATURE_GPU", 0))
                reasons = self._call(gpu, "throttle", self._reasons_fn(), gpu.handle)
            except _GpuLost as exc:
                self._lost(gpu, now, str(exc))
                continue
            gpu.samples += 1
            if util is not None:
                gpu.util.append(float(util.gpu))
                gpu.mem_util.append(float(util.memory))
            dt = max(0.0, now - gpu.last_sample_t) if gpu.last_sample_t is not None else 0.0
            gpu.last_sample_t = now
            if power_mw is not None:
                watts = power_mw / 1000.0
                gpu.power.append(watts)
                gpu.energy_integrated_mj += watts * dt * 1000.0
            if temp is not None:
                gpu.temp_max = float(temp) if gpu.temp_max is None else max(gpu.temp_max, float(temp))
            if reasons:
                gpu.reasons |= int(reasons)
        self._poll_events(now)

    def _reasons_fn(self):
        fn = getattr(self.nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
        return fn or self.nv.nvmlDeviceGetCurrentClocksThrottleReasons

    def _poll_events(self, now: float) -> None:
        if self._event_set is None:
            return
        wait = getattr(self.nv, "nvmlEventSetWait_v2", None) or self.nv.nvmlEventSetWait
        for _ in range(256):  # bounded: never spin on a flood
            try:
                data = wait(self._event_set, 0)
            except self._E as exc:
                if not (self._E_timeout and isinstance(exc, self._E_timeout)):
                    log.debug("NVML event wait: %s", exc)
                return
            uuid = None
            with contextlib.suppress(self._E, AttributeError):
                uuid = _text(self.nv.nvmlDeviceGetUUID(data.device))
            if int(getattr(data, "eventType", XID_EVENT)) & XID_EVENT:
                code = int(data.eventData)
                log.warning("XID %d on %s", code, uuid)
                self.events.append({"ts": now, "gpu_uuid": uuid, "kind": "xid",
                                    "code": code if 0 <= code <= 1_000_000 else None, "detail": f"XID {code}"})

    # ------------------------------------------------------------------ interval summary
    def finish_interval(self, now: float | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Summarise the interval per GPU; returns (GpuIn dicts, HealthEventIn dicts) and resets accumulators."""
        now = time.time() if now is None else now
        self.cc_mode = self._cc_mode()  # re-read: the GPUs become ready once attested, without a restart
        out = []
        for gpu in self.gpus:
            if gpu.lost:
                continue
            try:
                rec = self._summary(gpu, now)
            except _GpuLost as exc:
                self._lost(gpu, now, str(exc))
                continue
            out.append(rec)
            gpu.reset()
        events, self.events = self.events, []
        return out, events

    def _summary(self, gpu: _Gpu, now: float) -> dict[str, Any]:
        nv, h = self.nv, gpu.handle
        mem = self._call(gpu, "memory", nv.nvmlDeviceGetMemoryInfo, h)
        limit = self._call(gpu, "power_limit", nv.nvmlDeviceGetEnforcedPowerLimit, h)
        energy = self._call(gpu, "energy", nv.nvmlDeviceGetTotalEnergyConsumption, h)
        sm = self._call(gpu, "clock_sm", nv.nvmlDeviceGetClockInfo, h, getattr(nv, "NVML_CLOCK_SM", 1))
        mclk = self._call(gpu, "clock_mem", nv.nvmlDeviceGetClockInfo, h, getattr(nv, "NVML_CLOCK_MEM", 2))
        ecc = self._ecc(gpu)
        remap = self._remapped(gpu)
        retired = None
        if remap is None:
            pages = [self._call(gpu, "retired_pages", nv.nvmlDeviceGetRetiredPages, h, cause) for cause in (0, 1)]
            retired = sum(len(p) for p in pages if p is not None) if any(p is not None for p in pages) else None
        mig_mode = None
        mig = self._call(gpu, "mig_mode", nv.nvmlDeviceGetMigMode, h)
        if mig is not None:
            mig_mode = int(mig[0]) == getattr(nv, "NVML_DEVICE_MIG_ENABLE", 1)
        instances = self._mig_instances(gpu) if mig_mode else []

        if energy is not None and gpu.energy_counter is not None and energy >= gpu.energy_counter:
            energy_mj = int(energy - gpu.energy_counter)
        elif gpu.power:
            energy_mj = round(gpu.energy_integrated_mj)  # counter unsupported or reset: integrate power
        else:
            energy_mj = None
        gpu.energy_counter = energy

        names = decode_throttle(gpu.reasons)
        self._edge_events(gpu, now, frozenset(names), ecc, remap)

        used = total = None
        if mem is not None:
            total = int(mem.total // MIB)
            used = min(int(mem.used // MIB), total)
        util_mean = round(sum(gpu.util) / len(gpu.util), 2) if gpu.util else None
        return {
            "uuid": gpu.uuid,
            "index": gpu.index,
            "name": gpu.name,
            "pci_bus_id": gpu.pci_bus_id,
            "samples": min(gpu.samples, 3600),
            "util_mean": _pct(util_mean),
            "util_max": _pct(max(gpu.util)) if gpu.util else None,
            "mem_util_mean": _pct(round(sum(gpu.mem_util) / len(gpu.mem_util), 2)) if gpu.mem_util else None,
            "memory_used_mib": used,
            "memory_total_mib": total,
            "power_mean_w": round(min(5000.0, sum(gpu.power) / len(gpu.power)), 2) if gpu.power else None,
            "power_limit_w": round(min(5000.0, limit / 1000.0), 2) if limit is not None else None,
            "energy_mj": max(0, energy_mj) if energy_mj is not None else None,
            "temp_max_c": max(-40.0, min(150.0, gpu.temp_max)) if gpu.temp_max is not None else None,
            "sm_clock_mhz": int(sm) if sm is not None else None,
            "mem_clock_mhz": int(mclk) if mclk is not None else None,
            "throttle_reasons": names[:16],
            "ecc_corrected_total": ecc["corrected"],
            "ecc_uncorrected_total": ecc["uncorrected"],
            "retired_pages": min(retired, 100_000) if retired is not None else None,
            "remapped_rows_pending": bool(remap[2]) if remap is not None else None,
            "remapped_rows_failure": bool(remap[3]) if remap is not None else None,
            "mig_mode": mig_mode,
            "mig_instances": instances,
            "cc_mode": self.cc_mode,
        }

    def _edge_events(self, gpu: _Gpu, now: float, names: frozenset[str], ecc: dict, remap) -> None:
        def event(kind: str, detail: str, code: int | None = None) -> None:
            self.events.append({"ts": now, "gpu_uuid": gpu.uuid, "kind": kind, "code": code, "detail": detail[:500]})

        for kind, group in (("thermal_throttle", THERMAL), ("power_throttle", POWER)):
            if names & group and not gpu.prev_reasons & group:  # the reason appeared this interval
                event(kind, ", ".join(sorted(names & group)))
        gpu.prev_reasons = names
        for kind, key in (("ecc_uncorrected", "uncorrected"), ("ecc_corrected", "corrected")):
            value, prev = ecc.get(key), gpu.prev_ecc.get(key)
            if value is not None:
                if prev is not None and value > prev:
                    event(kind, f"volatile {key} ECC errors {prev} -> {value}", code=min(value - prev, 1_000_000))
                gpu.prev_ecc[key] = value
        if remap is not None:
            pending, failure = bool(remap[2]), bool(remap[3])
            if (pending and not gpu.prev_remap[0]) or (failure and not gpu.prev_remap[1]):
                event("remapped_rows", f"row remapping pending={pending} failure={failure} "
                                       f"(correctable={remap[0]}, uncorrectable={remap[1]})")
            gpu.prev_remap = (pending, failure)

    def _mig_instances(self, gpu: _Gpu) -> list[dict[str, Any]]:
        nv = self.nv
        count = self._call(gpu, "mig_count", nv.nvmlDeviceGetMaxMigDeviceCount, gpu.handle) or 0
        out: dict[int, dict[str, Any]] = {}
        for i in range(int(count)):
            try:
                mh = nv.nvmlDeviceGetMigDeviceHandleByIndex(gpu.handle, i)
            except self._E as exc:
                if self._E_lost and isinstance(exc, self._E_lost):
                    raise _GpuLost(str(exc)) from exc
                continue  # empty slot (NotFound)
            gi = self._call(gpu, "mig_gi", nv.nvmlDeviceGetGpuInstanceId, mh)
            if gi is None or gi in out or not 0 <= int(gi) <= 64:
                continue  # one record per GPU instance (several compute instances share one)
            name = self._call(gpu, "mig_name", nv.nvmlDeviceGetName, mh)
            match = _PROFILE.search(_text(name)) if name is not None else None
            mem = self._call(gpu, "mig_memory", nv.nvmlDeviceGetMemoryInfo, mh)
            if match:
                profile = match.group(1)
            else:
                attrs = self._call(gpu, "mig_attributes", nv.nvmlDeviceGetAttributes, mh)
                whole = self._call(gpu, "memory", nv.nvmlDeviceGetMemoryInfo, gpu.handle)
                if attrs is None or whole is None or not whole.total:
                    continue
                profile = mig_profile_name(int(attrs.gpuInstanceSliceCount), int(attrs.memorySizeMB), int(whole.total))
            uuid = self._call(gpu, "mig_uuid", nv.nvmlDeviceGetUUID, mh)
            rec = {"uuid": _text(uuid)[:80] if uuid is not None else None, "gi_id": int(gi), "profile": profile,
                   "memory_total_mib": None, "memory_used_mib": None}
            if mem is not None:
                rec["memory_total_mib"] = int(mem.total // MIB)
                rec["memory_used_mib"] = min(int(mem.used // MIB), rec["memory_total_mib"])
            out[int(gi)] = rec
            if len(out) >= 7:
                break
        return [out[k] for k in sorted(out)]


def mig_profile_name(slices: int, memory_mb: int, device_memory_bytes: int) -> str:
    """NVIDIA's name of a MIG GPU-instance profile (`3g.71gb`), built as NVIDIA's own tools build it when the
    device name lacks it (go-nvlib, getMigMemorySizeGB): the instance's share of the device's memory rounded up to
    eighths, times the device's memory in whole GiB rounded up, rounded half away from zero. In integers, so a
    share of exactly k/8 stays k/8 (Python's round() would take 70.5 to 70: H200's 3g.71gb is not 3g.70gb)."""
    eighths = -(-(memory_mb * MIB * 8) // device_memory_bytes)
    device_gb = -(-device_memory_bytes // (1024 * MIB))
    return f"{slices}g.{(eighths * device_gb * 2 + 8) // 16}gb"


def _pct(value: float | None) -> float | None:
    return None if value is None else max(0.0, min(100.0, float(value)))
