"""One unit is never held by two tenants at once, enforced by the database.

PostgreSQL: an exclusion constraint over (GPU, slot range, time range). SQLite: triggers that abort an insert or
update overlapping an existing allocation of the same GPU in both slots and time. Open-ended allocations
(ends_at NULL) extend to infinity on both.
"""

from django.db import migrations

PG_CREATE = """
CREATE EXTENSION IF NOT EXISTS btree_gist;
ALTER TABLE capacity_allocation ADD CONSTRAINT allocation_no_overlap EXCLUDE USING gist (
    gpu_id WITH =,
    int4range(slot_lo, slot_hi) WITH &&,
    tstzrange(starts_at, ends_at, '[)') WITH &&
);
"""
PG_DROP = "ALTER TABLE capacity_allocation DROP CONSTRAINT IF EXISTS allocation_no_overlap;"

_OVERLAP = """
SELECT RAISE(ABORT, 'allocation_no_overlap: the unit is already allocated in that period')
WHERE EXISTS (
    SELECT 1 FROM capacity_allocation a
    WHERE a.gpu_id = NEW.gpu_id AND a.id IS NOT NEW.id
      AND a.slot_lo < NEW.slot_hi AND NEW.slot_lo < a.slot_hi
      AND a.starts_at < COALESCE(NEW.ends_at, '9999-12-31') AND NEW.starts_at < COALESCE(a.ends_at, '9999-12-31')
);
"""
SQLITE_CREATE = [
    f"CREATE TRIGGER allocation_no_overlap_insert BEFORE INSERT ON capacity_allocation BEGIN {_OVERLAP} END;",
    f"CREATE TRIGGER allocation_no_overlap_update BEFORE UPDATE ON capacity_allocation BEGIN {_OVERLAP} END;",
]
SQLITE_DROP = [
    "DROP TRIGGER IF EXISTS allocation_no_overlap_insert;",
    "DROP TRIGGER IF EXISTS allocation_no_overlap_update;",
]


def forwards(apps, schema_editor):
    statements = {"postgresql": [PG_CREATE], "sqlite": SQLITE_CREATE}[schema_editor.connection.vendor]
    for statement in statements:
        schema_editor.execute(statement)


def backwards(apps, schema_editor):
    statements = {"postgresql": [PG_DROP], "sqlite": SQLITE_DROP}[schema_editor.connection.vendor]
    for statement in statements:
        schema_editor.execute(statement)


class Migration(migrations.Migration):
    dependencies = [("capacity", "0001_initial")]
    operations = [migrations.RunPython(forwards, backwards)]
