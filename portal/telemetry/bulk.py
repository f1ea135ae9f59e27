"""Bulk row writes for telemetry: PostgreSQL COPY (several times faster than INSERT), a single executemany
elsewhere. Both skip per-field ORM preparation, which dominates at these volumes, and both are all-or-nothing
inside the caller's transaction. Rows are dicts keyed by attname (gpu_id, ts, ...), the same keys in every row."""

import json
from datetime import datetime

from django.db import connection, models
from psycopg import sql


def _driver_values(fields: list[models.Field], values) -> list:
    """Values as the driver takes them: JSON columns serialised (None stays NULL); on SQLite, datetimes in the text
    form Django stores (psycopg's COPY takes them as they are)."""
    sqlite = connection.vendor != "postgresql"
    out = []
    for field, value in zip(fields, values, strict=True):
        if value is not None and isinstance(field, models.JSONField):
            value = json.dumps(value)
        elif sqlite and isinstance(value, datetime):
            value = connection.ops.adapt_datetimefield_value(value)
        out.append(value)
    return out


def insert_rows(model: type[models.Model], rows: list[dict], *, chunk: int = 5000) -> None:
    if not rows:
        return
    fields = [model._meta.get_field(name) for name in rows[0]]
    table, columns = model._meta.db_table, [f.column for f in fields]
    if connection.vendor == "postgresql":
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(table), sql.SQL(", ").join(sql.Identifier(c) for c in columns))
        with connection.cursor() as cursor, cursor.cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(_driver_values(fields, row.values()))
        return
    quote = connection.ops.quote_name
    # Table and column names come from the model's metadata and are quoted; values are bound parameters.
    statement = (f"INSERT INTO {quote(table)} ({', '.join(quote(c) for c in columns)}) "  # noqa: S608
                 f"VALUES ({', '.join(['%s'] * len(columns))})")
    with connection.cursor() as cursor:
        for start in range(0, len(rows), chunk):
            cursor.executemany(statement, [_driver_values(fields, row.values()) for row in rows[start:start + chunk]])


def update_rows(model: type[models.Model], rows: list[dict]) -> None:
    """Set columns of existing rows by primary key: each row is {"id": pk, column: value, ...}. On PostgreSQL the
    new values are COPied into a temporary table and applied with one UPDATE ... FROM (thousands of rows in a
    few milliseconds, where an ORM upsert of model instances took a second); elsewhere one executemany UPDATE.
    Must run inside a transaction (the temporary table lives until its commit)."""
    if not rows:
        return
    names = [name for name in rows[0] if name != "id"]
    fields = [model._meta.get_field(name) for name in names]
    table = model._meta.db_table
    if connection.vendor == "postgresql":
        staging = f"_new_{table}"
        columns = sql.SQL(", ").join(sql.Identifier(f.column) for f in fields)
        with connection.cursor() as cursor:
            cursor.execute(sql.SQL("CREATE TEMPORARY TABLE {} ON COMMIT DROP AS SELECT id, {} FROM {} WITH NO DATA")
                           .format(sql.Identifier(staging), columns, sql.Identifier(table)))
            copy_statement = sql.SQL("COPY {} (id, {}) FROM STDIN").format(sql.Identifier(staging), columns)
            with cursor.cursor.copy(copy_statement) as copy:
                for row in rows:
                    copy.write_row([row["id"], *_driver_values(fields, (row[name] for name in names))])
            assignments = sql.SQL(", ").join(
                sql.SQL("{} = n.{}").format(sql.Identifier(f.column), sql.Identifier(f.column)) for f in fields)
            cursor.execute(sql.SQL("UPDATE {} AS t SET {} FROM {} AS n WHERE t.id = n.id").format(
                sql.Identifier(table), assignments, sql.Identifier(staging)))
            cursor.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(staging)))
        return
    quote = connection.ops.quote_name
    # Table and column names come from the model's metadata and are quoted; values are bound parameters.
    statement = (f"UPDATE {quote(table)} SET {', '.join(f'{quote(f.column)} = %s' for f in fields)} "  # noqa: S608
                 "WHERE id = %s")
    with connection.cursor() as cursor:
        cursor.executemany(statement, [[*_driver_values(fields, (row[name] for name in names)), row["id"]]
                                       for row in rows])
