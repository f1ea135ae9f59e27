"""Ingest benchmark: simulated nodes (8 GPUs, 2 engine endpoints each) post a gzipped batch every 10 s to the real
POST /api/v1/agent/ingest, served by gunicorn from a fresh PostgreSQL database, on whatever machine this runs on.

    .venv/bin/python benchmarks/bench_ingest.py [--levels 1000,10000,50000] [--seconds 30] [--phase aligned]
        [--workers N] [--profile 300]

What it does, in one run:

1. Creates a fresh database (default tokenmill_bench; dropped first if it exists), migrates it, and creates one site
   and the largest level's nodes in bulk: each node ONLINE with a credential, its 8 GPUs, 2 serving endpoints and 2
   scrape targets, i.e. the steady state after a node's first batch (so every level measures the steady-state path).
2. Starts gunicorn (portal.wsgi) on a free loopback port with DEBUG=0 and the ingest rate limit raised out of the way
   (locmem cache, no Redis round trips): cores + 1 sync workers by default, 3 on 2 cores (--workers, --worker-class);
   and the store worker (manage.py store_batches), which writes accepted batches into the telemetry tiers.
3. For each level (GPUs -> GPUs/8 nodes) runs an OPEN-LOOP schedule: node i posts every 10 s at phase i*10/N s
   (``--phase aligned`` instead sends every node at the same wall-clock boundary, as the real agent does). Bodies are
   built before the level starts (interval_end = scheduled send time, seq rising per node), so the generator only
   does HTTP while it is measured. Latency runs from the SCHEDULED send time to the end of the response, so a
   backlog shows as growing latency and an achieved rate below target. Warm-up seconds are excluded; what is still
   unsent or unanswered when the grace period ends counts as unsent (latency infinite). The store worker's queue is
   sampled throughout: a queue that grows over the measured window is a backlog too; accepted -> stored delays of
   the window's batches come from their received_at and stored_at.
4. Stops gunicorn and the store worker and, in this process, compares the store step with a raw COPY: the accept
   step (portal.telemetry.services.batch_accept on pre-validated BatchIn objects, distinct nodes and seqs, one
   transaction each, as the view calls it) and the store worker's flushes (batches_store) versus psycopg COPY of the
   appended rows (IngestedBatch + GpuSample + UsageSample) into the same real tables (indexes, constraints and FK
   triggers included), once with one transaction per batch and once as one bulk COPY.
5. Prints the tables, stops gunicorn and drops the database even on error or Ctrl-C.

CPU shares (client / gunicorn / postgres / idle) are read from /proc over each measured window, as a share of the
whole machine (all cores = 100 %), so a generator that starves the server on a small machine is visible.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import itertools
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin" if (REPO / ".venv" / "bin" / "gunicorn").exists() else Path(sys.executable).parent
INGEST_PATH = "/api/v1/agent/ingest"
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


def batch_body(doc: dict) -> bytes:
    """As the agent's spool writes it: compact JSON, gzip level 6."""
    return gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), compresslevel=6, mtime=0)


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
    server: float  # gunicorn (master and workers) and the store worker
    postgres: float
    total: float  # all CPUs, jiffies
    idle: float


def cpu_sample(server_pids: set[int]) -> CpuSample:
    me = os.getpid()
    client = server = pg = 0.0
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
        elif comm == "postgres":
            pg += ticks + reaped
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    return CpuSample(client, server, pg, float(sum(values[:8])), float(values[3] + values[4]))


def cpu_shares(a: CpuSample, b: CpuSample) -> dict[str, float]:
    total = max(1.0, b.total - a.total)
    shares = {"client": b.client - a.client, "server": b.server - a.server,
              "postgres": b.postgres - a.postgres, "idle": b.idle - a.idle}
    shares = {k: 100.0 * v / total for k, v in shares.items()}
    shares["other"] = max(0.0, 100.0 - sum(shares.values()))
    return shares


# --------------------------------------------------------------------------------------------------- gunicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gunicorn(env: dict, port: int, args: argparse.Namespace, log_path: Path) -> subprocess.Popen:
    cmd = [str(BIN / "gunicorn"), "portal.wsgi", "--bind", f"127.0.0.1:{port}", "--workers", str(args.workers),
           "--worker-class", args.worker_class, "--backlog", "4096", "--timeout", "120", "--log-level", "warning"]
    if args.worker_class == "gthread":
        cmd += ["--threads", str(args.threads)]
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


def start_store_worker(env: dict, log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "manage.py", "store_batches"], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def pending_batches(db_url: str) -> int:
    import psycopg

    with psycopg.connect(db_url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM telemetry_ingestedbatch WHERE stored_at IS NULL").fetchone()[0]


# --------------------------------------------------------------------------------------------------- load levels


@dataclass
class LevelResult:
    gpus: int
    nodes: int
    target: float
    sent: int = 0  # sends started in the measured window
    achieved: float = 0.0  # 2xx responses completed in the measured window, per second
    p50: float = math.inf
    p99: float = math.inf
    p50_first: float = math.inf
    p50_last: float = math.inf
    lag_p99: float = 0.0  # how late the generator started sends (scheduled -> actual), when not backlogged
    non2xx: int = 0
    statuses: dict = field(default_factory=dict)
    unsent: int = 0
    backlog: bool = False
    cpu: dict = field(default_factory=dict)
    ts_lag: float = 0.0
    queue_start: int = 0  # accepted batches waiting for the store worker, at the start of the measured window
    queue_end: int = 0  # ... and at its end
    queue_max: int = 0
    drain_s: float = 0.0  # after the last send, until the queue was empty
    stored_p50: float = math.inf  # accepted -> stored, batches received in the measured window
    stored_p99: float = math.inf
    store_backlog: bool = False


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.inf
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def run_level(gpus: int, fleet: list[NodeSpec], port: int, server_pids: set[int], args: argparse.Namespace,
              rng: random.Random, db_url: str) -> LevelResult:
    n_nodes = gpus // GPUS_PER_NODE
    nodes = fleet[:n_nodes]
    total = args.warmup + args.seconds
    age_last_seen()
    schedule = []
    for i in range(n_nodes):
        phase = 0.0 if args.phase == "aligned" else i * INTERVAL_S / n_nodes
        k = 0
        while phase + k * INTERVAL_S < total:
            schedule.append((phase + k * INTERVAL_S, i))
            k += 1
    schedule.sort()
    # Build every body first, stamped with its scheduled send time (interval_end): estimate the build time, so
    # the stamps are "now" when sent.
    probe_start = time.perf_counter()
    for _ in range(20):
        batch_body(batch_doc(nodes[0], 1, time.time(), rng))
    per_body = (time.perf_counter() - probe_start) / 20
    t0_wall = time.time() + len(schedule) * per_body * 1.3 + 1.0
    offsets, bodies, creds = [], [], []
    for offset, i in schedule:
        spec = nodes[i]
        spec.seq += 1
        offsets.append(offset)
        bodies.append(batch_body(batch_doc(spec, spec.seq, t0_wall + offset, rng)))
        creds.append(spec.credential)
    start = time.monotonic() + max(0.2, t0_wall - time.time())
    ts_lag = max(0.0, time.time() + (start - time.monotonic()) - t0_wall)  # body stamps behind the schedule by

    n = len(offsets)
    sent_at: list[float | None] = [None] * n
    done_at: list[float | None] = [None] * n
    status: list[int | None] = [None] * n
    cursor = {"next": 0}
    lock, stop = threading.Lock(), threading.Event()
    deadline = start + total + args.grace

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=args.timeout)
        while not stop.is_set():
            with lock:
                i = cursor["next"]
                cursor["next"] += 1
            if i >= n:
                break
            delay = start + offsets[i] - time.monotonic()
            if delay > 0 and stop.wait(delay):
                break
            if time.monotonic() > deadline:
                break
            headers = {"Authorization": f"Bearer {creds[i]}", "Content-Type": "application/json",
                       "Content-Encoding": "gzip", "User-Agent": "tokenmill-bench"}
            sent_at[i] = time.monotonic()
            try:
                conn.request("POST", INGEST_PATH, body=bodies[i], headers=headers)
                response = conn.getresponse()
                response.read()
                code = response.status
            except (OSError, http.client.HTTPException):
                code = -1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=args.timeout)
            done_at[i] = time.monotonic()
            status[i] = code
        conn.close()

    queue: list[tuple[float, int]] = []

    def watch_queue() -> None:
        import psycopg

        with psycopg.connect(db_url, autocommit=True) as conn:
            while not stop.is_set():
                n = conn.execute("SELECT count(*) FROM telemetry_ingestedbatch WHERE stored_at IS NULL").fetchone()[0]
                queue.append((time.monotonic(), n))
                stop.wait(0.5)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.clients)]
    watcher = threading.Thread(target=watch_queue, daemon=True)
    for t in [*threads, watcher]:
        t.start()
    try:
        time.sleep(max(0.0, start + args.warmup - time.monotonic()))
        cpu_a = cpu_sample(server_pids)
        window_wall = (time.time(), time.time() + args.seconds)
        time.sleep(max(0.0, start + total - time.monotonic()))
        cpu_b = cpu_sample(server_pids)
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(args.timeout + 5)
        watcher.join(5)

    result = LevelResult(gpus=gpus, nodes=n_nodes, target=n_nodes / INTERVAL_S, cpu=cpu_shares(cpu_a, cpu_b),
                         ts_lag=ts_lag)
    drain_from = time.monotonic()
    while pending_batches(db_url) and time.monotonic() < drain_from + 120:
        time.sleep(0.2)
    result.drain_s = time.monotonic() - drain_from
    in_measured = [n for t, n in queue if start + args.warmup <= t < start + total]
    if in_measured:
        result.queue_start, result.queue_end, result.queue_max = in_measured[0], in_measured[-1], max(in_measured)
    import psycopg

    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d), percentile_cont(0.99) WITHIN GROUP (ORDER BY d), "
            "count(*) FILTER (WHERE d IS NULL) FROM (SELECT extract(epoch FROM stored_at - received_at) AS d "
            "FROM telemetry_ingestedbatch WHERE received_at >= to_timestamp(%s) AND received_at < to_timestamp(%s)) x",
            window_wall).fetchone()
    if row[0] is not None and not row[2]:
        result.stored_p50, result.stored_p99 = float(row[0]), float(row[1])
    # A queue that grew by more than two seconds of batches over the window, or one that did not drain: the store
    # worker is falling behind.
    result.store_backlog = (result.queue_end - result.queue_start > 2 * result.target
                            or result.drain_s >= 120 or bool(row[2]))
    w0, w1 = start + args.warmup, start + total
    in_window = [i for i in range(n) if args.warmup <= offsets[i] < total]
    latencies = [(done_at[i] - (start + offsets[i])) if done_at[i] is not None else math.inf for i in in_window]
    result.sent = sum(1 for i in in_window if sent_at[i] is not None)
    result.unsent = sum(1 for i in in_window if done_at[i] is None)
    ok = [i for i in range(n) if status[i] is not None and 200 <= status[i] < 300]
    result.achieved = sum(1 for i in ok if w0 <= done_at[i] < w1) / args.seconds
    for i in in_window:
        if status[i] is not None and not 200 <= status[i] < 300:
            result.non2xx += 1
            result.statuses[status[i]] = result.statuses.get(status[i], 0) + 1
    result.p50, result.p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)
    third = max(1, len(latencies) // 3)
    result.p50_first, result.p50_last = percentile(latencies[:third], 0.5), percentile(latencies[-third:], 0.5)
    lags = [sent_at[i] - (start + offsets[i]) for i in in_window if sent_at[i] is not None]
    result.lag_p99 = percentile(lags, 0.99) if lags else 0.0
    growing = result.p50_last > 2 * result.p50_first and result.p50_last - result.p50_first > 0.25
    result.backlog = (result.achieved < 0.95 * result.target or result.unsent > 0 or growing
                      or result.store_backlog)
    return result


# --------------------------------------------------------------------------------------------------- store vs COPY


@dataclass
class StoreResult:
    batches: int
    rows_per_batch: int
    accept: list[float] = field(default_factory=list)  # seconds per round: batch_accept, one transaction each
    store: list[float] = field(default_factory=list)  # the store worker's flushes of the same batches
    copy_per_batch: list[float] = field(default_factory=list)
    copy_bulk: list[float] = field(default_factory=list)
    cpu: dict = field(default_factory=dict)


def compare_store_vs_copy(fleet: list[NodeSpec], db_url: str, args: argparse.Namespace,
                          rng: random.Random) -> StoreResult:
    import psycopg
    from django.db import connection
    from psycopg import sql

    from portal.fleet.models import Gpu, NodeCredential, ServingEndpoint
    from portal.telemetry.models import GpuSample, IngestedBatch, UsageSample
    from portal.telemetry.schemas import BatchIn
    from portal.telemetry.services import batch_accept
    from portal.telemetry.store import batches_store

    nodes = fleet[:min(args.store_batches, len(fleet))]
    ids = [spec.pk for spec in nodes]
    gpu_ids = dict(Gpu.objects.filter(node_id__in=ids).values_list("uuid", "pk"))
    endpoint_ids = {(node_id, url, model): pk for pk, node_id, url, model in
                    ServingEndpoint.objects.filter(node_id__in=ids).values_list("pk", "node_id", "url", "model")}
    columns = {
        IngestedBatch: ["node_id", "seq", "digest", "interval_start", "interval_end", "received_at", "gpu_count",
                        "dropped_batches", "stored_at", "store_error"],
        GpuSample: ["gpu_id", "ts", "stored_at", "seconds", "util_mean", "util_max", "mem_util_mean",
                    "memory_used_mib", "power_mean_w", "energy_mj", "temp_max_c", "sm_clock_mhz"],
        UsageSample: ["endpoint_id", "ts", "stored_at", "prompt_tokens", "generation_tokens", "requests_ok",
                      "requests_failed", "probes", "probes_up", "ttft", "itl", "e2e"],
    }
    statements = {
        model: sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(model._meta.db_table),
            sql.SQL(", ").join(sql.Identifier(model._meta.get_field(c).column) for c in cols))
        for model, cols in columns.items()
    }

    def fresh_batches() -> list[BatchIn]:
        now = time.time()
        out = []
        for spec in nodes:
            spec.seq += 1
            out.append(BatchIn.model_validate(batch_doc(spec, spec.seq, now, rng)))
        return out

    def rows_of(spec: NodeSpec, batch: BatchIn) -> dict:
        """The appended rows batch_ingest writes for this batch, as plain tuples (the raw COPY's input)."""
        from datetime import UTC, datetime

        start = datetime.fromtimestamp(batch.interval_start, tz=UTC)
        end = datetime.fromtimestamp(batch.interval_end, tz=UTC)
        now = datetime.now(tz=UTC)
        seconds = batch.interval_end - batch.interval_start
        return {
            IngestedBatch: [(spec.pk, batch.seq, hashlib.sha256(batch.model_dump_json().encode()).hexdigest(), start,
                             end, now, len(batch.gpus), 0, now, "")],
            GpuSample: [(gpu_ids[g.uuid], start, now, seconds, g.util_mean, g.util_max, g.mem_util_mean,
                         g.memory_used_mib, g.power_mean_w, g.energy_mj, g.temp_max_c, g.sm_clock_mhz)
                        for g in batch.gpus],
            UsageSample: [(endpoint_ids[(spec.pk, e.endpoint, e.model)], start, now, e.prompt_tokens,
                           e.generation_tokens, e.requests_ok, e.requests_failed, 1, int(e.up),
                           *(json.dumps(getattr(e, h).model_dump()) if getattr(e, h) else None
                             for h in ("ttft", "itl", "e2e")))
                          for e in batch.engines],
        }

    result = StoreResult(batches=len(nodes), rows_per_batch=1 + GPUS_PER_NODE + len(MODELS))
    cpu_a = cpu_sample(set())
    with psycopg.connect(db_url, autocommit=True) as raw:
        for _ in range(args.rounds):
            # The store step: accepting each batch as the view does (the credential with its node, as NodeBearer
            # returns it), then the store worker's flushes of all of them.
            age_last_seen()
            creds = {c.node_id: c for c in NodeCredential.objects.select_related("node").filter(node_id__in=ids)}
            batches = fresh_batches()
            began = time.perf_counter()
            for spec, batch in zip(nodes, batches, strict=True):
                if batch_accept(credential=creds[spec.pk], batch=batch).status != "stored":
                    raise RuntimeError("accept step did not accept a batch")
            result.accept.append(time.perf_counter() - began)
            began = time.perf_counter()
            while batches_store():
                pass
            result.store.append(time.perf_counter() - began)
            if IngestedBatch.objects.filter(stored_at__isnull=True).exists():
                raise RuntimeError("the store worker left batches behind")

            # Raw COPY of the same kind of rows, one transaction per batch (the store step's transaction grain).
            per_batch = [rows_of(spec, b) for spec, b in zip(nodes, fresh_batches(), strict=True)]
            began = time.perf_counter()
            for rows in per_batch:
                with raw.transaction(), raw.cursor() as cur:
                    for model, statement in statements.items():
                        with cur.copy(statement) as copy:
                            for row in rows[model]:
                                copy.write_row(row)
            result.copy_per_batch.append(time.perf_counter() - began)

            # Raw COPY, all batches in one transaction: what PostgreSQL absorbs for these rows at best.
            bulk = [rows_of(spec, b) for spec, b in zip(nodes, fresh_batches(), strict=True)]
            began = time.perf_counter()
            with raw.transaction(), raw.cursor() as cur:
                for model, statement in statements.items():
                    with cur.copy(statement) as copy:
                        for rows in bulk:
                            for row in rows[model]:
                                copy.write_row(row)
            result.copy_bulk.append(time.perf_counter() - began)
    result.cpu = cpu_shares(cpu_a, cpu_sample(set()))
    connection.close()
    return result


# --------------------------------------------------------------------------------------------------- profile


def profile_requests(fleet: list[NodeSpec], count: int, rng: random.Random) -> None:
    """Where a worker's time goes, in this process (no gunicorn, no network): `count` full requests through Django
    (middleware, auth, validation, accept, response) timed plainly, then the view's stages timed one by one, then a
    cProfile of `count` more requests."""
    import cProfile
    import pstats

    from django.db import connection
    from django.test import Client

    from portal.fleet.services import credential_authenticate
    from portal.telemetry.api import agent_config
    from portal.telemetry.schemas import BatchIn
    from portal.telemetry.services import batch_accept

    nodes = fleet[:count]
    client = Client()

    def bodies() -> list[tuple[str, bytes]]:
        now = time.time()
        out = []
        for spec in nodes:
            spec.seq += 1
            out.append((spec.credential, batch_body(batch_doc(spec, spec.seq, now, rng))))
        return out

    def post(credential: str, body: bytes) -> None:
        response = client.post(INGEST_PATH, data=body, content_type="application/json",
                               headers={"Authorization": f"Bearer {credential}", "Content-Encoding": "gzip"})
        if response.status_code != 200:
            raise RuntimeError(f"profile request failed: {response.status_code} {response.content[:300]!r}")

    age_last_seen()
    post(*bodies()[0])  # first request: URL resolver and imports, not steady state
    statements: list[str] = []

    def capture(execute, sql_text, params, many, context):
        statements.append(sql_text)
        return execute(sql_text, params, many, context)

    with connection.execute_wrapper(capture):
        post(*bodies()[0])
    names = ("gunzip", "validate (BatchIn.model_validate_json)", "authenticate (credential lookup)",
             "accept (batch_accept)", "agent_config")
    full = full_cpu = math.inf
    wall, cpu = dict.fromkeys(names, math.inf), dict.fromkeys(names, math.inf)
    for _ in range(3):  # best of three, against noise from anything else on the machine
        age_last_seen()
        requests = bodies()
        began, cpu_began = time.perf_counter(), time.process_time()
        for credential, body in requests:
            post(credential, body)
        full = min(full, (time.perf_counter() - began) / count)
        full_cpu = min(full_cpu, (time.process_time() - cpu_began) / count)
        age_last_seen()
        round_wall, round_cpu = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
        for credential, body in bodies():
            marks = [(time.perf_counter(), time.process_time())]
            raw = gzip.decompress(body)
            marks.append((time.perf_counter(), time.process_time()))
            batch = BatchIn.model_validate_json(raw)
            marks.append((time.perf_counter(), time.process_time()))
            cred = credential_authenticate(value=credential)
            marks.append((time.perf_counter(), time.process_time()))
            batch_accept(credential=cred, batch=batch)
            marks.append((time.perf_counter(), time.process_time()))
            agent_config(cred.node)
            marks.append((time.perf_counter(), time.process_time()))
            for name, (a, b) in zip(names, itertools.pairwise(marks), strict=True):
                round_wall[name] += (b[0] - a[0]) / count
                round_cpu[name] += (b[1] - a[1]) / count
        for name in names:
            wall[name], cpu[name] = min(wall[name], round_wall[name]), min(cpu[name], round_cpu[name])
    print(f"\nprofile ({count} requests in-process, Django test client, no network; wall ms / CPU ms of this process "
          "per request, best of 3 rounds):")
    print(f"  {'full request':<40} {1000 * full:6.2f} / {1000 * full_cpu:5.2f}   "
          f"({len(statements)} ORM statements per request)")
    for name in names:
        print(f"  {name:<40} {1000 * wall[name]:6.2f} / {1000 * cpu[name]:5.2f}")
    rest_wall, rest_cpu = full - sum(wall.values()), full_cpu - sum(cpu.values())
    print(f"  {'rest (middleware, ninja, response)':<40} {1000 * rest_wall:6.2f} / {1000 * rest_cpu:5.2f}")
    print("  statements of one request:")
    for statement in statements:
        print(f"    {statement[:150]}")

    age_last_seen()
    requests = bodies()
    profiler = cProfile.Profile()
    profiler.enable()
    for credential, body in requests:
        post(credential, body)
    profiler.disable()
    stats = pstats.Stats(profiler)
    print("\ncProfile, project functions by cumulative time:")
    stats.sort_stats("cumulative").print_stats(r"portal/", 25)
    print("cProfile, all functions by own time:")
    stats.sort_stats("tottime").print_stats(20)


# --------------------------------------------------------------------------------------------------- report


def fmt_ms(seconds: float) -> str:
    if math.isinf(seconds):
        return "unanswered"
    return f"{seconds * 1000:,.0f}" if seconds >= 0.1 else f"{seconds * 1000:,.1f}"


def report(levels: list[LevelResult], store: StoreResult | None, args: argparse.Namespace, setup_s: float,
           elapsed: float) -> None:
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"\n## Ingest benchmark: {os.cpu_count()} CPUs, {memory_gib:.0f} GiB, "
          f"gunicorn {args.workers} x {args.worker_class}"
          f"{f' ({args.threads} threads)' if args.worker_class == 'gthread' else ''}, {args.clients} client threads, "
          f"{args.phase} phases, {args.seconds:.0f} s measured after {args.warmup:.0f} s warm-up per level\n")
    print("| GPUs | nodes | target batches/s | achieved batches/s | GPU-samples/s | p50 ms | p99 ms | "
          "p50 first/last third ms | non-2xx | unsent | backlog |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in levels:
        codes = f" {r.statuses}" if r.statuses else ""
        print(f"| {r.gpus:,} | {r.nodes:,} | {r.target:,.1f} | {r.achieved:,.1f} | {r.achieved * GPUS_PER_NODE:,.0f} | "
              f"{fmt_ms(r.p50)} | {fmt_ms(r.p99)} | {fmt_ms(r.p50_first)} / {fmt_ms(r.p50_last)} | "
              f"{r.non2xx}{codes} | {r.unsent:,} | {'YES' if r.backlog else 'no'} |")
    print("\nThe store worker's queue (accepted batches not yet in the telemetry tiers) over each measured window, and "
          "the delay from accept to stored of the window's batches:\n")
    print("| GPUs | queue at start | queue at end | queue max | drained after the level, s | "
          "accept -> stored p50 ms | p99 ms | store backlog |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in levels:
        print(f"| {r.gpus:,} | {r.queue_start:,} | {r.queue_end:,} | {r.queue_max:,} | {r.drain_s:.1f} | "
              f"{fmt_ms(r.stored_p50)} | {fmt_ms(r.stored_p99)} | {'YES' if r.store_backlog else 'no'} |")
    print("\nCPU over each measured window, share of the whole machine (all cores = 100 %):\n")
    cpus = os.cpu_count() or 1
    print("| GPUs | client (load generator) | gunicorn + store worker | postgres | other | idle | "
          "generator send lag p99 ms | server CPU ms/batch |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in levels:
        c = r.cpu
        per_batch = (c["server"] + c["postgres"]) / 100 * cpus / r.achieved * 1000 if r.achieved else math.inf
        print(f"| {r.gpus:,} | {c['client']:.0f} % | {c['server']:.0f} % | {c['postgres']:.0f} % | "
              f"{c['other']:.0f} % | {c['idle']:.0f} % | {fmt_ms(r.lag_p99)} | {per_batch:.1f} |")
    if any(r.ts_lag > 1 for r in levels):
        print("\nnote: body timestamps lagged the schedule by up to "
              f"{max(r.ts_lag for r in levels):.1f} s (body build overran its estimate)")
    if store is not None:
        rows = store.batches * store.rows_per_batch
        seconds = {name: statistics.median(times) for name, times in
                   (("accept", store.accept), ("store", store.store), ("both", [
                       a + b for a, b in zip(store.accept, store.store, strict=True)]),
                    ("per_batch", store.copy_per_batch), ("bulk", store.copy_bulk))}
        rate = {name: rows / t for name, t in seconds.items()}
        print(f"\nStore step vs raw COPY ({store.batches:,} batches x {args.rounds} rounds, median; appended rows = "
              f"{store.rows_per_batch}/batch: 1 IngestedBatch + {GPUS_PER_NODE} GpuSample + {len(MODELS)} UsageSample; "
              "the store worker also upserts 8 Gpu + 2 ServingEndpoint rows per batch and reads):\n")
        print("| path | batches/s | appended rows/s | ms/batch |")
        print("|---|---:|---:|---:|")
        for name, label in (("accept", "accept: batch_accept(), one transaction per batch (the request's part)"),
                            ("store", "store worker: batches_store(), 500 batches per transaction"),
                            ("both", "accept + store worker (every accepted batch in the tiers)"),
                            ("per_batch", "raw COPY, one transaction per batch"),
                            ("bulk", "raw COPY, all rows in one transaction")):
            print(f"| {label} | {rate[name] / store.rows_per_batch:,.0f} | {rate[name]:,.0f} | "
                  f"{1000 * store.rows_per_batch / rate[name]:.2f} |")
        print(f"\nratios: store worker / bulk COPY {rate['store'] / rate['bulk']:.2f}; accept + store worker / "
              f"per-batch COPY {rate['both'] / rate['per_batch']:.2f}")
        c = store.cpu
        print(f"\n(during the comparison: this process {c['client']:.0f} %, postgres {c['postgres']:.0f} %, "
              f"idle {c['idle']:.0f} % of the machine)")
    if levels:
        top = levels[-1]
        capacity = max(r.achieved for r in levels)
        meets = [r for r in levels if not r.backlog and r.p99 < 0.5 and r.non2xx == 0]
        print(f"\nhighest achieved: {capacity:,.1f} batches/s = {capacity * GPUS_PER_NODE:,.0f} GPU-samples/s "
              f"= {capacity * GPUS_PER_NODE * INTERVAL_S:,.0f} GPUs at 10 s resolution")
        saturated = [r for r in levels if r.backlog and r.achieved]
        if saturated:
            r = saturated[0]
            server = (r.cpu["server"] + r.cpu["postgres"]) / 100 * cpus  # cores the server side used
            spare = cpus * (1 - r.cpu["client"] / 100)  # cores left when nothing but the generator shares them
            alone = r.achieved / server * spare if server else 0.0
            print(f"at saturation ({r.gpus:,} GPUs) the server side used {server:.2f} of {cpus} cores "
                  f"({r.cpu['other']:.0f} % of the machine went to other work); at the same CPU cost per batch, the "
                  f"whole machine would absorb about {alone:,.0f} batches/s = {alone * GPUS_PER_NODE * INTERVAL_S:,.0f}"
                  " GPUs")
        print(f"largest level with p99 < 500 ms, no backlog, no errors: "
              f"{f'{meets[-1].gpus:,} GPUs' if meets else 'none'}")
        goal = top.gpus >= 50_000 and top in meets
        print(f"goal (50,000 GPUs at 10 s, p99 < 500 ms, no backlog): {'met' if goal else 'NOT met'}")
    if store is not None:
        verdict = {"store worker vs bulk COPY": rate["store"] >= 0.5 * rate["bulk"],
                   "accept + store worker vs per-batch COPY": rate["both"] >= 0.5 * rate["per_batch"]}
        print("goal (store step >= 0.5 x raw COPY rate): " + ", ".join(
            f"{name} {'met' if ok else 'NOT met'}" for name, ok in verdict.items()))
    print(f"\nsetup {setup_s:.0f} s, total {elapsed:.0f} s")


# --------------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="1000,10000,50000", help="GPU counts, comma separated (8 GPUs a node)")
    ap.add_argument("--seconds", type=float, default=30.0, help="measured seconds per level")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds per level before measuring")
    ap.add_argument("--grace", type=float, default=10.0, help="seconds after the schedule to drain in-flight sends")
    ap.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout per request")
    ap.add_argument("--phase", choices=("spread", "aligned"), default="spread",
                    help="spread: node i at i*10/N s; aligned: every node on the 10 s boundary (the real agent)")
    ap.add_argument("--workers", type=int, default=(os.cpu_count() or 1) + 1,
                    help="gunicorn workers (default cores + 1: a request is ~80 %% CPU in the worker, so one more than "
                         "the cores covers its PostgreSQL waits; on 2 cores 3 and 4 sync workers measured alike, 6 and "
                         "gthread 2x4 lower)")
    ap.add_argument("--worker-class", default="sync", choices=("sync", "gthread"))
    ap.add_argument("--threads", type=int, default=4, help="threads per gthread worker")
    ap.add_argument("--clients", type=int, default=64, help="load-generator threads (max concurrent requests)")
    ap.add_argument("--store-batches", type=int, default=1000, help="batches per round in the store-vs-COPY test")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the store-vs-COPY test")
    ap.add_argument("--skip-http", action="store_true", help="only the store-vs-COPY comparison")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also cProfile N in-process ingest requests (Django test client) and print the hot spots")
    ap.add_argument("--pg-admin-url", default=os.environ.get("BENCH_PG_ADMIN_URL",
                                                           "postgresql://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--db", default="tokenmill_bench", help="database to create (and drop at the end)")
    args = ap.parse_args()
    levels = sorted(int(x) for x in args.levels.split(",") if x.strip())
    n_nodes = max(max(levels) // GPUS_PER_NODE, args.store_batches, args.profile)

    before = cpu_sample(set())
    time.sleep(2.0)
    busy = 100.0 - cpu_shares(before, cpu_sample(set()))["idle"]
    print(f"machine: {os.cpu_count()} CPUs; {busy:.0f} % busy before starting"
          f"{' (other work is running: the numbers below share the CPUs with it)' if busy > 10 else ''}", flush=True)
    began = time.monotonic()
    db_url = db_urls(args.pg_admin_url, args.db)
    var_dir = Path(tempfile.mkdtemp(prefix="tokenmill-bench-"))
    env = {k: v for k, v in os.environ.items() if k not in ("CACHE_URL", "CELERY_BROKER_URL", "TOKENMILL_PRODUCTION")}
    env.update({
        "DATABASE_URL": db_url, "DJANGO_SETTINGS_MODULE": "portal.settings", "DEBUG": "0",
        "TOKENMILL_VAR_DIR": str(var_dir), "SECRET_KEY": os.urandom(32).hex(), "LOG_LEVEL": "WARNING",
        # Out of the way: every node posts 6 a minute, far below it; locmem cache (no Redis round trips).
        "INGEST_MAX_BATCHES_PER_MINUTE": "1000000", "CELERY_TASK_ALWAYS_EAGER": "0",
    })
    os.environ.clear()
    os.environ.update(env)
    sys.path.insert(0, str(REPO))

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # also when started in the background, where SIGINT is ignored
    gunicorn = store_worker = None
    created = False
    results: list[LevelResult] = []
    store = None
    try:
        create_database(args.pg_admin_url, args.db)
        created = True
        subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=REPO, env=env, check=True)
        import django

        django.setup()
        rng = random.Random(42)
        fleet = setup_fleet(n_nodes)
        setup_s = time.monotonic() - began
        print(f"setup: database {args.db}, {n_nodes:,} nodes / {n_nodes * GPUS_PER_NODE:,} GPUs with credentials "
              f"in {setup_s:.0f} s", flush=True)
        if not args.skip_http:
            port = free_port()
            gunicorn = start_gunicorn(env, port, args, var_dir / "gunicorn.log")
            store_worker = start_store_worker(env, var_dir / "store.log")
            for gpus in levels:
                print(f"level {gpus:,} GPUs ...", flush=True)
                result = run_level(gpus, fleet, port, {gunicorn.pid, store_worker.pid}, args, rng, db_url)
                results.append(result)
                print(f"  achieved {result.achieved:,.1f}/{result.target:,.1f} batches/s, p50 {fmt_ms(result.p50)} ms, "
                      f"p99 {fmt_ms(result.p99)} ms, unsent {result.unsent}, non-2xx {result.non2xx}, store queue "
                      f"{result.queue_start}->{result.queue_end}, accept->stored p99 {fmt_ms(result.stored_p99)} ms",
                      flush=True)
            stop_process(gunicorn)
            stop_process(store_worker)
            gunicorn = store_worker = None
        print("store step vs raw COPY ...", flush=True)
        store = compare_store_vs_copy(fleet, db_url, args, rng)
        report(results, store, args, setup_s, time.monotonic() - began)
        if args.profile:
            profile_requests(fleet, args.profile, rng)
        for log in (var_dir / "gunicorn.log", var_dir / "store.log"):
            if log.exists() and "Traceback" in log.read_text():
                print(f"\n{log.name} has tracebacks:\n{log.read_text()[-4000:]}", file=sys.stderr)
        return 0 if all(r.achieved > 0 for r in results) else 1
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        stop_process(gunicorn)
        stop_process(store_worker)
        if "django" in sys.modules:
            from django.db import connections

            connections.close_all()
        if created:
            drop_database(args.pg_admin_url, args.db)
        shutil.rmtree(var_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
