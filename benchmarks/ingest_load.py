"""The ingest benchmark's load: an open-loop schedule of node posts against the real server, under either contract,
measured from interval close to stored (used by bench_ingest.py).

multi: each node posts every `--send-period` s (30) the intervals closed since its last post (three 10 s ones),
       to POST /api/v1/agent/batches, as agents 0.3+ do.
single: each node posts each 10 s interval as it closes to POST /api/v1/agent/ingest (the contract before).
"""

from __future__ import annotations

import argparse
import http.client
import math
import random
import threading
import time
from dataclasses import dataclass, field

from ingest_fleet import (
    BATCHES_PATH,
    GPUS_PER_NODE,
    INGEST_PATH,
    INTERVAL_S,
    NodeSpec,
    age_last_seen,
    batch_doc,
    cpu_sample,
    cpu_shares,
    pending_batches,
    request_body,
)


@dataclass
class LevelResult:
    gpus: int
    nodes: int
    contract: str
    period: float  # seconds between a node's posts
    target: float  # intervals/s the fleet closes
    workers: int = 0
    posts: int = 0  # posts scheduled in the measured window
    achieved: float = 0.0  # intervals in 2xx answers completed in the measured window, per second
    p50: float = math.inf  # scheduled post -> answer
    p99: float = math.inf
    close_p50: float = math.inf  # interval close -> stored, intervals closed in the measured window
    close_p99: float = math.inf
    unstored: int = 0  # of those, not stored when the level ended
    non2xx: int = 0
    statuses: dict = field(default_factory=dict)
    unsent: int = 0
    backlog: bool = False
    cpu: dict = field(default_factory=dict)
    seconds: float = 0.0
    queue_start: int = 0
    queue_end: int = 0
    drain_s: float = 0.0

    def server_cpu_s(self, cpus: int) -> float:
        """CPU seconds gunicorn, the store worker and PostgreSQL used over the measured window."""
        return (self.cpu.get("server", 0) + self.cpu.get("postgres", 0)) / 100 * cpus * self.seconds

    def cpu_ms_per_gpu_interval(self, cpus: int) -> float:
        absorbed = self.achieved * self.seconds * GPUS_PER_NODE
        return 1000 * self.server_cpu_s(cpus) / absorbed if absorbed else math.inf


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.inf
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


@dataclass
class Post:
    offset: float  # seconds after the level's start
    credential: str
    body: bytes
    intervals: int
    path: str


def _post_many(posts: list[Post], port: int, start: float, deadline: float, clients: int, timeout: float
               ) -> tuple[list, tuple[list, list], threading.Event]:
    """Send each post at start + offset from `clients` threads (one kept connection each); the threads, the
    answered times and statuses by post, and the event that stops them."""
    n = len(posts)
    done_at: list[float | None] = [None] * n
    status: list[int | None] = [None] * n
    cursor = {"next": 0}
    lock, stop = threading.Lock(), threading.Event()

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        while not stop.is_set():
            with lock:
                i = cursor["next"]
                cursor["next"] += 1
            if i >= n:
                break
            delay = start + posts[i].offset - time.monotonic()
            if delay > 0 and stop.wait(delay):
                break
            if time.monotonic() > deadline:
                break
            headers = {"Authorization": f"Bearer {posts[i].credential}", "Content-Type": "application/json",
                       "Content-Encoding": "gzip", "User-Agent": "tokenmill-bench"}
            try:
                conn.request("POST", posts[i].path, body=posts[i].body, headers=headers)
                response = conn.getresponse()
                response.read()
                code = response.status
                if response.will_close:
                    conn.close()
            except (OSError, http.client.HTTPException):
                code = -1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            done_at[i] = time.monotonic()
            status[i] = code
        conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads, (done_at, status), stop


def schedule(nodes: list[NodeSpec], contract: str, period: float, total: float, phase: str, rng: random.Random,
             t0: float) -> list[Post]:
    """Every node's posts over `total` s, bodies built now and stamped for when they are sent: node i posts at
    its phase i x period / N (or all at once, aligned), carrying the period's intervals, the last closing then."""
    per_post = max(1, round(period / INTERVAL_S))
    path = BATCHES_PATH if contract == "multi" else INGEST_PATH
    posts = []
    for i, spec in enumerate(nodes):
        offset = 0.0 if phase == "aligned" else i * period / len(nodes)
        while offset < total:
            docs = []
            for j in range(per_post):
                spec.seq += 1
                docs.append(batch_doc(spec, spec.seq, t0 + offset - (per_post - 1 - j) * INTERVAL_S, rng))
            posts.append(Post(offset, spec.credential, request_body(docs, contract), per_post, path))
            offset += period
    posts.sort(key=lambda p: p.offset)
    return posts


def close_to_stored(db_url: str, window: tuple[float, float]) -> tuple[float, float, int]:
    """p50 and p99 of interval close -> stored for the intervals that closed in the window, and how many of
    them are not stored (infinite)."""
    import psycopg

    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM stored_at - interval_end) FROM telemetry_ingestedbatch "
            "WHERE interval_end >= to_timestamp(%s) AND interval_end < to_timestamp(%s)", window).fetchall()
    delays = [float(d) if d is not None else math.inf for (d,) in rows]
    return percentile(delays, 0.5), percentile(delays, 0.99), sum(1 for d in delays if math.isinf(d))


def run_level(*, gpus: int, contract: str, fleet: list[NodeSpec], port: int, server_pids: set[int],
              args: argparse.Namespace, rng: random.Random, db_url: str) -> LevelResult:
    nodes = fleet[:gpus // GPUS_PER_NODE]
    period = args.send_period if contract == "multi" else INTERVAL_S
    warmup = period + args.warmup
    seconds = max(args.seconds, 2 * period)
    total = warmup + seconds
    age_last_seen()
    probe = time.perf_counter()
    request_body([batch_doc(nodes[0], 0, time.time(), rng) for _ in range(3)], contract)
    per_interval = (time.perf_counter() - probe) / 3
    intervals = len(nodes) * math.ceil(total / INTERVAL_S)
    t0_wall = time.time() + intervals * per_interval * 1.5 + 2.0
    posts = schedule(nodes, contract, period, total, args.phase, rng, t0_wall)
    start = time.monotonic() + max(0.2, t0_wall - time.time())
    deadline = start + total + args.grace
    threads, (done_at, status), stop = _post_many(posts, port, start, deadline, args.clients, args.timeout)
    queue: list[tuple[float, int]] = []
    try:
        time.sleep(max(0.0, start + warmup - time.monotonic()))
        cpu_a = cpu_sample(server_pids)
        window = (time.time(), time.time() + seconds)
        queue.append((time.monotonic(), pending_batches(db_url)))
        time.sleep(max(0.0, start + total - time.monotonic()))
        cpu_b = cpu_sample(server_pids)
        queue.append((time.monotonic(), pending_batches(db_url)))
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(args.timeout + 5)
    result = LevelResult(gpus=gpus, nodes=len(nodes), contract=contract, period=period,
                         target=len(nodes) / INTERVAL_S, workers=args.workers, cpu=cpu_shares(cpu_a, cpu_b),
                         seconds=seconds)
    result.queue_start, result.queue_end = queue[0][1], queue[-1][1]
    drain_from = time.monotonic()
    while pending_batches(db_url) and time.monotonic() < drain_from + 120:
        time.sleep(0.2)
    result.drain_s = time.monotonic() - drain_from
    result.close_p50, result.close_p99, result.unstored = close_to_stored(db_url, window)
    w0, w1 = start + warmup, start + total
    in_window = [i for i, p in enumerate(posts) if warmup <= p.offset < total]
    result.posts = len(in_window)
    latencies = [(done_at[i] - (start + posts[i].offset)) if done_at[i] is not None else math.inf for i in in_window]
    result.p50, result.p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    result.unsent = sum(1 for i in in_window if done_at[i] is None)
    ok = [i for i, s in enumerate(status) if s is not None and 200 <= s < 300]
    result.achieved = sum(posts[i].intervals for i in ok if w0 <= done_at[i] < w1) / seconds
    for i in in_window:
        if status[i] is not None and not 200 <= status[i] < 300:
            result.non2xx += 1
            result.statuses[status[i]] = result.statuses.get(status[i], 0) + 1
    third = max(1, len(latencies) // 3)
    growing = percentile(latencies[-third:], 0.5) > 2 * percentile(latencies[:third], 0.5) + 0.25
    store_growing = result.queue_end - result.queue_start > 2 * result.target or result.drain_s >= 120
    result.backlog = (result.achieved < 0.95 * result.target or result.unsent > 0 or growing or store_growing
                      or result.unstored > 0)
    return result


@dataclass
class DrainResult:
    nodes: int
    hours: float
    backlog: int  # intervals the outage left in the nodes' spools
    window: float
    drained: int = 0  # backlog intervals stored within the window
    rate: float = 0.0  # backlog intervals stored per second
    fresh: LevelResult | None = None  # the nodes' fresh posts meanwhile

    @property
    def projected_s(self) -> float:
        return self.backlog / self.rate if self.rate else math.inf


def _backlog_posts(nodes: list[NodeSpec], hours: float, limit: int, rng: random.Random, t0: float) -> list[Post]:
    """The first `limit` requests of the nodes' drain, 360 intervals (an hour) each, newest hour first as the
    agent sends them, round-robin over the nodes. Each interval is the node's template with its own seq and
    time (building every interval afresh would take the generator longer than the drain)."""
    per_node = math.ceil(hours * 3600 / INTERVAL_S)
    chunk = 360
    templates = {spec.pk: batch_doc(spec, 0, t0, rng) for spec in nodes}
    base = {spec.pk: spec.seq for spec in nodes}
    for spec in nodes:
        spec.seq += per_node  # the backlog takes these seqs; fresh intervals follow them
    posts = []
    for k in range(math.ceil(per_node / chunk)):
        for spec in nodes:
            if len(posts) >= limit:
                return posts
            hi = per_node - k * chunk
            lo = max(0, hi - chunk)
            docs = [dict(templates[spec.pk], seq=base[spec.pk] + 1 + j,
                         interval_start=t0 - (per_node - j) * INTERVAL_S,
                         interval_end=t0 - (per_node - j - 1) * INTERVAL_S) for j in range(lo, hi)]
            posts.append(Post(0.0, spec.credential, request_body(docs, "multi"), len(docs), BATCHES_PATH))
    return posts


def run_drain(*, fleet: list[NodeSpec], port: int, server_pids: set[int], args: argparse.Namespace,
              rng: random.Random, db_url: str) -> DrainResult:
    """`--outage-nodes` nodes come back after `--outage-hours` down: each drains its spool (back to back, 360
    intervals a request, from `--drain-clients` connections) while it keeps posting fresh intervals every send
    period. Measured over `--drain-seconds`: backlog intervals stored per second (so the time the whole backlog
    takes) and the fresh intervals' close -> stored meanwhile."""
    nodes = fleet[:args.outage_nodes]
    per_node = math.ceil(args.outage_hours * 3600 / INTERVAL_S)
    result = DrainResult(nodes=len(nodes), hours=args.outage_hours, backlog=per_node * len(nodes),
                         window=args.drain_seconds)
    t0 = time.time()
    backlog = _backlog_posts(nodes, args.outage_hours, args.drain_requests, rng, t0 - 60)
    age_last_seen()
    import psycopg

    with psycopg.connect(db_url, autocommit=True) as conn:
        before = conn.execute("SELECT count(*) FROM telemetry_ingestedbatch WHERE stored_at IS NOT NULL "
                              "AND interval_end < to_timestamp(%s)", (t0 - 30,)).fetchone()[0]
    start = time.monotonic() + 0.5
    deadline = start + args.drain_seconds
    drainers, _answers, stop = _post_many(backlog, port, start, deadline, args.drain_clients, args.timeout)
    try:
        result.fresh = run_level(gpus=len(nodes) * GPUS_PER_NODE, contract="multi", fleet=nodes, port=port,
                                 server_pids=server_pids, args=argparse.Namespace(
                                     **{**vars(args), "seconds": args.drain_seconds - args.send_period - 15}),
                                 rng=rng, db_url=db_url)
    finally:
        stop.set()
        for t in drainers:
            t.join(args.timeout + 5)
    elapsed = time.monotonic() - start
    with psycopg.connect(db_url, autocommit=True) as conn:
        after = conn.execute("SELECT count(*) FROM telemetry_ingestedbatch WHERE stored_at IS NOT NULL "
                             "AND interval_end < to_timestamp(%s)", (t0 - 30,)).fetchone()[0]
    result.drained = after - before
    result.window = elapsed
    result.rate = result.drained / elapsed if elapsed else 0.0
    return result
