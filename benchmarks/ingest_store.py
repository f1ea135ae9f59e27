"""The ingest benchmark's in-process parts: the store step against a raw COPY of the same rows, and a profile of
the request path (used by bench_ingest.py)."""


import argparse
import gzip
import hashlib
import itertools
import json
import math
import random
import time
from dataclasses import dataclass, field

from ingest_fleet import (
    BATCHES_PATH,
    GPUS_PER_NODE,
    INGEST_PATH,
    MODELS,
    NodeSpec,
    age_last_seen,
    batch_doc,
    cpu_sample,
    cpu_shares,
    request_body,
)

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


def profile_requests(fleet: list[NodeSpec], count: int, rng: random.Random, *, per_post: int = 3) -> None:
    """Where a worker's time goes, in this process (no gunicorn, no network): `count` full requests through Django
    (middleware, auth, validation, accept, response) under each contract, timed plainly; then the stages of a
    multi-interval request one by one; then a cProfile of `count` more."""
    import cProfile
    import pstats

    import pydantic_core
    from django.db import connection
    from django.test import Client

    from portal.fleet.services import credential_authenticate
    from portal.telemetry.api import agent_config
    from portal.telemetry.schemas import BatchesEnvelopeIn, BatchIn
    from portal.telemetry.services import batches_accept

    nodes = fleet[:count]
    client = Client()
    paths = {"multi": BATCHES_PATH, "single": INGEST_PATH}

    def bodies(contract: str) -> list[tuple[str, bytes]]:
        now = time.time()
        out = []
        for spec in nodes:
            docs = []
            for j in range(per_post if contract == "multi" else 1):
                spec.seq += 1
                docs.append(batch_doc(spec, spec.seq, now - 10 * (per_post - 1 - j), rng))
            out.append((spec.credential, request_body(docs, contract)))
        return out

    def post(contract: str, credential: str, body: bytes) -> None:
        response = client.post(paths[contract], data=body, content_type="application/json",
                               headers={"Authorization": f"Bearer {credential}", "Content-Encoding": "gzip"})
        if response.status_code != 200 or b'"rejected"' in response.content or b'"conflict"' in response.content:
            raise RuntimeError(f"profile request failed: {response.status_code} {response.content[:300]!r}")

    age_last_seen()
    for contract in paths:
        post(contract, *bodies(contract)[0])  # first request: URL resolver and imports, not steady state
    statements: list[str] = []

    def capture(execute, sql_text, params, many, context):
        statements.append(sql_text)
        return execute(sql_text, params, many, context)

    with connection.execute_wrapper(capture):
        post("multi", *bodies("multi")[0])
    print(f"\nprofile ({count} requests in-process, Django test client, no network; wall ms / CPU ms of this process, "
          "best of 3 rounds):")
    for contract in paths:
        per = per_post if contract == "multi" else 1
        full = full_cpu = math.inf
        for _ in range(3):  # best of three, against noise from anything else on the machine
            age_last_seen()
            requests = bodies(contract)
            began, cpu_began = time.perf_counter(), time.process_time()
            for credential, body in requests:
                post(contract, credential, body)
            full = min(full, (time.perf_counter() - began) / count)
            full_cpu = min(full_cpu, (time.process_time() - cpu_began) / count)
        print(f"  {contract:<6} full request, {per} interval(s): {1000 * full:6.2f} / {1000 * full_cpu:5.2f} "
              f"a request, {1000 * full / per:6.2f} / {1000 * full_cpu / per:5.2f} an interval")
    names = ("gunzip", "parse JSON + envelope", "validate each (BatchIn.model_validate)",
             "authenticate (credential lookup)", "accept (batches_accept)", "agent_config")
    wall, cpu = dict.fromkeys(names, math.inf), dict.fromkeys(names, math.inf)
    for _ in range(3):
        age_last_seen()
        round_wall, round_cpu = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
        for credential, body in bodies("multi"):
            marks = [(time.perf_counter(), time.process_time())]
            raw = gzip.decompress(body)
            marks.append((time.perf_counter(), time.process_time()))
            envelope = BatchesEnvelopeIn.model_validate(pydantic_core.from_json(raw))
            marks.append((time.perf_counter(), time.process_time()))
            batches = [BatchIn.model_validate(item) for item in envelope.batches]
            marks.append((time.perf_counter(), time.process_time()))
            cred = credential_authenticate(value=credential)
            marks.append((time.perf_counter(), time.process_time()))
            batches_accept(credential=cred, batches=batches)
            marks.append((time.perf_counter(), time.process_time()))
            agent_config(cred.node)
            marks.append((time.perf_counter(), time.process_time()))
            for name, (a, b) in zip(names, itertools.pairwise(marks), strict=True):
                round_wall[name] += (b[0] - a[0]) / count
                round_cpu[name] += (b[1] - a[1]) / count
        for name in names:
            wall[name], cpu[name] = min(wall[name], round_wall[name]), min(cpu[name], round_cpu[name])
    print(f"  stages of a multi request ({per_post} intervals), a request ({len(statements)} statements):")
    for name in names:
        print(f"    {name:<40} {1000 * wall[name]:6.2f} / {1000 * cpu[name]:5.2f}")
    print("  statements of one request:")
    for statement in statements:
        print(f"    {statement[:150]}")

    age_last_seen()
    requests = bodies("multi")
    profiler = cProfile.Profile()
    profiler.enable()
    for credential, body in requests:
        post("multi", credential, body)
    profiler.disable()
    stats = pstats.Stats(profiler)
    print("\ncProfile of multi requests, project functions by cumulative time:")
    stats.sort_stats("cumulative").print_stats(r"portal/", 25)
    print("cProfile, all functions by own time:")
    stats.sort_stats("tottime").print_stats(20)
