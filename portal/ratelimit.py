"""Fixed-window rate limits in the Django cache (Redis when configured, so limits hold across processes)."""

import math
from datetime import datetime

from django.core.cache import cache
from django.http import HttpRequest
from django.utils import timezone


def client_address(request: HttpRequest) -> str:
    """The peer address. Behind a reverse proxy, set it from the proxy's header in the proxy, not here: a client
    can write X-Forwarded-For itself."""
    return request.META.get("REMOTE_ADDR") or "unknown"


def rate_limit_hit(*, scope: str, ident: str, limit: int, window_s: int, now: datetime | None = None) -> int | None:
    """Count one attempt; when it is over `limit` in the current window, the seconds until the window ends."""
    ts = (now or timezone.now()).timestamp()
    key = f"rate:{scope}:{ident}:{int(ts // window_s)}"
    cache.add(key, 0, timeout=window_s + 60)
    try:
        count = cache.incr(key)
    except ValueError:  # expired between add and incr
        cache.set(key, 1, timeout=window_s + 60)
        count = 1
    if count <= limit:
        return None
    return max(1, math.ceil(window_s - ts % window_s))
