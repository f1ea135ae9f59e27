"""The ingest benchmark's fleet and machinery: node specs and their batch bodies, the benchmark database,
CPU accounting from /proc, gunicorn and the store worker as processes (used by bench_ingest.py)."""


import argparse
import gzip
import http.client
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin" if (REPO / ".venv" / "bin" / "gunicorn").exists() else Path(sys.executable).parent
INGEST_PATH, BATCHES_PATH = "/api/v1/agent/ingest", "/api/v1/agent/batches"
GPUS_PER_NODE = 8
INTERVAL_S = 10.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

HOST_FACTS = {
    "os": "Ubuntu 22.04.4 LTS", "kernel": "5.15.0-105-generic", "driver_version": "550.54.15",
    "cuda_driver_version": "12.4", "nvml_version": "12.550.54.15", "agent_version": "0.1.0",
}
MODELS = ("meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-32B-Instruct")
ENGINE_SETTINGS = {"block_size": "16", "cache_dtype": "auto", "gpu_memory_utilization": "0.9",
                   "enable_prefix_caching": "True"}
# vLLM-like bucket bounds, 11 finite bounds each (12 cumulative counts with +Inf).
TTFT_LE = [0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0]
ITL_LE = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75]
E2E_LE = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0]


# --------------------------------------------------------------------------------------------------- payloads


@dataclass
class NodeSpec:
    pk: int
    hostname: str
    credential: str
    gpu_uuids: list[str]
    endpoints: list[str]  # urls; MODELS[j] is served at endpoints[j]
    base_util: float
    seq: int = 0


def _histogram(rng: random.Random, le: list[float], n: int, median: float, sigma: float = 0.6) -> dict:
    """Cumulative counts of n log-normal observations (from the CDF, so the shape is realistic and cheap)."""
    mu = math.log(median * rng.uniform(0.85, 1.15))
    counts = [round(n * 0.5 * (1 + math.erf((math.log(b) - mu) / (sigma * math.sqrt(2))))) for b in le] + [n]
    return {"le": le, "counts": counts, "sum": round(n * math.exp(mu + sigma * sigma / 2), 3)}


def batch_doc(spec: NodeSpec, seq: int, end: float, rng: random.Random) -> dict:
    gpus = []
    for index, uuid in enumerate(spec.gpu_uuids):
        util = min(100.0, max(0.0, spec.base_util + rng.gauss(0, 6)))
        power = min(700.0, 70.0 + (651.0 - 70.0) * (util / 100.0) ** 0.85 + rng.gauss(0, 6))
        gpus.append({
            "uuid": uuid, "index": index, "name": "NVIDIA H100 80GB HBM3",
            "pci_bus_id": f"00000000:{index + 0x18:02X}:00.0",
            "samples": 10, "util_mean": round(util, 2), "util_max": round(min(100.0, util + rng.uniform(0, 8)), 2),
            "mem_util_mean": round(util * 0.4, 2), "memory_used_mib": 70000 + rng.randrange(4000),
            "memory_total_mib": 81559, "power_mean_w": round(power, 2), "power_limit_w": 700.0,
            "energy_mj": int(power * INTERVAL_S * 1000), "temp_max_c": round(45 + util * 0.3, 1),
            "sm_clock_mhz": 1980, "mem_clock_mhz": 2619, "throttle_reasons": [], "ecc_corrected_total": 0,
            "ecc_uncorrected_total": 0, "retired_pages": 0, "remapped_rows_pending": False,
            "remapped_rows_failure": False, "mig_mode": False, "mig_instances": [],
        })
    engines = []
    for url, model in zip(spec.endpoints, MODELS, strict=True):
        requests = rng.randint(20, 80)
        prompt, generation = requests * rng.randint(600, 1400), requests * rng.randint(150, 350)
        engines.append({
            "endpoint": url, "engine": "vllm", "model": model, "up": True,
            "probe_latency_ms": round(rng.uniform(1.5, 6.0), 2), "version": "0.6.3", "prompt_tokens": prompt,
            "generation_tokens": generation, "requests_ok": requests, "requests_failed": 0,
            "running": float(rng.randint(4, 32)), "waiting": float(rng.randint(0, 4)),
            "kv_cache_usage": round(rng.uniform(0.2, 0.9), 3),
            "ttft": _histogram(rng, TTFT_LE, requests, 0.12), "itl": _histogram(rng, ITL_LE, generation, 0.03),
            "e2e": _histogram(rng, E2E_LE, requests, 4.0), "settings": ENGINE_SETTINGS,
        })
    return {
        "schema_version": 1, "seq": seq, "interval_start": round(end - INTERVAL_S, 3), "interval_end": round(end, 3),
        "host": {"hostname": spec.hostname, **HOST_FACTS, "simulated": False},
        "gpus": gpus, "engines": engines, "events": [], "dropped_batches": 0,
    }


def request_body(docs: list[dict], contract: str) -> bytes:
    """As the agent sends it: one interval (single) or the envelope of several (multi), compact JSON, gzip 6."""
    payload = docs[0] if contract == "single" else {"schema_version": 1, "batches": docs}
    return gzip.compress(json.dumps(payload, separators=(",", ":")).encode(), compresslevel=6, mtime=0)


# --------------------------------------------------------------------------------------------------- database


def db_urls(admin_url: str, name: str) -> str:
    parts = urlsplit(admin_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def create_database(admin_url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(admin_url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def setup_fleet(n_nodes: int) -> list[NodeSpec]:
    """The steady state after every node's first batch, created in bulk: nodes ONLINE with a credential, their GPUs,
    endpoints and scrape targets, host facts equal to what the batches report (so no host-fact writes)."""
    from decimal import Decimal

    from django.utils import timezone

    from portal.fleet.models import Gpu, Node, NodeCredential, NodeStatus, ScrapeTarget, ServingEndpoint, Site
    from portal.fleet.services import CREDENTIAL_KIND
    from portal.keys import issue_key

    rng = random.Random(7)
    now = timezone.now()
    site = Site.objects.create(name="Bench", slug="bench", gpu_capex=Decimal("30000.00"),
                               energy_price_kwh=Decimal("0.1200"), other_opex_gpu_hour=Decimal("0.25"))
    nodes = Node.objects.bulk_create(
        [Node(site=site, hostname=f"bench-{i:05d}", status=NodeStatus.ONLINE, last_seen=now, **HOST_FACTS)
         for i in range(n_nodes)], batch_size=2000)
    keys = [issue_key(kind=CREDENTIAL_KIND) for _ in nodes]
    NodeCredential.objects.bulk_create(
        [NodeCredential(node=node, prefix=key.prefix, digest=key.digest)
         for node, key in zip(nodes, keys, strict=True)],
        batch_size=2000)
    specs, gpus, endpoints, targets = [], [], [], []
    for i, (node, key) in enumerate(zip(nodes, keys, strict=True)):
        uuids = [f"GPU-{i:08x}-{g:04x}-4{rng.randrange(4096):03x}-8000-{rng.randrange(16**12):012x}"
                 for g in range(GPUS_PER_NODE)]
        urls = [f"http://10.{i // 256 % 256}.{i % 256}.{j + 1}:8000/metrics" for j in range(len(MODELS))]
        gpus += [Gpu(node=node, uuid=uuid, index=g, name="NVIDIA H100 80GB HBM3",
                     pci_bus_id=f"00000000:{g + 0x18:02X}:00.0", memory_total_mib=81559, power_limit_w=700.0,
                     current_at=now) for g, uuid in enumerate(uuids)]
        endpoints += [ServingEndpoint(node=node, url=url, model=model, engine="vllm", version="0.6.3",
                                      settings=ENGINE_SETTINGS, up=True, last_seen=now)
                      for url, model in zip(urls, MODELS, strict=True)]
        targets += [ScrapeTarget(node=node, url=url, engine="vllm", model=model)
                    for url, model in zip(urls, MODELS, strict=True)]
        specs.append(NodeSpec(pk=node.pk, hostname=node.hostname, credential=key.value, gpu_uuids=uuids,
                              endpoints=urls, base_util=rng.uniform(20, 95)))
    Gpu.objects.bulk_create(gpus, batch_size=5000)
    ServingEndpoint.objects.bulk_create(endpoints, batch_size=5000)
    ScrapeTarget.objects.bulk_create(targets, batch_size=5000)
    return specs


def age_last_seen() -> None:
    """Spread last_seen over the past minute, as in steady state: about one batch in six then writes it (the
    portal updates last_seen at most once a minute per node)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("UPDATE fleet_node SET last_seen = now() - random() * interval '60 seconds'")
        cursor.execute("ANALYZE")


# --------------------------------------------------------------------------------------------------- CPU accounting


@dataclass
class CpuSample:
    client: float
    server: float  # gunicorn (master and workers) and the store workers
    store: float  # of which the store workers
    postgres: float  # and redis-server
    total: float  # all CPUs, jiffies
    idle: float


def cpu_sample(server_pids: set[int]) -> CpuSample:
    me = os.getpid()
    client = server = store = pg = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                raw = fh.read()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        pid, ppid, ticks = int(entry), int(fields[1]), int(fields[11]) + int(fields[12])
        reaped = int(fields[13]) + int(fields[14])  # children that exited (backends closed at CONN_MAX_AGE)
        if pid == me:
            client += ticks
        elif pid in server_pids or ppid in server_pids:
            server += ticks + (reaped if pid in server_pids else 0)
            if not comm.startswith("gunicorn"):  # manage.py store_batches
                store += ticks + (reaped if pid in server_pids else 0)
        elif comm in ("postgres", "redis-server"):  # the portal's databases: rows, and the rate-limit counters
            pg += ticks + reaped
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    return CpuSample(client, server, store, pg, float(sum(values[:8])), float(values[3] + values[4]))


def cpu_shares(a: CpuSample, b: CpuSample) -> dict[str, float]:
    total = max(1.0, b.total - a.total)
    shares = {"client": b.client - a.client, "server": b.server - a.server,
              "postgres": b.postgres - a.postgres, "idle": b.idle - a.idle}
    shares = {k: 100.0 * v / total for k, v in shares.items()}
    shares["other"] = max(0.0, 100.0 - sum(shares.values()))
    shares["store"] = 100.0 * (b.store - a.store) / total  # part of "server"
    shares["web"] = shares["server"] - shares["store"]
    return shares


# --------------------------------------------------------------------------------------------------- gunicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gunicorn(env: dict, port: int, args: argparse.Namespace, log_path: Path) -> subprocess.Popen:
    cmd = [str(BIN / "gunicorn"), "portal.wsgi", "--bind", f"127.0.0.1:{port}", "--workers", str(args.workers),
           "--worker-class", args.worker_class, "--backlog", "4096", "--timeout", "120", "--log-level", "warning"]
    if args.worker_class == "gthread":  # sync workers close every connection after its answer
        cmd += ["--threads", str(args.threads), "--keep-alive", str(args.keep_alive)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text()[-3000:]
            raise RuntimeError(f"gunicorn exited with {proc.returncode}; see {log_path}:\n{tail}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return proc
            conn.close()
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"gunicorn did not become ready; see {log_path}")


def stop_process(proc: subprocess.Popen | None) -> None:
    """SIGTERM to a server started in its own session (gunicorn with its workers, the store worker)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the master and its workers only
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def start_store_workers(env: dict, log_path: Path, count: int = 1) -> list[subprocess.Popen]:
    """`count` store workers (manage.py store_batches); several share the queue, each skipping what another
    holds."""
    with open(log_path, "ab") as log:
        return [subprocess.Popen([sys.executable, "manage.py", "store_batches"], cwd=REPO, env=env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True) for _ in range(count)]


def pending_batches(db_url: str) -> int:
    import psycopg

    with psycopg.connect(db_url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM telemetry_ingestedbatch WHERE stored_at IS NULL").fetchone()[0]

