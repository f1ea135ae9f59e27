"""Whole UTC hours: the grain of the hour tier, attribution and the books."""

from datetime import datetime, timedelta

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


def hour_floor(ts: datetime) -> datetime:
    return ts.replace(minute=0, second=0, microsecond=0)


def hour_ceil(ts: datetime) -> datetime:
    floor = hour_floor(ts)
    return floor if floor == ts else floor + HOUR


def hours_between(start: datetime, end: datetime) -> list[datetime]:
    """The hours that begin in [hour_floor(start), end)."""
    hour, out = hour_floor(start), []
    while hour < end:
        out.append(hour)
        hour += HOUR
    return out


def day_floor(ts: datetime) -> datetime:
    """Midnight (UTC for a UTC time) of the day `ts` is in."""
    return ts.replace(hour=0, minute=0, second=0, microsecond=0)


def day_ceil(ts: datetime) -> datetime:
    floor = day_floor(ts)
    return floor if floor == ts else floor + DAY
