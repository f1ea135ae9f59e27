"""Counters in the shared Django cache (Redis, or files in the demo: every process sees the same counts), and the
fixed-window rate limits built on them."""

import math
from datetime import datetime

from django.core.cache import cache
from django.http import HttpRequest
from django.utils import timezone


def client_address(request: HttpRequest) -> str:
    """The peer address. Behind a reverse proxy, set it from the proxy's header in the proxy, not here: a client
    can write X-Forwarded-For itself."""
    return request.META.get("REMOTE_ADDR") or "unknown"


def cache_count(key: str, *, timeout: int) -> int:
    """Add one to the counter `key` and return it; a missing or expired counter starts at 1 and lives `timeout`
    seconds. One cache round trip when the counter exists (the common case)."""
    try:
        return cache.incr(key)
    except ValueError:
        cache.add(key, 0, timeout=timeout)
        try:
            return cache.incr(key)
        except ValueError:  # expired between add and incr
            cache.set(key, 1, timeout=timeout)
            return 1


def rate_limit_hit(*, scope: str, ident: str, limit: int, window_s: int, now: datetime | None = None) -> int | None:
    """Count one attempt; when it is over `limit` in the current window, the seconds until the window ends."""
    ts = (now or timezone.now()).timestamp()
    count = cache_count(f"rate:{scope}:{ident}:{int(ts // window_s)}", timeout=window_s + 60)
    if count <= limit:
        return None
    return max(1, math.ceil(window_s - ts % window_s))
