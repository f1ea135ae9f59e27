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
import http.client
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ingest_fleet import (
    GPUS_PER_NODE,
    INGEST_PATH,
    INTERVAL_S,
    MODELS,
    REPO,
    NodeSpec,
    age_last_seen,
    batch_body,
    batch_doc,
    cpu_sample,
    cpu_shares,
    create_database,
    db_urls,
    drop_database,
    free_port,
    pending_batches,
    setup_fleet,
    start_gunicorn,
    start_store_worker,
    stop_process,
)
from ingest_store import StoreResult, compare_store_vs_copy, profile_requests

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
