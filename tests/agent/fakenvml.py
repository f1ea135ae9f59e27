"""A fake NVML with pynvml's own function names, constants and NVMLError subclasses (no GPU here)."""

from __future__ import annotations

from types import SimpleNamespace

import pynvml

MIB = 1024 * 1024


def err(cls):
    return cls.__new__(cls, {
        pynvml.NVMLError_NotSupported: pynvml.NVML_ERROR_NOT_SUPPORTED,
        pynvml.NVMLError_GpuIsLost: pynvml.NVML_ERROR_GPU_IS_LOST,
        pynvml.NVMLError_Timeout: pynvml.NVML_ERROR_TIMEOUT,
        pynvml.NVMLError_NotFound: pynvml.NVML_ERROR_NOT_FOUND,
        pynvml.NVMLError_Unknown: pynvml.NVML_ERROR_UNKNOWN,
    }[cls])


class FakeGpu:
    def __init__(self, index, **kw):
        self.index = index
        self.uuid = kw.get("uuid", f"GPU-{index:08x}-1111-2222-3333-444455556666")
        self.name = kw.get("name", "NVIDIA H100 80GB HBM3")
        self.util = kw.get("util", [50, 70])  # cycled per sample
        self.power_mw = kw.get("power_mw", 350_000)
        self.temp = kw.get("temp", [55, 61])
        self.energy_mj = kw.get("energy_mj", 10_000_000)
        self.energy_step = kw.get("energy_step", 0)
        self.mem_total = kw.get("mem_total", 81559 * MIB)
        self.mem_used = kw.get("mem_used", 20000 * MIB)
        self.reasons = kw.get("reasons", 0)
        self.ecc = [0, 0]
        self.remap = (0, 0, 0, 0)
        self.unsupported = set(kw.get("unsupported", ()))
        self.lost = False
        self.mig = kw.get("mig", [])  # list of (gi, profile, mem_mib)
        self.mig_names = kw.get("mig_names", True)  # False: MIG device names without the profile (older drivers)
        self.calls = 0
        # what `tokenmill-agent selftest` reads beyond the collector (SelftestNvml)
        self.enforced_limit_mw = kw.get("enforced_limit_mw", 700_000)
        self.default_limit_mw = kw.get("default_limit_mw", 700_000)
        self.retired_pending = kw.get("retired_pending", 0)


class FakeNvml:
    """Module-like object. Attribute names are pynvml's; errors are pynvml's classes."""

    def __init__(self, gpus):
        for name in dir(pynvml):
            if name.startswith(("NVMLError", "NVML_", "nvmlEventType")):
                setattr(self, name, getattr(pynvml, name))
        self.gpus = gpus
        self.events = []
        self.inits = 0

    def _g(self, h) -> FakeGpu:
        if isinstance(h, FakeGpu):
            h.calls += 1
            if h.lost:
                raise err(pynvml.NVMLError_GpuIsLost)
            return h
        raise err(pynvml.NVMLError_Unknown)

    def _check(self, h, field):
        g = self._g(h)
        if field in g.unsupported:
            raise err(pynvml.NVMLError_NotSupported)
        return g

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        pass

    def nvmlSystemGetDriverVersion(self):
        return "590.48.01"

    def nvmlSystemGetNVMLVersion(self):
        return "13.590.48.01"

    def nvmlSystemGetCudaDriverVersion(self):
        return 13010

    def nvmlSystemGetConfComputeState(self):
        return SimpleNamespace(environment=2, ccFeature=1, devToolsMode=0)

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.gpus[i]

    def nvmlDeviceGetUUID(self, h):
        return h.uuid

    def nvmlDeviceGetName(self, h):
        if isinstance(h, SimpleNamespace):
            return h.name
        return self._g(h).name

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=f"00000000:{0x18 + h.index:02X}:00.0".encode())  # bytes, as old pynvml

    def nvmlDeviceGetUtilizationRates(self, h):
        g = self._check(h, "util")
        v = g.util[g.calls % len(g.util)]
        return SimpleNamespace(gpu=v, memory=v // 2)

    def nvmlDeviceGetPowerUsage(self, h):
        return self._check(h, "power").power_mw

    def nvmlDeviceGetTemperature(self, h, sensor):
        g = self._check(h, "temp")
        return g.temp[g.calls % len(g.temp)]

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self._check(h, "reasons").reasons

    def nvmlDeviceGetMemoryInfo(self, h):
        if isinstance(h, SimpleNamespace):
            return SimpleNamespace(total=h.mem * MIB, used=h.mem * MIB // 4)
        g = self._check(h, "memory")
        return SimpleNamespace(total=g.mem_total, used=g.mem_used)

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 700_000

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        g = self._check(h, "energy")
        g.energy_mj += g.energy_step
        return g.energy_mj

    def nvmlDeviceGetClockInfo(self, h, t):
        self._check(h, "clocks")
        return 1980 if t == pynvml.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetTotalEccErrors(self, h, error_type, counter):
        g = self._check(h, "ecc")
        return g.ecc[1 if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED else 0]

    def nvmlDeviceGetRemappedRows(self, h):
        return self._check(h, "remap").remap

    def nvmlDeviceGetRetiredPages(self, h, cause):
        self._check(h, "retired")
        return [0x1000] * (cause + 1)

    def nvmlDeviceGetMigMode(self, h):
        g = self._check(h, "mig")
        return [1, 1] if g.mig else [0, 0]

    def nvmlDeviceGetMaxMigDeviceCount(self, h):
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h, i):
        g = self._g(h)
        if i >= len(g.mig):
            raise err(pynvml.NVMLError_NotFound)
        gi, profile, mem = g.mig[i]
        name = f"{g.name} MIG {profile}" if g.mig_names else g.name
        return SimpleNamespace(gi=gi, name=name, mem=mem, uuid=f"MIG-{g.index}-{gi}-{i}", slices=int(profile[0]))

    def nvmlDeviceGetAttributes(self, h):
        return SimpleNamespace(gpuInstanceSliceCount=h.slices, memorySizeMB=h.mem)

    def nvmlDeviceGetGpuInstanceId(self, h):
        return h.gi

    def nvmlEventSetCreate(self):
        return "event-set"

    def nvmlDeviceRegisterEvents(self, h, types, es):
        assert types & pynvml.nvmlEventTypeXidCriticalError

    def nvmlEventSetWait_v2(self, es, timeout_ms):
        assert timeout_ms == 0  # never blocks
        if not self.events:
            raise err(pynvml.NVMLError_Timeout)
        return self.events.pop(0)

    def nvmlEventSetFree(self, es):
        pass


class SelftestNvml(FakeNvml):
    """FakeNvml plus what ``tokenmill-agent selftest`` asks: power limits, pending retired pages and
    an event wait that takes a timeout (recorded in ``waits``; nothing sleeps). "events" in a GPU's
    unsupported set makes its XID registration NotSupported; ``init_error`` makes nvmlInit raise."""

    def __init__(self, gpus, init_error=None):
        super().__init__(gpus)
        self.init_error = init_error
        self.waits = []
        self.shutdowns = 0

    def nvmlInit(self):
        if self.init_error is not None:
            raise self.init_error
        super().nvmlInit()

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceRegisterEvents(self, h, types, es):
        self._check(h, "events")
        super().nvmlDeviceRegisterEvents(h, types, es)

    def nvmlEventSetWait_v2(self, es, timeout_ms):
        self.waits.append(timeout_ms)
        if not self.events:
            raise err(pynvml.NVMLError_Timeout)
        return self.events.pop(0)

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return self._check(h, "power_limit").enforced_limit_mw

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h):
        return self._check(h, "power_limit").default_limit_mw

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h):
        return self._check(h, "retired").retired_pending


class ZeroCostNvml(FakeNvml):
    """For the benchmark: 8 H100s whose readings cost nothing to produce."""

    def __init__(self):
        super().__init__([FakeGpu(i) for i in range(8)])


def batch_of(gpus, events):
    """A batch around a collector's GpuIn and HealthEventIn dicts, to validate against the contract."""
    return {"schema_version": 1, "seq": 1, "interval_start": 1000.0, "interval_end": 1010.0,
            "host": {"hostname": "n1"}, "gpus": gpus, "events": events}


def run_interval(c, samples=3, t0=1000.0):
    """`samples` one-second samples from t0, then the interval's summary."""
    for i in range(samples):
        c.sample(t0 + i + 1)
    return c.finish_interval(t0 + samples)
