"""``tokenmill-agent selftest``: the NVML acceptance check that a node's burn-in runs over SSH
when DCGM (``dcgmi``) is not installed.

Per GPU: ``answers`` (the GPU opens and reads back name, UUID, memory, temperature and power),
``xid`` (no critical XID arrives on an NVML event set within ``--xid-wait-s``), ``memory`` (no
pending retired pages, no pending or failed row remap, no volatile uncorrected ECC error), ``power``
(the enforced power limit is not below the default) and ``clocks`` (no hardware slowdown holds the
clocks down). Each check passes, fails, warns or is skipped (the GPU or driver lacks the query).
No credential, no portal, nothing written.

A simulated node (``[simulate]``) runs the same checks against ``SelftestSimNvml``, whose GPUs show
the faults that ``[simulate] selftest_fail`` names.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agents.config import SELFTEST_CHECKS, Config
from agents.nvml import XID_EVENT, decode_throttle, load_nvml_module

EXIT_OK, EXIT_FAILED, EXIT_NO_NVML = 0, 1, 2
MAX_XID_WAIT_S = 300.0
MAX_EVENTS = 256  # bounded: a flood of XIDs must not keep the check spinning
MIB = 1024 * 1024
HW_SLOWDOWN = ("hw_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown")


@dataclass
class Check:
    name: str
    result: str  # pass | fail | warn | skip
    detail: str


@dataclass
class GpuResult:
    index: int
    handle: Any = None
    uuid: str | None = None
    name: str | None = None
    checks: dict[str, Check] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.result != "fail" for c in self.checks.values())

    def set(self, name: str, result: str, detail: str) -> None:
        self.checks[name] = Check(name, result, detail)

    def as_dict(self) -> dict[str, Any]:
        checks = [self.checks[n] for n in SELFTEST_CHECKS if n in self.checks]
        return {"index": self.index, "uuid": self.uuid, "name": self.name, "ok": self.ok,
                "checks": [{"name": c.name, "result": c.result, "detail": c.detail}
                           for c in checks]}


class _Unsupported(Exception):
    """The GPU, the driver or this nvidia-ml-py lacks the query: that check (or part) is skipped."""


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _watts(milliwatts: int) -> str:
    return f"{round(milliwatts / 1000, 1):g}"


def _xid_text(code: int) -> str:
    # By number only: the portal names XIDs from NVIDIA's catalog (portal.health.catalog), in one place.
    return f"XID {code}"


class SelfTest:
    """The checks over an initialised NVML module (pynvml, or one with its names and errors)."""

    def __init__(self, nv: Any, *, xid_wait_s: float, clock: Callable[[], float] = time.monotonic):
        self.nv, self.xid_wait_s, self.clock = nv, xid_wait_s, clock
        self._E = nv.NVMLError
        self._E_timeout = getattr(nv, "NVMLError_Timeout", ())
        self._E_unsupported = tuple(
            c for c in (getattr(nv, "NVMLError_NotSupported", None),
                        getattr(nv, "NVMLError_FunctionNotFound", None))
            if c is not None
        )
        self.host_problems: list[str] = []

    def _query(self, fn_name: str, *args: Any) -> Any:
        fn = getattr(self.nv, fn_name, None)
        if fn is None:
            raise _Unsupported(f"{fn_name} is not in this nvidia-ml-py")
        try:
            return fn(*args)
        except self._E as exc:
            if self._E_unsupported and isinstance(exc, self._E_unsupported):
                raise _Unsupported(str(exc)) from exc
            raise

    # ------------------------------------------------------------------ whole run
    def run(self, count: int) -> list[GpuResult]:
        gpus = [self._open(index) for index in range(count)]
        event_set = self._register_xids(gpus)
        deadline = self.clock() + self.xid_wait_s  # the XID window runs while the other checks do
        for gpu in gpus:
            if gpu.handle is None:
                for name in SELFTEST_CHECKS[1:]:
                    gpu.set(name, "skip", "not run: the GPU does not open")
                continue
            self._memory(gpu)
            self._power(gpu)
            self._clocks(gpu)
        if event_set is not None:
            self._wait_xids(gpus, event_set, deadline)
            with contextlib.suppress(self._E):  # nvmlShutdown frees it anyway
                self.nv.nvmlEventSetFree(event_set)
        return gpus

    # ------------------------------------------------------------------ answers
    def _open(self, index: int) -> GpuResult:
        gpu = GpuResult(index)
        nv = self.nv
        try:
            gpu.handle = nv.nvmlDeviceGetHandleByIndex(index)
        except self._E as exc:
            gpu.set("answers", "fail", f"NVML counts GPU {index} but cannot open it: {exc}")
            return gpu
        errors: list[str] = []

        def read(label: str, fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except self._E as exc:  # NotSupported too: every datacenter GPU answers these
                errors.append(f"{label}: {exc}")
                return None

        name = read("name", lambda: nv.nvmlDeviceGetName(gpu.handle))
        uuid = read("UUID", lambda: nv.nvmlDeviceGetUUID(gpu.handle))
        memory = read("memory info", lambda: nv.nvmlDeviceGetMemoryInfo(gpu.handle))
        temp = read("temperature", lambda: nv.nvmlDeviceGetTemperature(
            gpu.handle, getattr(nv, "NVML_TEMPERATURE_GPU", 0)))
        power = read("power", lambda: nv.nvmlDeviceGetPowerUsage(gpu.handle))
        gpu.name = _text(name)[:128] if name is not None else None
        gpu.uuid = _text(uuid)[:80] if uuid is not None else None
        if errors:
            gpu.set("answers", "fail", "; ".join(errors))
        else:
            gpu.set("answers", "pass", f"{gpu.name}, {int(memory.total // MIB)} MiB, {temp} C, "
                                       f"{_watts(power)} W")
        return gpu

    # ------------------------------------------------------------------ xid
    def _register_xids(self, gpus: list[GpuResult]) -> Any:
        nv = self.nv
        opened = [g for g in gpus if g.handle is not None]
        if not opened:
            return None
        try:
            event_set = nv.nvmlEventSetCreate()
        except self._E as exc:
            unsupported = bool(self._E_unsupported) and isinstance(exc, self._E_unsupported)
            for gpu in opened:
                gpu.set("xid", "skip" if unsupported else "fail", f"no NVML event set: {exc}")
            return None
        xid_type = getattr(nv, "nvmlEventTypeXidCriticalError", XID_EVENT)
        for gpu in opened:
            try:
                nv.nvmlDeviceRegisterEvents(gpu.handle, xid_type, event_set)
            except self._E as exc:
                if self._E_unsupported and isinstance(exc, self._E_unsupported):
                    gpu.set("xid", "skip", f"XID events not supported: {exc}")
                else:
                    gpu.set("xid", "fail", f"cannot register for XID events: {exc}")
        return event_set

    def _event_gpu(self, data: Any, registered: list[GpuResult]) -> GpuResult | None:
        try:  # pynvml's handles are ctypes pointers: the UUID, not the object, names the GPU
            uuid = _text(self.nv.nvmlDeviceGetUUID(data.device))
        except (self._E, AttributeError):
            uuid = None
        for gpu in registered:
            if (uuid is not None and gpu.uuid == uuid) or data.device is gpu.handle:
                return gpu
        return None

    def _wait_xids(self, gpus: list[GpuResult], event_set: Any, deadline: float) -> None:
        nv = self.nv
        registered = [g for g in gpus if g.handle is not None and "xid" not in g.checks]
        if not registered:
            return
        wait = getattr(nv, "nvmlEventSetWait_v2", None) or nv.nvmlEventSetWait
        codes: dict[int, list[int]] = {g.index: [] for g in registered}
        error = None
        for _ in range(MAX_EVENTS):
            # after the window, timeout 0 drains what is queued
            timeout_ms = max(0, round((deadline - self.clock()) * 1000))
            try:
                data = wait(event_set, timeout_ms)
            except self._E as exc:
                if not (self._E_timeout and isinstance(exc, self._E_timeout)):
                    error = str(exc)
                break
            if not int(getattr(data, "eventType", XID_EVENT)) & XID_EVENT:
                continue
            code = int(data.eventData)
            gpu = self._event_gpu(data, registered)
            if gpu is None:
                self.host_problems.append(f"{_xid_text(code)} on a GPU NVML did not name")
            elif code not in codes[gpu.index]:
                codes[gpu.index].append(code)
        for gpu in registered:
            if codes[gpu.index]:
                gpu.set("xid", "fail", ", ".join(map(_xid_text, codes[gpu.index]))
                        + f" within {self.xid_wait_s:g} s")
            elif error is not None:
                gpu.set("xid", "fail", f"waiting for XID events failed: {error}")
            else:
                gpu.set("xid", "pass", f"no critical XID in {self.xid_wait_s:g} s")

    # ------------------------------------------------------------------ memory
    def _memory(self, gpu: GpuResult) -> None:
        nv, h = self.nv, gpu.handle
        fails: list[str] = []
        passes: list[str] = []
        skipped: list[str] = []

        def part(label: str, probe: Callable[[], str | None], healthy: str) -> None:
            try:
                problem = probe()
            except _Unsupported:
                skipped.append(label)
            except self._E as exc:
                fails.append(f"{label}: {exc}")
            else:
                (fails if problem else passes).append(problem or healthy)

        def retired() -> str | None:
            pending = self._query("nvmlDeviceGetRetiredPagesPendingStatus", h)
            enabled = getattr(nv, "NVML_FEATURE_ENABLED", 1)
            if int(pending) == enabled:
                return "retired pages pending (a GPU reset applies them)"
            return None

        def remapped() -> str | None:
            _corr, _unc, pending, failure = self._query("nvmlDeviceGetRemappedRows", h)
            found = [text for flag, text in ((failure, "row remapping failed"),
                                             (pending, "row remap pending (a reset applies it)"))
                     if flag]
            return "; ".join(found) or None

        def ecc() -> str | None:
            count = int(self._query("nvmlDeviceGetTotalEccErrors", h,
                                    getattr(nv, "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1),
                                    getattr(nv, "NVML_VOLATILE_ECC", 0)))
            return f"{count} volatile uncorrected ECC error(s)" if count else None

        part("retired pages", retired, "no retired pages pending")
        part("row remapping", remapped, "no row remap pending or failed")
        part("ECC", ecc, "no volatile uncorrected ECC error")
        unsupported = f"not supported: {', '.join(skipped)}" if skipped else ""
        if fails:
            gpu.set("memory", "fail", "; ".join(fails))
        elif passes:
            gpu.set("memory", "pass", "; ".join(passes + ([unsupported] if unsupported else [])))
        else:
            gpu.set("memory", "skip", unsupported)

    # ------------------------------------------------------------------ power
    def _power(self, gpu: GpuResult) -> None:
        try:
            enforced = int(self._query("nvmlDeviceGetEnforcedPowerLimit", gpu.handle))
            default = int(self._query("nvmlDeviceGetPowerManagementDefaultLimit", gpu.handle))
        except _Unsupported as exc:
            gpu.set("power", "skip", f"power limits not readable: {exc}")
            return
        except self._E as exc:
            gpu.set("power", "fail", f"power limits: {exc}")
            return
        if enforced < default:  # capped (nvidia-smi -pl, a BMC policy): the GPU would sell short
            gpu.set("power", "fail",
                    f"power limit capped at {_watts(enforced)} W of {_watts(default)} W")
        else:
            gpu.set("power", "pass", f"enforced power limit {_watts(enforced)} W "
                                     f"(default {_watts(default)} W)")

    # ------------------------------------------------------------------ clocks
    def _clocks(self, gpu: GpuResult) -> None:
        # nvidia-ml-py before 12.535 has only the older ThrottleReasons name
        fn_name = ("nvmlDeviceGetCurrentClocksEventReasons"
                   if hasattr(self.nv, "nvmlDeviceGetCurrentClocksEventReasons")
                   else "nvmlDeviceGetCurrentClocksThrottleReasons")
        try:
            names = decode_throttle(int(self._query(fn_name, gpu.handle)))
        except _Unsupported as exc:
            gpu.set("clocks", "skip", f"clock event reasons not readable: {exc}")
            return
        except self._E as exc:
            gpu.set("clocks", "fail", f"clock event reasons: {exc}")
            return
        hardware = [n for n in names if n in HW_SLOWDOWN]
        if hardware:
            gpu.set("clocks", "fail", f"clocks held down by {', '.join(hardware)}")
        elif "sw_thermal_slowdown" in names:
            gpu.set("clocks", "warn",
                    "sw_thermal_slowdown active: the GPU runs hot, check its cooling")
        else:
            gpu.set("clocks", "pass", f"clock event reasons: {', '.join(names) or 'none'}")


# ------------------------------------------------------------------------------------ entry points

def _host_facts(nv: Any) -> dict[str, str | None]:
    def text(fn_name: str) -> str | None:
        try:
            return _text(getattr(nv, fn_name)())[:32]
        except (nv.NVMLError, AttributeError):
            return None

    try:
        cuda = int(nv.nvmlSystemGetCudaDriverVersion())  # 13010 is CUDA 13.1
        cuda_text: str | None = f"{cuda // 1000}.{(cuda % 1000) // 10}"
    except (nv.NVMLError, AttributeError):
        cuda_text = None
    return {"driver_version": text("nvmlSystemGetDriverVersion"), "cuda_driver_version": cuda_text,
            "nvml_version": text("nvmlSystemGetNVMLVersion")}


def _report(simulated: bool, host: dict[str, str | None], gpus: list[GpuResult],
            host_problems: list[str]) -> dict[str, Any]:
    problems = list(host_problems)
    for gpu in gpus:
        for name in SELFTEST_CHECKS:
            check = gpu.checks.get(name)
            if check is not None and check.result == "fail":
                uuid = gpu.uuid or "unknown UUID"
                problems.append(f"GPU {gpu.index} ({uuid}): {name}: {check.detail}")
    return {"ok": not problems, "simulated": simulated, **host, "gpu_count": len(gpus),
            "gpus": [g.as_dict() for g in gpus], "problems": problems}


def _nvml_for(cfg: Config) -> Any:
    if cfg.simulate is not None:
        from agents.simulate import SelftestSimNvml

        return SelftestSimNvml(cfg.simulate, cfg.hostname, serving=bool(cfg.targets))
    return load_nvml_module()


def run_selftest(cfg: Config, *, xid_wait_s: float, nvml: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> tuple[dict[str, Any], int]:
    """The report (the ``--json`` object) and the exit status: 0 passed, 1 failed, 2 no NVML."""
    simulated = cfg.simulate is not None
    no_host = {"driver_version": None, "cuda_driver_version": None, "nvml_version": None}
    try:
        nv = nvml if nvml is not None else _nvml_for(cfg)
        nv.nvmlInit()
    except Exception as exc:  # no nvidia-ml-py, no libnvidia-ml, no driver: NVMLError or not
        problem = f"NVML unavailable: {type(exc).__name__}: {exc}"
        return _report(simulated, no_host, [], [problem]), EXIT_NO_NVML
    try:
        host = _host_facts(nv)
        try:
            count = int(nv.nvmlDeviceGetCount())
        except nv.NVMLError as exc:
            problem = f"NVML cannot count the GPUs: {exc}"
            return _report(simulated, host, [], [problem]), EXIT_NO_NVML
        test = SelfTest(nv, xid_wait_s=xid_wait_s, clock=clock)
        gpus = test.run(count)
        if not gpus:  # a GPU node whose driver sees no GPU is not accepted
            test.host_problems.append("NVML reports no GPUs")
        report = _report(simulated, host, gpus, test.host_problems)
    finally:
        with contextlib.suppress(nv.NVMLError):
            nv.nvmlShutdown()
    return report, EXIT_OK if report["ok"] else EXIT_FAILED


def format_text(report: dict[str, Any]) -> list[str]:
    """The human-readable report, one line per GPU and check."""
    sim = ", simulated" if report["simulated"] else ""
    facts = (f"driver {report['driver_version'] or 'n/a'}, "
             f"CUDA {report['cuda_driver_version'] or 'n/a'}, "
             f"NVML {report['nvml_version'] or 'n/a'}")
    lines = [f"{facts}: {report['gpu_count']} GPU(s){sim}"]
    for gpu in report["gpus"]:
        lines.append(f"GPU {gpu['index']} {gpu['name'] or '?'} {gpu['uuid'] or '?'}: "
                     + ("ok" if gpu["ok"] else "FAILED"))
        lines.extend(f"  {c['name']:<8} {c['result']:<4}  {c['detail']}" for c in gpu["checks"])
    if report["ok"]:
        lines.append("self-test passed")
    else:
        lines.append(f"self-test FAILED: {len(report['problems'])} problem(s)")
        lines.extend(f"  {p}" for p in report["problems"])
    return lines
