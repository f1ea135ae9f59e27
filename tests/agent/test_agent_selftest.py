"""`tokenmill-agent selftest`: the NVML acceptance check, through agents.cli.main on a fake NVML."""

from __future__ import annotations

import json
import re
import subprocess
from types import SimpleNamespace

import fakenvml
import pynvml
import pytest
from agentkit import PYTHON, REPO, agent_env
from fakenvml import MIB, FakeGpu, SelftestNvml, err

from agents import cli

HEALTHY_ANSWERS = "NVIDIA H100 80GB HBM3, 81559 MiB, 61 C, 350 W"
HEALTHY_MEMORY = ("no retired pages pending; no row remap pending or failed; "
                  "no volatile uncorrected ECC error")


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.delenv("TOKENMILL_AGENT_SIMULATE", raising=False)
    path = tmp_path / "agent.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    return path


def simulated_config(tmp_path, extra: str = "") -> str:
    path = tmp_path / "sim.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\nhostname = "burnin-01"\n'
                    f"[simulate]\ngpus = 2\n{extra}")
    return str(path)


def use(monkeypatch, nv) -> None:
    """The agent loads `fakenvml:SELFTEST` through its TOKENMILL_AGENT_NVML_MODULE hook."""
    monkeypatch.setattr(fakenvml, "SELFTEST", nv, raising=False)
    monkeypatch.setenv("TOKENMILL_AGENT_NVML_MODULE", "fakenvml:SELFTEST")


def selftest(capsys, config, *args: str) -> tuple[int, dict]:
    rc = cli.main(["--config", str(config), "selftest", "--json", *args])
    out = capsys.readouterr().out
    return rc, json.loads(out)  # the whole of stdout is one JSON object


def two_gpus(**kw) -> list[FakeGpu]:
    return [FakeGpu(0, **kw), FakeGpu(1, uuid="GPU-bbbbbbbb-1111-2222-3333-444455556666", **kw)]


def checks(report: dict, index: int) -> dict[str, tuple[str, str]]:
    return {c["name"]: (c["result"], c["detail"]) for c in report["gpus"][index]["checks"]}


def healthy_gpu(index: int, uuid: str) -> dict:
    return {"index": index, "uuid": uuid, "name": "NVIDIA H100 80GB HBM3", "ok": True, "checks": [
        {"name": "answers", "result": "pass", "detail": HEALTHY_ANSWERS},
        {"name": "xid", "result": "pass", "detail": "no critical XID in 2 s"},
        {"name": "memory", "result": "pass", "detail": HEALTHY_MEMORY},
        {"name": "power", "result": "pass", "detail": "enforced power limit 700 W (default 700 W)"},
        {"name": "clocks", "result": "pass", "detail": "clock event reasons: none"},
    ]}


def test_it_passes_a_healthy_node_with_exit_0_and_the_exact_json_shape(capsys, config, monkeypatch):
    gpus = two_gpus()
    nv = SelftestNvml(gpus)
    use(monkeypatch, nv)
    rc, report = selftest(capsys, config)
    assert rc == 0
    assert report == {
        "ok": True, "simulated": False, "driver_version": "590.48.01",
        "cuda_driver_version": "13.1", "nvml_version": "13.590.48.01", "gpu_count": 2,
        "gpus": [healthy_gpu(0, gpus[0].uuid), healthy_gpu(1, gpus[1].uuid)], "problems": [],
    }
    assert list(report) == ["ok", "simulated", "driver_version", "cuda_driver_version",
                            "nvml_version", "gpu_count", "gpus", "problems"]
    assert nv.inits == 1 and nv.shutdowns == 1
    assert 1900 <= nv.waits[0] <= 2000 and len(nv.waits) == 1  # one wait for the whole window


def test_it_waits_as_long_as_xid_wait_s_says(capsys, config, monkeypatch):
    nv = SelftestNvml(two_gpus())
    use(monkeypatch, nv)
    rc, report = selftest(capsys, config, "--xid-wait-s", "0.5")
    assert rc == 0 and 400 <= nv.waits[0] <= 500
    assert checks(report, 1)["xid"] == ("pass", "no critical XID in 0.5 s")
    with pytest.raises(SystemExit) as exc:
        cli.main(["--config", str(config), "selftest", "--xid-wait-s", "-1"])
    assert exc.value.code == 2
    assert "must be 0..300 seconds" in capsys.readouterr().err


def test_it_fails_only_the_gpu_with_a_pending_xid_79(capsys, config, monkeypatch):
    gpus = two_gpus()
    nv = SelftestNvml(gpus)
    xid = nv.nvmlEventTypeXidCriticalError
    nv.events = [SimpleNamespace(device=gpus[1], eventType=xid, eventData=79),
                 SimpleNamespace(device=gpus[1], eventType=xid, eventData=79),  # named once
                 SimpleNamespace(device=gpus[1], eventType=xid, eventData=94)]
    use(monkeypatch, nv)
    rc, report = selftest(capsys, config)
    assert rc == 1 and report["ok"] is False
    assert [g["ok"] for g in report["gpus"]] == [True, False]
    detail = "XID 79, XID 94 within 2 s"
    assert checks(report, 1)["xid"] == ("fail", detail)
    assert checks(report, 0)["xid"] == ("pass", "no critical XID in 2 s")
    assert report["problems"] == [f"GPU 1 ({gpus[1].uuid}): xid: {detail}"]
    assert len(nv.waits) == 4 and all(0 <= w <= 2000 for w in nv.waits)  # one window for all


def test_it_fails_xid_when_the_event_wait_breaks(capsys, config, monkeypatch):
    nv = SelftestNvml([FakeGpu(0)])

    def broken_wait(es, timeout_ms):
        raise err(pynvml.NVMLError_Unknown)

    nv.nvmlEventSetWait_v2 = broken_wait
    use(monkeypatch, nv)
    rc, report = selftest(capsys, config)
    assert rc == 1
    assert checks(report, 0)["xid"] == ("fail", "waiting for XID events failed: Unknown Error")


def test_it_fails_a_capped_power_limit(capsys, config, monkeypatch):
    gpus = [FakeGpu(0, enforced_limit_mw=500_000), FakeGpu(1, enforced_limit_mw=612_500,
                                                            default_limit_mw=600_000)]
    use(monkeypatch, SelftestNvml(gpus))
    rc, report = selftest(capsys, config)
    assert rc == 1
    assert checks(report, 0)["power"] == ("fail", "power limit capped at 500 W of 700 W")
    # raised above the default (towards the maximum) is not a cap
    assert checks(report, 1)["power"] == ("pass", "enforced power limit 612.5 W (default 600 W)")
    assert report["problems"] == [
        f"GPU 0 ({gpus[0].uuid}): power: power limit capped at 500 W of 700 W"]


@pytest.mark.parametrize(("fault", "detail"), [
    ({"remap": (0, 1, 0, 1)}, "row remapping failed"),
    ({"remap": (0, 2, 1, 0)}, "row remap pending (a reset applies it)"),
    ({"remap": (0, 1, 1, 1)}, "row remapping failed; row remap pending (a reset applies it)"),
    ({"ecc": [3, 2]}, "2 volatile uncorrected ECC error(s)"),
    ({"retired_pending": 1}, "retired pages pending (a GPU reset applies them)"),
])
def test_it_fails_pending_or_failed_memory_repairs(capsys, config, monkeypatch, fault, detail):
    gpu = FakeGpu(0)
    for name, value in fault.items():
        setattr(gpu, name, value)
    use(monkeypatch, SelftestNvml([gpu]))
    rc, report = selftest(capsys, config)
    assert rc == 1
    assert checks(report, 0)["memory"] == ("fail", detail)
    assert report["problems"] == [f"GPU 0 ({gpu.uuid}): memory: {detail}"]


@pytest.mark.parametrize(("mask", "result", "detail", "rc"), [
    (0x8, "fail", "clocks held down by hw_slowdown", 1),
    (0x1 | 0x40 | 0x80, "fail",
     "clocks held down by hw_thermal_slowdown, hw_power_brake_slowdown", 1),
    (0x20, "warn", "sw_thermal_slowdown active: the GPU runs hot, check its cooling", 0),
    (0x1 | 0x2, "pass", "clock event reasons: gpu_idle, applications_clocks_setting", 0),
    (0x4, "pass", "clock event reasons: sw_power_cap", 0),
])
def test_it_fails_hw_slowdown_and_warns_sw_thermal(capsys, config, monkeypatch, mask, result,
                                                  detail, rc):
    use(monkeypatch, SelftestNvml([FakeGpu(0, reasons=mask)]))
    code, report = selftest(capsys, config)
    assert code == rc and report["ok"] is (rc == 0)
    assert checks(report, 0)["clocks"] == (result, detail)
    assert report["gpus"][0]["ok"] is (result != "fail")


def test_it_skips_what_the_gpu_does_not_support(capsys, config, monkeypatch):
    gpus = [FakeGpu(0, unsupported={"events", "retired", "remap", "ecc", "power_limit", "reasons"}),
            FakeGpu(1, uuid="GPU-bbbbbbbb-1111-2222-3333-444455556666", unsupported={"retired"})]
    use(monkeypatch, SelftestNvml(gpus))
    rc, report = selftest(capsys, config)
    assert rc == 0 and report["ok"] is True and report["problems"] == []
    assert checks(report, 0) == {
        "answers": ("pass", HEALTHY_ANSWERS),
        "xid": ("skip", "XID events not supported: Not Supported"),
        "memory": ("skip", "not supported: retired pages, row remapping, ECC"),
        "power": ("skip", "power limits not readable: Not Supported"),
        "clocks": ("skip", "clock event reasons not readable: Not Supported"),
    }
    # Ampere and later remap rows and retire no pages
    assert checks(report, 1)["memory"] == (
        "pass", "no row remap pending or failed; no volatile uncorrected ECC error; "
                "not supported: retired pages")
    assert checks(report, 1)["xid"] == ("pass", "no critical XID in 2 s")


def test_it_fails_a_gpu_that_does_not_answer(capsys, config, monkeypatch):
    gpus = [FakeGpu(0, unsupported={"temp"}), FakeGpu(1), FakeGpu(2, mem_total=143771 * MIB)]
    nv = SelftestNvml(gpus)

    def handle(index):
        if index == 1:
            raise err(pynvml.NVMLError_GpuIsLost)
        return gpus[index]

    nv.nvmlDeviceGetHandleByIndex = handle
    use(monkeypatch, nv)
    rc, report = selftest(capsys, config)
    assert rc == 1 and report["gpu_count"] == 3
    assert checks(report, 0)["answers"] == ("fail", "temperature: Not Supported")
    assert report["gpus"][1]["uuid"] is None and report["gpus"][1]["name"] is None
    assert checks(report, 1) == {
        "answers": ("fail", "NVML counts GPU 1 but cannot open it: GPU is lost"),
        **{name: ("skip", "not run: the GPU does not open")
           for name in ("xid", "memory", "power", "clocks")},
    }
    assert checks(report, 2)["answers"] == (
        "pass", "NVIDIA H100 80GB HBM3, 143771 MiB, 61 C, 350 W")
    assert report["problems"] == [
        f"GPU 0 ({gpus[0].uuid}): answers: temperature: Not Supported",
        "GPU 1 (unknown UUID): answers: NVML counts GPU 1 but cannot open it: GPU is lost",
    ]


def test_it_exits_2_when_nvml_cannot_be_initialised(capsys, config, monkeypatch):
    use(monkeypatch, SelftestNvml([FakeGpu(0)],
                                  init_error=pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)))
    rc, report = selftest(capsys, config)
    assert rc == 2
    assert report == {
        "ok": False, "simulated": False, "driver_version": None, "cuda_driver_version": None,
        "nvml_version": None, "gpu_count": 0, "gpus": [],
        "problems": ["NVML unavailable: NVMLError_DriverNotLoaded: Driver Not Loaded"]}
    monkeypatch.setenv("TOKENMILL_AGENT_NVML_MODULE", "no_such_nvml_module")
    rc, report = selftest(capsys, config)
    assert rc == 2 and report["gpu_count"] == 0
    assert report["problems"] == ["NVML unavailable: ModuleNotFoundError: "
                                  "No module named 'no_such_nvml_module'"]


def test_it_fails_a_node_whose_driver_sees_no_gpu(capsys, config, monkeypatch):
    use(monkeypatch, SelftestNvml([]))
    rc, report = selftest(capsys, config)
    assert rc == 1 and report["gpu_count"] == 0 and report["problems"] == ["NVML reports no GPUs"]


def test_it_prints_readable_lines_without_json(capsys, config, monkeypatch):
    gpus = [FakeGpu(0, reasons=0x20), FakeGpu(1, enforced_limit_mw=450_000)]
    use(monkeypatch, SelftestNvml(gpus))
    rc = cli.main(["--config", str(config), "selftest"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 1
    assert lines[0] == "driver 590.48.01, CUDA 13.1, NVML 13.590.48.01: 2 GPU(s)"
    assert lines[1] == f"GPU 0 NVIDIA H100 80GB HBM3 {gpus[0].uuid}: ok"
    warned = "  clocks   warn  sw_thermal_slowdown active: the GPU runs hot, check its cooling"
    assert warned in lines
    assert f"GPU 1 NVIDIA H100 80GB HBM3 {gpus[1].uuid}: FAILED" in lines
    assert lines[-2:] == ["self-test FAILED: 1 problem(s)",
                          f"  GPU 1 ({gpus[1].uuid}): power: power limit capped at 450 W of 700 W"]


def test_it_passes_a_simulated_node_and_says_simulated(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("TOKENMILL_AGENT_SIMULATE", raising=False)
    rc, report = selftest(capsys, simulated_config(tmp_path))
    assert rc == 0 and report["ok"] is True and report["simulated"] is True
    assert (report["driver_version"], report["cuda_driver_version"], report["nvml_version"]) == (
        "590.48.01", "13.1", "13.590.48.01")
    assert report["gpu_count"] == 2 and report["problems"] == []
    for gpu in report["gpus"]:
        assert gpu["name"] == "NVIDIA H100 80GB HBM3" and gpu["uuid"].startswith("GPU-")
        results = {c["name"]: c["result"] for c in gpu["checks"]}
        assert results == {"answers": "pass", "xid": "pass", "memory": "pass", "power": "pass",
                           "clocks": "pass"}
    assert checks(report, 0)["power"] == ("pass", "enforced power limit 700 W (default 700 W)")
    assert checks(report, 0)["memory"][1].endswith("not supported: retired pages")


def test_it_finds_the_faults_a_simulated_config_injects(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("TOKENMILL_AGENT_SIMULATE", raising=False)
    cfg = simulated_config(tmp_path, 'selftest_fail = ["power", "1:xid", "1:memory", "1:clocks"]\n')
    rc, report = selftest(capsys, cfg)
    assert rc == 1 and report["simulated"] is True
    uuid0, uuid1 = (g["uuid"] for g in report["gpus"])
    assert report["problems"] == [
        f"GPU 0 ({uuid0}): power: power limit capped at 560 W of 700 W",
        f"GPU 1 ({uuid1}): xid: XID 79 within 2 s",
        f"GPU 1 ({uuid1}): memory: row remapping failed",
        f"GPU 1 ({uuid1}): power: power limit capped at 560 W of 700 W",
        f"GPU 1 ({uuid1}): clocks: clocks held down by hw_slowdown",
    ]
    cfg = simulated_config(tmp_path, 'selftest_fail = ["0:answers"]\n')
    rc, report = selftest(capsys, cfg)
    assert rc == 1 and report["gpus"][0]["uuid"] is None
    assert report["problems"] == ["GPU 0 (unknown UUID): answers: NVML counts GPU 0 but cannot "
                                  "open it: GPU is lost"]


@pytest.mark.parametrize(("value", "message"), [
    ('["fan"]', "names no check"),
    ('["x:xid"]', "must be a number"),
    ('["5:xid"]', "GPU index the node does not have"),
    ('"power"', "must be a list of strings"),
])
def test_it_refuses_a_bad_selftest_fail_key(capsys, tmp_path, monkeypatch, value, message):
    monkeypatch.delenv("TOKENMILL_AGENT_SIMULATE", raising=False)
    config = simulated_config(tmp_path, f"selftest_fail = {value}\n")
    rc = cli.main(["--config", config, "selftest"])
    assert rc == 2 and message in capsys.readouterr().err


LIGHT = """
import io, json, sys, contextlib
from agents import cli
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    rc = cli.main(["--simulate", "2", "selftest", "--json", "--xid-wait-s", "0"])
bad = sorted(m for m in sys.modules
             if m.split(".")[0] in ("django", "pydantic", "portal", "ninja", "numpy"))
print(json.dumps({"rc": rc, "bad": bad, "report": json.loads(buf.getvalue())}))
"""


def test_it_stays_light_and_needs_no_credential(tmp_path):
    env = agent_env(TOKENMILL_AGENT_STATE_DIR=str(tmp_path / "s"))
    env.pop("DJANGO_SETTINGS_MODULE", None)
    r = subprocess.run([PYTHON, "-c", LIGHT], cwd=REPO, env=env, capture_output=True, text=True,
                       check=True)
    out = json.loads(r.stdout)
    assert out["rc"] == 0 and out["bad"] == [] and out["report"]["simulated"] is True
    assert out["report"]["gpus"][0]["checks"][1] == {"name": "xid", "result": "pass",
                                                     "detail": "no critical XID in 0 s"}
    assert not (tmp_path / "s").exists()  # nothing written: no credential, spool or state


@pytest.mark.parametrize("path", ["agents/selftest.py", "agents/nvml.py", "agents/simulate.py",
                                  "tests/agent/fakenvml.py", "benchmarks/bench_agent.py"])
def test_it_calls_only_functions_real_pynvml_has(path):
    # The fakes answer any name they define; real pynvml raises AttributeError on one it lacks (the collector
    # once asked for nvmlDeviceGetEnforcedPowerManagementLimit, which only the fakes had).
    names = set(re.findall(r"\bnvml(?:Device|Event|System)\w+", (REPO / path).read_text()))
    assert "nvmlDeviceGetEnforcedPowerLimit" in names
    # The simulator also matches constants by prefix ("nvmlEventType"): a prefix of real names is not a call.
    real = dir(pynvml)
    assert sorted(n for n in names if not any(r.startswith(n) for r in real)) == []
