"""Named locks for writers that replace whole sets of rows, so two of them never interleave."""

import zlib

from django.db import connection


def transaction_lock(name: str) -> None:
    """Inside a transaction: wait until no other transaction holds `name`, and hold it until this one ends.

    PostgreSQL: a transaction-level advisory lock, taken before the writer reads, so what it reads includes
    everything the previous holder committed. SQLite allows one writing transaction at a time already (a writer
    whose snapshot went stale gets "database is locked" and its task is retried), so there is nothing to take."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [zlib.crc32(name.encode())])
