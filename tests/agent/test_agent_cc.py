"""Confidential-computing mode: the system's CC state and the GPUs' ready state, read where the driver has them,
None where it has no CC support (NVMLError NotSupported or FunctionNotFound, or a pynvml without the call)."""

from __future__ import annotations

from types import SimpleNamespace

import pynvml
import pytest
from agentkit import validate
from fakenvml import FakeGpu, FakeNvml, batch_of, err, run_interval

from agents.config import SimulateConfig
from agents.nvml import NvmlCollector
from agents.simulate import SimNvml, simulated_cc_on


class CcNvml(FakeNvml):
    """FakeNvml whose CC state and GPU ready state a test sets; an exception class raises that NVML error."""

    def __init__(self, gpus, *, state, ready=pynvml.NVML_CC_ACCEPTING_CLIENT_REQUESTS_TRUE):
        super().__init__(gpus)
        self.state, self.ready, self.ready_calls = state, ready, 0

    def nvmlSystemGetConfComputeState(self):
        if isinstance(self.state, type):
            raise err(self.state)
        return self.state

    def nvmlSystemGetConfComputeGpusReadyState(self):
        self.ready_calls += 1
        if isinstance(self.ready, type):
            raise err(self.ready)
        return self.ready


def cc_of(nv) -> list[str | None]:
    c = NvmlCollector(nv)
    c.start(1000.0)
    gpus, events = run_interval(c)
    validate(batch_of(gpus, events))
    return [g["cc_mode"] for g in gpus]


def on(dev_tools: int = 0) -> SimpleNamespace:
    return SimpleNamespace(environment=pynvml.NVML_CC_SYSTEM_ENVIRONMENT_PROD,
                           ccFeature=pynvml.NVML_CC_SYSTEM_FEATURE_ENABLED, devToolsMode=dev_tools)


def test_it_reports_cc_on_for_every_gpu_when_the_system_runs_it_and_the_gpus_are_ready():
    assert cc_of(CcNvml([FakeGpu(0), FakeGpu(1)], state=on())) == ["on", "on"]


def test_it_reports_devtools_mode():
    assert cc_of(CcNvml([FakeGpu(0)], state=on(dev_tools=1))) == ["devtools"]


def test_it_reports_off_without_asking_the_gpus_ready_state():
    nv = CcNvml([FakeGpu(0)], state=SimpleNamespace(environment=0, ccFeature=0, devToolsMode=0))
    assert cc_of(nv) == ["off"]
    assert nv.ready_calls == 0


def test_it_says_the_gpus_are_not_ready_until_they_are_then_on_without_a_restart():
    nv = CcNvml([FakeGpu(0)], state=on(), ready=pynvml.NVML_CC_ACCEPTING_CLIENT_REQUESTS_FALSE)
    c = NvmlCollector(nv)
    c.start(1000.0)
    first, _ = run_interval(c)
    nv.ready = pynvml.NVML_CC_ACCEPTING_CLIENT_REQUESTS_TRUE  # attested and set ready
    second, _ = run_interval(c, t0=1003.0)
    assert (first[0]["cc_mode"], second[0]["cc_mode"]) == ("on, GPUs not ready", "on")


def test_it_keeps_the_system_mode_when_the_ready_state_is_not_supported():
    assert cc_of(CcNvml([FakeGpu(0)], state=on(), ready=pynvml.NVMLError_NotSupported)) == ["on"]


@pytest.mark.parametrize("error", [pynvml.NVMLError_NotSupported, pynvml.NVMLError_Unknown])
def test_it_reports_none_when_the_driver_has_no_cc_support(error):
    assert cc_of(CcNvml([FakeGpu(0)], state=error)) == [None]


class WithoutCc(FakeNvml):
    """A binding older than the CC calls (pynvml before driver 535)."""

    def __getattribute__(self, name):
        if "ConfCompute" in name:
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_it_reports_none_with_a_pynvml_that_lacks_the_cc_calls():
    assert cc_of(WithoutCc([FakeGpu(0)])) == [None]


@pytest.mark.parametrize(("hostname", "model", "mig"), [
    ("iad1-h100-02", "H100", False), ("iad1-h100-01", "H100", False), ("fra1-a100-01", "A100", False),
    ("iad1-h100-09", "H100", True),
])
def test_it_reads_the_simulated_cc_mode_through_the_collector(hostname, model, mig):
    """The simulated NVML (labelled simulated) runs CC on half of the H100 nodes without MIG; the collector reads
    it through the same calls as a real driver."""
    sim = SimNvml(SimulateConfig(gpus=2, gpu_model=model, mig=mig), hostname)
    expected = "on" if simulated_cc_on(seed=42, hostname=hostname, gpu_model=model, mig=mig) else "off"
    assert cc_of(sim) == [expected, expected]
    assert (hostname, expected) in {("iad1-h100-02", "on"), ("iad1-h100-01", "off"), ("fra1-a100-01", "off"),
                                    ("iad1-h100-09", "off")}
