"""Agent overhead benchmark: the real daemon in a subprocess for 8 GPUs sampled at 1 s (NVML faked at zero cost,
so the figure is our own overhead), 4 engine endpoints on a loopback HTTP server serving fixture text, sending to a
loopback fake portal. Peak RSS (VmHWM) and CPU time per second (utime+stime from /proc/<pid>/stat) are compared with
a bare Python process that only sleeps, measured the same way.

    .venv/bin/python benchmarks/bench_agent.py [--seconds 60]

This module doubles as the fake NVML the agent loads (TOKENMILL_AGENT_NVML_MODULE=bench_agent:ZeroCostNvml), so its
top level imports only the standard library.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
ENDPOINTS = {  # path -> (engine, fixture)
    "/vllm-v1/metrics": ("vllm", "vllm_metrics_v1_2026-03_qwen25_05b_kops_cncf_ai_conformance.txt"),
    "/vllm-v05/metrics": ("vllm", "vllm_metrics_v0.5_datadog_opt125m.txt"),
    "/sglang/metrics": ("sglang", "sglang_metrics_docs_2024_llama31_8b.txt"),
    "/triton/metrics": ("triton", "triton_metrics_datadog_densenet_trimmed.txt"),
}


class ZeroCostNvml:
    """pynvml's names, constants and error classes; every reading is a constant (8 x H100)."""

    def __init__(self):
        from types import SimpleNamespace

        import pynvml

        for name in dir(pynvml):
            if name.startswith(("NVMLError", "NVML_", "nvmlEventType")):
                setattr(self, name, getattr(pynvml, name))
        self._timeout = pynvml.NVMLError_Timeout
        self._util = SimpleNamespace(gpu=63, memory=21)
        self._mem = SimpleNamespace(total=81559 * 2**20, used=70000 * 2**20)
        self._pci = SimpleNamespace(busId="00000000:18:00.0")
        self._energy = 10**9

    def nvmlInit(self): pass
    def nvmlShutdown(self): pass
    def nvmlSystemGetDriverVersion(self): return "590.48.01"
    def nvmlSystemGetNVMLVersion(self): return "13.590.48.01"
    def nvmlSystemGetCudaDriverVersion(self): return 13010
    def nvmlSystemGetConfComputeState(self): raise self.NVMLError_NotSupported(self.NVML_ERROR_NOT_SUPPORTED)
    def nvmlDeviceGetCount(self): return 8
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetUUID(self, h): return f"GPU-{h:08d}-0000-4000-8000-000000000000"
    def nvmlDeviceGetName(self, h): return "NVIDIA H100 80GB HBM3"
    def nvmlDeviceGetPciInfo(self, h): return self._pci
    def nvmlDeviceGetUtilizationRates(self, h): return self._util
    def nvmlDeviceGetPowerUsage(self, h): return 450_000
    def nvmlDeviceGetTemperature(self, h, s): return 55
    def nvmlDeviceGetCurrentClocksEventReasons(self, h): return 0
    def nvmlDeviceGetMemoryInfo(self, h): return self._mem
    def nvmlDeviceGetEnforcedPowerLimit(self, h): return 700_000

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        self._energy += 4_500_000
        return self._energy

    def nvmlDeviceGetClockInfo(self, h, t): return 1980
    def nvmlDeviceGetTotalEccErrors(self, h, e, c): return 0
    def nvmlDeviceGetRemappedRows(self, h): return (0, 0, 0, 0)
    def nvmlDeviceGetMigMode(self, h): return [0, 0]
    def nvmlEventSetCreate(self): return 1
    def nvmlDeviceRegisterEvents(self, h, t, s): pass
    def nvmlEventSetWait_v2(self, s, ms): raise self._timeout(self.NVML_ERROR_TIMEOUT)
    def nvmlEventSetFree(self, s): pass


def proc_stats(pid: int) -> tuple[float, int, int]:
    """(cpu seconds utime+stime, VmHWM kB, VmRSS kB) of a live process."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    hwm = rss = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return cpu, hwm, rss


def main() -> int:
    import argparse
    import json
    import subprocess
    import tempfile
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=5.0, help="excluded from the CPU rate (startup, imports)")
    args = ap.parse_args()

    texts = {path: (FIXTURES / name).read_text().encode() for path, (_engine, name) in ENDPOINTS.items()}
    received: list[dict] = []
    scrapes = {"n": 0}
    posts = {"n": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _send(self, code: int, body: bytes, ctype: str):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path in texts:
                scrapes["n"] += 1
                return self._send(200, texts[self.path], "text/plain; version=0.0.4")
            return self._send(404, b"{}", "application/json")

        def do_POST(self):
            import gzip

            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            doc = json.loads(gzip.decompress(body))
            config = {"config_version": 0, "interval_s": 10, "sample_s": 1.0, "targets": []}
            if self.path.endswith("/agent/batches"):  # many intervals a request, each answered (agents 0.3+)
                received.extend(doc["batches"])
                posts["n"] += 1
                reply = {"results": [{"seq": b["seq"], "status": "stored"} for b in doc["batches"]],
                         "config": config}
            else:
                received.append(doc)
                reply = {"seq": doc["seq"], "status": "stored", "config": config}
            self._send(200, json.dumps(reply).encode(), "application/json")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        state.mkdir()
        (state / "credential").write_text("bench-credential\n")
        lines = [f'portal_url = "{base}"', f'state_dir = "{state}"', "interval_s = 10", "sample_s = 1.0",
                 'hostname = "bench-node"']
        for path, (engine, _name) in ENDPOINTS.items():
            lines += ["[[targets]]", f'url = "{base}{path}"', f'engine = "{engine}"']
        config = Path(tmp) / "agent.toml"
        config.write_text("\n".join(lines) + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENMILL_AGENT_")}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "benchmarks")])
        env["TOKENMILL_AGENT_NVML_MODULE"] = "bench_agent:ZeroCostNvml"
        agent = subprocess.Popen([sys.executable, "-m", "agents.cli", "run", "--config", str(config),
                                  "--log-level", "WARNING"], env=env, cwd=tmp, stderr=subprocess.PIPE)
        baseline = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10**6)"], cwd=tmp)
        try:
            time.sleep(args.warmup)
            a0, b0, t0 = proc_stats(agent.pid)[0], proc_stats(baseline.pid)[0], time.monotonic()
            time.sleep(args.seconds)
            a1, a_hwm, a_rss = proc_stats(agent.pid)
            b1, b_hwm, b_rss = proc_stats(baseline.pid)
            elapsed = time.monotonic() - t0
        finally:
            agent.terminate()
            baseline.terminate()
            err = agent.communicate(timeout=20)[1].decode(errors="replace")
            baseline.wait(5)
        server.shutdown()

    a_cpu, b_cpu = (a1 - a0) / elapsed * 100.0, (b1 - b0) / elapsed * 100.0
    a_total = a1  # includes interpreter start-up and imports
    gpus = sum(len(b["gpus"]) for b in received)
    engines = sum(len(b["engines"]) for b in received)

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "n/a"

    print(f"agent overhead, {elapsed:.0f} s measured after {args.warmup:.0f} s warm-up; 8 GPUs @ 1 s (fake NVML), "
          f"4 engine endpoints @ 10 s, loopback portal")
    print(f"{'metric':<34}{'agent':>12}{'baseline':>12}{'ratio':>9}")
    print(f"{'peak RSS (VmHWM), MB':<34}{a_hwm / 1024:>12.1f}{b_hwm / 1024:>12.1f}{ratio(a_hwm, b_hwm):>9}")
    print(f"{'RSS at end (VmRSS), MB':<34}{a_rss / 1024:>12.1f}{b_rss / 1024:>12.1f}{ratio(a_rss, b_rss):>9}")
    print(f"{'CPU, % of one core':<34}{a_cpu:>12.3f}{b_cpu:>12.3f}{'':>9}")
    print(f"{'CPU incl. start-up, s total':<34}{a_total:>12.2f}{b1:>12.2f}{'':>9}")
    print(f"batches received {len(received)} in {posts['n']} posts (GPU records {gpus}, engine records {engines}), "
          f"scrapes {scrapes['n']}")
    ok_rss, ok_cpu = a_hwm / 1024 < 40.0, a_cpu < 0.5
    print(f"goal RSS < 40 MB: {'met' if ok_rss else 'NOT met'}; goal CPU < 0.5% of a core: "
          f"{'met' if ok_cpu else 'NOT met'}")
    if "Traceback" in err:
        print(err, file=sys.stderr)
        return 1
    return 0 if received else 1


if __name__ == "__main__":
    sys.exit(main())
