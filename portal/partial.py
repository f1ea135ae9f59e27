"""Model instances from a row read with plain SQL: the hot path's way to skip the ORM's query building (about
0.6 ms of CPU a query) while keeping what the ORM guarantees about the values."""

from django.db import connection, models


def partial_instance(model: type[models.Model], values: dict[str, object]) -> models.Model:
    """An instance of `model` holding the given fields (by attname, values as the database driver returned them,
    converted as the ORM converts them: a datetime on SQLite arrives as text); every other field is deferred,
    so reading one loads it from the database instead of answering a default."""
    names, converted = [], []
    for field in model._meta.concrete_fields:  # from_db takes the values in the model's field order
        if field.attname not in values:
            continue
        value, column = values[field.attname], field.get_col(model._meta.db_table)
        for convert in connection.ops.get_db_converters(column) + column.get_db_converters(connection):
            value = convert(value, column, connection)
        names.append(field.attname)
        converted.append(value)
    return model.from_db(connection.alias, names, converted)
