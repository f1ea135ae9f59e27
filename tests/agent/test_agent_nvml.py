"""NVML collector through a fake module built from pynvml's own error classes and constants."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from agentkit import validate
from fakenvml import MIB, FakeGpu, FakeNvml, batch_of, run_interval

from agents.nvml import NvmlCollector, decode_throttle, mig_profile_name


def test_summary_values_and_versions():
    g = FakeGpu(0, util=[40, 80, 60], temp=[50, 64, 58], energy_step=1_000_000)
    nv = FakeNvml([g])
    c = NvmlCollector(nv)
    c.start(1000.0)
    assert c.host == {"driver_version": "590.48.01", "cuda_driver_version": "13.1", "nvml_version": "13.590.48.01"}
    gpus, events = run_interval(c)
    (s,) = gpus
    assert s["uuid"].startswith("GPU-") and s["pci_bus_id"] == "00000000:18:00.0"
    assert s["samples"] == 3
    assert s["util_max"] >= s["util_mean"] > 0
    assert s["power_mean_w"] == 350.0 and s["power_limit_w"] == 700.0
    assert s["energy_mj"] == 1_000_000  # delta of the cumulative counter
    assert s["memory_total_mib"] == 81559 and s["memory_used_mib"] == 20000
    assert s["sm_clock_mhz"] == 1980 and s["mem_clock_mhz"] == 2619
    assert s["cc_mode"] == "on" and s["mig_mode"] is False
    assert s["remapped_rows_pending"] is False and s["retired_pages"] is None  # remapping supported: no retired
    assert events == []
    validate(batch_of(gpus, events))


def test_unsupported_fields_are_none_and_energy_falls_back_to_power():
    g = FakeGpu(0, unsupported={"energy", "util", "ecc", "remap", "clocks", "temp"})
    c = NvmlCollector(FakeNvml([g]))
    c.start(1000.0)
    gpus, _ = run_interval(c, samples=4)
    (s,) = gpus
    assert s["util_mean"] is None and s["util_max"] is None and s["temp_max_c"] is None
    assert s["ecc_corrected_total"] is None and s["sm_clock_mhz"] is None
    assert s["energy_mj"] == 350 * 4 * 1000  # 350 W for 4 s integrated, in mJ
    assert s["retired_pages"] == 3  # remapped rows unsupported: retired pages (both causes) reported instead
    validate(batch_of(gpus, []))
    calls = g.calls
    run_interval(c, samples=1, t0=1004.0)
    assert g.calls - calls < 12  # unsupported calls are not retried every sample


def test_events_xid_ecc_remap_throttle():
    g = FakeGpu(0, reasons=0)
    nv = FakeNvml([g])
    c = NvmlCollector(nv)
    c.start(1000.0)
    run_interval(c)
    nv.events.append(SimpleNamespace(device=g, eventType=nv.nvmlEventTypeXidCriticalError, eventData=79))
    g.ecc = [5, 1]
    g.remap = (0, 1, 1, 0)
    g.reasons = 0x20 | 0x4  # sw thermal slowdown + sw power cap
    gpus, events = run_interval(c, t0=1003.0)
    kinds = {e["kind"]: e for e in events}
    assert kinds["xid"]["code"] == 79 and kinds["xid"]["gpu_uuid"] == g.uuid
    assert set(kinds) == {"xid", "ecc_corrected", "ecc_uncorrected", "remapped_rows", "thermal_throttle",
                          "power_throttle"}
    assert gpus[0]["throttle_reasons"] == ["sw_power_cap", "sw_thermal_slowdown"]
    assert gpus[0]["remapped_rows_pending"] is True
    validate(batch_of(gpus, events))
    # same state again: no new events (edges only)
    gpus, events = run_interval(c, t0=1006.0)
    assert events == []


def test_gpu_lost_is_reported_once_and_skipped():
    a, b = FakeGpu(0), FakeGpu(1, uuid="GPU-bbbbbbbb-1111-2222-3333-444455556666")
    c = NvmlCollector(FakeNvml([a, b]))
    c.start(1000.0)
    b.lost = True
    gpus, events = run_interval(c)
    assert [g["index"] for g in gpus] == [0]
    assert [e["kind"] for e in events] == ["gpu_lost"] and events[0]["gpu_uuid"] == b.uuid
    gpus, events = run_interval(c, t0=1003.0)
    assert events == [] and len(gpus) == 1
    validate(batch_of(gpus, events))


def test_mig_instances_deduplicated_by_gpu_instance():
    g = FakeGpu(0, mig=[(2, "3g.40gb", 40448), (3, "2g.20gb", 20096), (9, "1g.10gb", 9984), (9, "1g.10gb", 9984),
                        (10, "1g.10gb+me", 9984)], unsupported={"util"})
    c = NvmlCollector(FakeNvml([g]))
    c.start(1000.0)
    gpus, _ = run_interval(c)
    s = gpus[0]
    assert s["mig_mode"] is True
    assert [(m["gi_id"], m["profile"], m["memory_total_mib"]) for m in s["mig_instances"]] == [
        (2, "3g.40gb", 40448), (3, "2g.20gb", 20096), (9, "1g.10gb", 9984), (10, "1g.10gb+me", 9984)]
    validate(batch_of(gpus, []))


# Memory of each MIG instance and of the whole GPU as nvidia-smi -q printed them on real H200 and H100 nodes
# (tests/fixtures/nvidia_smi_q_text_{h200,h100}_mig_590_idle.txt: "Shared FB Memory Usage" and "FB Memory
# Usage" totals); the names NVIDIA gives those profiles (its MIG user guide and mig-parted's default config).
H200_TOTAL_MIB, H100_TOTAL_MIB = 143771, 81559


@pytest.mark.parametrize(("total_mib", "instances"), [
    (H200_TOTAL_MIB, [(1, "3g.71gb", 71424), (2, "4g.71gb", 71424), (3, "2g.35gb", 33280), (4, "1g.35gb", 33280),
                      (5, "1g.18gb", 16384), (6, "7g.141gb", 143771)]),
    (H100_TOTAL_MIB, [(1, "3g.40gb", 40448), (2, "2g.20gb", 20096), (3, "1g.10gb", 9984), (4, "1g.20gb", 20096)]),
])
def test_mig_profile_names_rebuilt_from_memory_are_nvidias_names(total_mib, instances):
    # A device name without the profile (older drivers): the agent rebuilds it from the instance's memory, as
    # NVIDIA's tools do. Rounding 70.5 to even once gave H200's 3g.71gb as 3g.70gb.
    for gi, profile, memory in instances:
        assert mig_profile_name(int(profile[0]), memory, total_mib * MIB) == profile, (gi, profile)
    g = FakeGpu(0, name="NVIDIA H200", mem_total=total_mib * MIB, mig=instances[:4], mig_names=False)
    c = NvmlCollector(FakeNvml([g]))
    c.start(1000.0)
    gpus, _ = run_interval(c)
    assert [m["profile"] for m in gpus[0]["mig_instances"]] == [p for _gi, p, _m in instances[:4]]
    validate(batch_of(gpus, []))


def test_decode_throttle():
    assert decode_throttle(0) == []
    assert decode_throttle(0x1 | 0x40 | 0x80) == ["gpu_idle", "hw_thermal_slowdown", "hw_power_brake_slowdown"]
