"""Raw-history benchmark: does storing a batch, or a dashboard's read of the raw tiers, cost more with 30 days of raw
history than with 1? On a fresh PostgreSQL database, on whatever machine this runs on.

    .venv/bin/python benchmarks/ingest_history.py [--nodes 100] [--days 30] [--spacing 120] [--rounds 9]
        [--queries 40] [--no-plain]

1. Creates tokenmill_history, migrated (GpuSample and UsageSample partitioned by UTC day, migration 0004), with
   NODES nodes of 8 GPUs and 2 serving endpoints each (ingest_fleet.setup_fleet). As the baseline, the same again in
   tokenmill_history_plain with migration 0004 unapplied (plain tables). Each database is measured in a process of
   its own, one after the other.
2. Fills the last day of raw history in SQL (INSERT ... SELECT over generate_series, one statement per UTC day):
   a GpuSample row for every GPU and a UsageSample row (with its histograms) for every endpoint, every 10 s (the
   agent's interval) over the last hour and every SPACING seconds before it, all stored and rolled up. At 120 s
   the history has 12x fewer rows than production's, so that 30 days fill in minutes; the output says so. The
   partitioned database gets the day partitions the beat would have made for those days. The fill skips the
   foreign-key checks (session_replication_role; the ids are the fleet's own). ANALYZE, then measures:
   - insert: ROUNDS rounds of one fresh batch per node, accepted (batch_accept) beforehand, then stored by the
     store worker's step (telemetry.store.batches_store: the GpuSample and UsageSample COPY with the rest of the
     flush), timed: ms per GPU sample, median over the rounds (after a warm-up round).
   - queries: the node page's raw tier over its last hour (telemetry.selectors.node_series, range "1h") and the live
     tokens/s (economics.selectors.tokens_per_second_now), as at the end of the history so that every measurement
     reads the same rows, QUERIES times each across the nodes: median ms.
3. Fills the other DAYS-1 days the same way, ANALYZE, and measures again.
4. Prints the table and the goal line (the partitioned database's ratios; the worse of the two queries), and drops
   both databases, even on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ingest_fleet import (
    GPUS_PER_NODE,
    MODELS,
    REPO,
    batch_doc,
    cpu_sample,
    cpu_shares,
    create_database,
    db_urls,
    drop_database,
    setup_fleet,
)

DB = "tokenmill_history"
GOAL = 1.2
QUERIES = ("node page, raw tier, last hour", "live tokens/s")
# One histogram delta as the agent reports it, so history rows are as wide as stored ones.
HISTOGRAM = json.dumps({"le": [0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0],
                        "counts": [0, 1, 4, 12, 20, 38, 45, 48, 49, 50, 50, 50], "sum": 6.21})
GPU_FILL = """
INSERT INTO telemetry_gpusample (ts, stored_at, seconds, util_mean, util_max, mem_util_mean, memory_used_mib,
                                 power_mean_w, energy_mj, temp_max_c, sm_clock_mhz, gpu_id)
SELECT t, t + interval '10 seconds', %(spacing)s, u, LEAST(100, u + 4), u * 0.4, 70000 + u * 10, 70 + u * 5.8,
       ((70 + u * 5.8) * %(spacing)s * 1000)::bigint, 45 + u * 0.3, 1980, g
FROM generate_series(%(lo)s::timestamptz, %(hi)s::timestamptz - interval '1 microsecond',
                     make_interval(secs => %(spacing)s)) AS t
CROSS JOIN unnest(%(ids)s::bigint[]) AS g
CROSS JOIN LATERAL (SELECT ((g * 37 + extract(epoch FROM t)::bigint / 60) %% 100)::float8 AS u) AS r
ORDER BY t, g
"""
USAGE_FILL = """
INSERT INTO telemetry_usagesample (ts, stored_at, prompt_tokens, generation_tokens, requests_ok, requests_failed,
                                   probes, probes_up, ttft, itl, e2e, endpoint_id)
SELECT t, t + interval '10 seconds', 40000 + e %% 1000, 10000, 40, 0, 1, 1, %(h)s::jsonb, %(h)s::jsonb,
       %(h)s::jsonb, e
FROM generate_series(%(lo)s::timestamptz, %(hi)s::timestamptz - interval '1 microsecond',
                     make_interval(secs => %(spacing)s)) AS t
CROSS JOIN unnest(%(ids)s::bigint[]) AS e
ORDER BY t, e
"""


# --------------------------------------------------------------------------------------------------- one database


def _day_bounds(lo: datetime, hi: datetime) -> list[tuple[datetime, datetime]]:
    """[lo, hi) cut at UTC midnights: one INSERT per day, a transaction of a day's rows each."""
    cuts, day = [], datetime(lo.year, lo.month, lo.day, tzinfo=UTC)
    while day < hi:
        cuts.append((max(lo, day), min(hi, day + timedelta(days=1))))
        day += timedelta(days=1)
    return cuts


def fill(*, lo: datetime, hi: datetime, spacing: int, partitioned: bool) -> int:
    """Raw history over [lo, hi) for every GPU and endpoint; returns the rows written."""
    from django.db import connection

    from portal.fleet.models import Gpu, ServingEndpoint
    from portal.telemetry.partitions import raw_partitions_ensure

    if partitioned:
        ensured = raw_partitions_ensure(days=[a.date() for a, _b in _day_bounds(lo, hi)])
        if ensured.busy:
            raise RuntimeError(f"partitions not made: {ensured.busy}")
    gpus = list(Gpu.objects.order_by("pk").values_list("pk", flat=True))
    endpoints = list(ServingEndpoint.objects.order_by("pk").values_list("pk", flat=True))
    rows = 0
    with connection.cursor() as cursor:
        # The ids are the fleet's own: skipping the foreign-key checks of history rows shortens the fill.
        cursor.execute("SET session_replication_role = replica")
        for a, b in _day_bounds(lo, hi):
            params = {"lo": a, "hi": b, "spacing": spacing, "h": HISTOGRAM}
            cursor.execute(GPU_FILL, {**params, "ids": gpus})
            rows += cursor.rowcount
            cursor.execute(USAGE_FILL, {**params, "ids": endpoints})
            rows += cursor.rowcount
        cursor.execute("RESET session_replication_role")
    return rows


def analyze() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")


def raw_size_mb() -> float:
    from django.db import connection

    with connection.cursor() as cursor:
        # The tables holding rows: the plain ones, or the partitions (a partitioned parent holds none).
        cursor.execute("SELECT sum(pg_total_relation_size(oid)) FROM pg_class "
                       "WHERE relkind = 'r' AND relname ~ '^telemetry_(gpu|usage)sample($|_)'")
        return float(cursor.fetchone()[0]) / 2**20


def measure_store(fleet: list, rounds: int, rng: random.Random) -> float:
    """Median ms per GPU sample of the store step over `rounds` rounds of one fresh batch per node."""
    from portal.fleet.models import NodeCredential
    from portal.telemetry.models import IngestedBatch
    from portal.telemetry.schemas import BatchIn
    from portal.telemetry.services import batch_accept
    from portal.telemetry.store import batches_store

    creds = {c.node_id: c for c in NodeCredential.objects.select_related("node").filter(
        node_id__in=[spec.pk for spec in fleet])}
    per_sample = []
    for round_no in range(rounds + 1):
        end = time.time()
        for spec in fleet:
            spec.seq += 1
            batch_accept(credential=creds[spec.pk], batch=BatchIn.model_validate(batch_doc(spec, spec.seq, end, rng)))
        began = time.perf_counter()
        while batches_store():
            pass
        elapsed = time.perf_counter() - began
        if IngestedBatch.objects.filter(stored_at__isnull=True).exists():
            raise RuntimeError("the store step left batches behind")
        if round_no:  # the first round warms the caches and the connection
            per_sample.append(1000 * elapsed / (len(fleet) * GPUS_PER_NODE))
    return statistics.median(per_sample)


def measure_queries(fleet: list, count: int, at: datetime) -> dict[str, float]:
    """Median ms of each dashboard read as at `at`, `count` times after a warm-up, across the nodes. Every
    measurement reads as at the same moment, the end of the history, so each reads the same rows."""
    from portal.economics.selectors import tokens_per_second_now
    from portal.fleet.models import Node
    from portal.telemetry.selectors import node_series

    nodes = list(Node.objects.filter(pk__in=[spec.pk for spec in fleet]).order_by("pk"))
    reads = {QUERIES[0]: lambda node: node_series(node=node, range_key="1h", now=at),
             QUERIES[1]: lambda node: tokens_per_second_now(now=at)}
    out = {}
    for name, read in reads.items():
        times = []
        for i in range(count + 3):
            began = time.perf_counter()
            read(nodes[i * 7 % len(nodes)])
            if i >= 3:
                times.append(1000 * (time.perf_counter() - began))
        out[name] = statistics.median(times)
    return out


def run_variant(args: argparse.Namespace) -> dict:
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connections
    from django.utils import timezone

    partitioned = args.variant == "partitioned"
    call_command("migrate", verbosity=0)
    if not partitioned:
        call_command("migrate", "telemetry", "0003", verbosity=0)
    fleet = setup_fleet(args.nodes)
    rng = random.Random(11)
    now = timezone.now()
    result: dict = {"variant": args.variant, "phases": []}
    # The last hour as the agent sends it (the node page reads it), older history every SPACING seconds.
    spans = (("1 day", [(now - timedelta(hours=1), now, 10), (now - timedelta(days=1), now - timedelta(hours=1),
                                                              args.spacing)]),
             (f"{args.days} days", [(now - timedelta(days=args.days), now - timedelta(days=1), args.spacing)]))
    rows_total = 0
    for label, fills in spans:
        began = time.perf_counter()
        rows = sum(fill(lo=lo, hi=hi, spacing=spacing, partitioned=partitioned) for lo, hi, spacing in fills)
        analyze()
        fill_s = time.perf_counter() - began
        rows_total += rows
        print(f"  {args.variant}: {label}: {rows:,} history rows in {fill_s:.0f} s; measuring", file=sys.stderr,
              flush=True)
        phase = {"label": label, "rows": rows_total, "fill_s": fill_s, "size_mb": raw_size_mb(),
                 "insert_ms": measure_store(fleet, args.rounds, rng),
                 "queries": measure_queries(fleet, args.queries, now)}
        result["phases"].append(phase)
    connections.close_all()
    return result


# --------------------------------------------------------------------------------------------------- report


ROWS = (
    ("raw history rows", lambda p: p["rows"], "{:>12,.0f}"),
    ("raw tables + indexes, MB", lambda p: p["size_mb"], "{:>12,.0f}"),
    ("history fill (+ ANALYZE), s", lambda p: p["fill_s"], "{:>12,.0f}"),
    ("insert, ms per GPU sample", lambda p: p["insert_ms"], "{:>12.4f}"),
    *((f"{q}, ms", lambda p, q=q: p["queries"][q], "{:>12.2f}") for q in QUERIES),
)


def report(results: list[dict], args: argparse.Namespace, elapsed: float, busy: float) -> None:
    gpus = args.nodes * GPUS_PER_NODE
    print(f"\nraw-history benchmark: {args.nodes} nodes x {GPUS_PER_NODE} GPUs ({gpus:,} GPUs), {len(MODELS)} "
          f"endpoints a node; {elapsed:.0f} s in all")
    print(f"machine: {os.cpu_count()} CPUs, {busy:.0f} % busy before starting"
          f"{' (other work is running: the numbers below share the CPUs with it)' if busy > 10 else ''}")
    print(f"history: a GpuSample per GPU and a UsageSample per endpoint every 10 s over the last hour (as the agent "
          f"sends them), every {args.spacing} s before it ({args.spacing / 10:.0f}x fewer rows than production's, so "
          f"that {args.days} days fill in minutes); all stored and rolled up")
    print(f"insert: the store step (batches_store) of {args.nodes} accepted batches ({gpus:,} GPU samples) a round, "
          f"median of {args.rounds} rounds; queries: median of {args.queries} reads each, as at the end of the history")
    print(f"\n{'':<34}" + "".join(f"{r['variant']:>34}" for r in results))
    print(f"{'':<34}" + "".join(f"{r['phases'][0]['label']:>12}{r['phases'][1]['label']:>12}{'ratio':>10}"
                                for r in results))
    for label, value, fmt in ROWS:
        line = f"{label:<34}"
        for r in results:
            a, b = (value(p) for p in r["phases"])
            line += fmt.format(a) + fmt.format(b) + f"{b / a:>9.2f}x"
        print(line)
    first, last = results[0]["phases"]
    insert = last["insert_ms"] / first["insert_ms"]
    query = max(last["queries"][q] / first["queries"][q] for q in QUERIES)
    met = "met" if insert <= GOAL and query <= GOAL else "short"
    print(f"\ngoal: insert and dashboard query cost, {args.days} days vs 1 day of raw history <= {GOAL}x: {met} "
          f"(insert {insert:.2f}x, query {query:.2f}x)")


# --------------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=100, help="nodes of 8 GPUs and 2 endpoints")
    ap.add_argument("--days", type=int, default=30, help="days of raw history in the second measurement")
    ap.add_argument("--spacing", type=int, default=120, help="seconds between history rows of one GPU or endpoint")
    ap.add_argument("--rounds", type=int, default=9, help="store rounds per measurement (after a warm-up)")
    ap.add_argument("--queries", type=int, default=40, help="reads of each dashboard query per measurement")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-table baseline")
    ap.add_argument("--pg-admin-url", default=os.environ.get("BENCH_PG_ADMIN_URL",
                                                           "postgresql://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--db", default=DB, help="database to create (and drop at the end); the baseline adds _plain")
    ap.add_argument("--variant", choices=("partitioned", "plain"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:  # a child: measure the database DATABASE_URL names, print the result as JSON
        sys.path.insert(0, str(REPO))
        print(json.dumps(run_variant(args)))
        return 0

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    before = cpu_sample(set())
    time.sleep(2.0)
    busy = 100.0 - cpu_shares(before, cpu_sample(set()))["idle"]
    began = time.monotonic()
    variants = {"partitioned": args.db, **({} if args.no_plain else {"plain": f"{args.db}_plain"})}
    var_dir = Path(tempfile.mkdtemp(prefix="tokenmill-history-"))
    created: list[str] = []
    results = []
    try:
        for variant, name in variants.items():
            create_database(args.pg_admin_url, name)
            created.append(name)
            env = {k: v for k, v in os.environ.items()
                   if k not in ("CACHE_URL", "CELERY_BROKER_URL", "TOKENMILL_PRODUCTION")}
            env.update({"DATABASE_URL": db_urls(args.pg_admin_url, name), "DJANGO_SETTINGS_MODULE": "portal.settings",
                        "DEBUG": "0", "TOKENMILL_VAR_DIR": str(var_dir / variant), "SECRET_KEY": os.urandom(32).hex(),
                        "LOG_LEVEL": "WARNING"})
            child = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
            print(f"{variant}: database {name} ...", file=sys.stderr, flush=True)
            done = subprocess.run(child, cwd=REPO, env=env, check=True, stdout=subprocess.PIPE, text=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            drop_database(args.pg_admin_url, name)
            created.remove(name)
        report(results, args, time.monotonic() - began, busy)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        for name in created:
            drop_database(args.pg_admin_url, name)
        shutil.rmtree(var_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
