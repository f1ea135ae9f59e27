"""Day partitions of the raw telemetry tiers, on PostgreSQL.

GpuSample and UsageSample are partitioned by range of ts (migration 0004): one partition per UTC day,
`<table>_pYYYYMMDD`, and a DEFAULT partition, `<table>_default`, that takes any row whose day has none, so an
interval backdated by up to 30 days is stored whatever partitions exist. Writes and the dashboards' reads touch the
partitions of the days they name, and retention drops whole old days, so neither grows with the history kept.

The beat creates the coming days' partitions ahead of time (raw_partitions_ensure) and retention drops the old ones
(raw_partitions_drop). SQLite keeps plain tables: there both functions do nothing and say so (partitioned=False).
"""

import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

from django.db import OperationalError, connection, transaction
from django.utils import timezone
from psycopg import errors, sql

logger = logging.getLogger(__name__)
RAW_TABLES = ("telemetry_gpusample", "telemetry_usagesample")
# The beat runs hourly: a week ahead leaves a stopped beat days to be noticed before rows of a new day go to
# DEFAULT (they are stored all the same, and moved into the day's partition once it is created).
DAYS_AHEAD = 7
# Creating or dropping a partition locks its parent table exclusively for a moment, and the store worker's writes
# queue behind that lock while it waits, so a wait behind a long read gives up (the next run tries again). Below
# PostgreSQL's deadlock_timeout (1 s), so when a drop and a store flush wait on each other, the drop gives way.
LOCK_TIMEOUT = "500ms"


@dataclass(frozen=True)
class Ensured:
    partitioned: bool  # False: plain tables (SQLite), nothing to do
    created: list[str] = field(default_factory=list)
    moved: int = 0  # rows that were waiting in DEFAULT, moved into the partitions created
    busy: list[str] = field(default_factory=list)  # not created: the table stayed locked past LOCK_TIMEOUT


@dataclass(frozen=True)
class Dropped:
    partitioned: bool  # False: plain tables (SQLite), nothing dropped
    rows: dict[str, int]  # per raw table, the rows the dropped partitions held
    dropped: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # old partitions not dropped, and why


def partition_name(*, table: str, day: date) -> str:
    return f"{table}_p{day:%Y%m%d}"


def day_partitions(*, table: str) -> dict[date, str]:
    """The day partitions a raw table has now, by day (not its DEFAULT partition)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                       "WHERE i.inhparent = %s::regclass", [table])
        names = [name for (name,) in cursor.fetchall()]
    pattern = re.compile(rf"{re.escape(table)}_p(\d{{8}})")
    return {datetime.strptime(match.group(1), "%Y%m%d").date(): name
            for name in names if (match := pattern.fullmatch(name))}


def raw_partitions_ensure(*, now: datetime | None = None, days_ahead: int = DAYS_AHEAD,
                          days: Iterable[date] = ()) -> Ensured:
    """Give each raw table a partition for every UTC day from today to `days_ahead` days ahead, and for `days`.
    Idempotent. Rows already in DEFAULT for such a day move into its partition in the same transaction."""
    if connection.vendor != "postgresql":
        return Ensured(partitioned=False)
    today = (now or timezone.now()).astimezone(UTC).date()
    wanted = sorted({today + timedelta(days=i) for i in range(days_ahead + 1)} | set(days))
    created, busy, moved = [], [], 0
    for table in RAW_TABLES:
        existing = day_partitions(table=table)
        for day in wanted:
            if day in existing:
                continue
            name = partition_name(table=table, day=day)
            try:
                moved += _create_day(table=table, day=day)
            except OperationalError as exc:
                if not _waited_too_long(exc):
                    raise
                logger.warning("partition %s not created: its table stayed locked past %s; the next run tries again",
                               name, LOCK_TIMEOUT)
                busy.append(name)
                continue
            created.append(name)
    return Ensured(partitioned=True, created=created, moved=moved, busy=busy)


def raw_partitions_drop(*, before: datetime, rolled_up_until: datetime) -> Dropped:
    """Drop the day partitions whose whole day lies before `before` and whose rows are all in the minute tier
    (stored_at <= rolled_up_until); returns the rows they held. One holding a row not rolled up yet is kept, for
    a later run (the rollup runs every minute, retention hourly)."""
    rows = dict.fromkeys(RAW_TABLES, 0)
    if connection.vendor != "postgresql":
        return Dropped(partitioned=False, rows=rows)
    dropped, kept = [], {}
    for table in RAW_TABLES:
        for day, name in sorted(day_partitions(table=table).items()):
            if _day_start(day + timedelta(days=1)) > before:
                break
            try:
                held, waiting = _drop_day(partition=name, rolled_up_until=rolled_up_until)
            except OperationalError as exc:
                if not _waited_too_long(exc):
                    raise
                kept[name] = f"its table stayed locked past {LOCK_TIMEOUT}; the next run tries again"
                logger.warning("partition %s not dropped: %s", name, kept[name])
                continue
            if waiting:
                kept[name] = f"rows not in the minute tier yet: {waiting}"
                continue
            rows[table] += held
            dropped.append(name)
    return Dropped(partitioned=True, rows=rows, dropped=dropped, kept=kept)


def raw_default_delete(*, table: str, before: datetime, rolled_up_until: datetime) -> int:
    """Delete the rolled-up rows older than `before` from a raw table's DEFAULT partition (the days that had no
    partition: backdated intervals); returns how many. The day partitions are never trimmed row by row: each
    goes whole, once all of its day is past the window (raw_partitions_drop)."""
    with connection.cursor() as cursor:
        cursor.execute(sql.SQL("DELETE FROM {} WHERE ts < %s AND stored_at <= %s").format(
            sql.Identifier(f"{table}_default")), [before, rolled_up_until])
        return cursor.rowcount


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def _waited_too_long(exc: OperationalError) -> bool:
    return isinstance(exc.__cause__, errors.LockNotAvailable | errors.DeadlockDetected)


@contextmanager
def _lock_waits_bounded() -> Iterator:
    """A savepoint whose lock waits give up after LOCK_TIMEOUT; the caller's own setting is back after it."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('lock_timeout')")
        (previous,) = cursor.fetchone()
        cursor.execute("SELECT set_config('lock_timeout', %s, true)", [LOCK_TIMEOUT])
        yield cursor
        cursor.execute("SELECT set_config('lock_timeout', %s, true)", [previous])


def _create_day(*, table: str, day: date) -> int:
    """Create one day partition; returns the rows moved into it from DEFAULT (PostgreSQL refuses a partition while
    DEFAULT holds rows of its range). The parent is locked first, so no row of the day reaches DEFAULT between the
    move and the partition, and readers see the rows in DEFAULT or in the partition, never in neither."""
    lo, hi = _day_start(day), _day_start(day + timedelta(days=1))
    parent, default = sql.Identifier(table), sql.Identifier(f"{table}_default")
    with _lock_waits_bounded() as cursor:
        cursor.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(parent))
        cursor.execute(sql.SQL("CREATE TEMPORARY TABLE _moving ON COMMIT DROP AS WITH gone AS "
                               "(DELETE FROM {} WHERE ts >= %s AND ts < %s RETURNING *) SELECT * FROM gone")
                       .format(default), [lo, hi])
        moved = cursor.rowcount
        cursor.execute(sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
            sql.Identifier(partition_name(table=table, day=day)), parent, sql.Literal(lo), sql.Literal(hi)))
        cursor.execute(sql.SQL("INSERT INTO {} SELECT * FROM _moving").format(parent))
        cursor.execute("DROP TABLE _moving")
    return moved


def _drop_day(*, partition: str, rolled_up_until: datetime) -> tuple[int, int]:
    """(rows held, rows not rolled up yet) of a day partition, dropped unless the second is non-zero. Writes into
    that day wait while it is counted (a backdated interval, rare), so what is counted is what is dropped."""
    with _lock_waits_bounded() as cursor:
        name = sql.Identifier(partition)
        cursor.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(name))
        cursor.execute(sql.SQL("SELECT count(*), count(*) FILTER (WHERE stored_at > %s) FROM {}").format(name),
                       [rolled_up_until])
        held, waiting = cursor.fetchone()
        if not waiting:
            cursor.execute(sql.SQL("DROP TABLE {}").format(name))
    return held, waiting
