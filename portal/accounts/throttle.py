"""Log-in throttling: failed attempts are counted per account and per client address in the shared cache (so the
limits hold across every web process), and either count reaching its limit locks log-ins for a while, even with
the right password. Each lockout is sent as `login_locked_out`, which the audit log records."""

import math
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache
from django.dispatch import Signal
from django.utils import timezone

from portal.ratelimit import cache_count

# Sent once when an account or an address becomes locked: scope ("account" or "address"), ident, failures, until.
login_locked_out = Signal()


@dataclass(frozen=True)
class Lock:
    scope: str
    seconds: int

    @property
    def message(self) -> str:
        minutes = max(1, math.ceil(self.seconds / 60))
        who = "this account" if self.scope == "account" else "your address"
        return (f"Too many failed log-ins for {who}. Log-ins are paused for {minutes} minute"
                f"{'' if minutes == 1 else 's'}; if you forgot your password, reset it.")


def _limits() -> dict[str, int]:
    return {"account": settings.LOGIN_FAILURES_PER_ACCOUNT, "address": settings.LOGIN_FAILURES_PER_ADDRESS}


def _idents(username: str, address: str) -> dict[str, str]:
    return {"account": username.strip().lower()[:150], "address": address}


def login_lock(*, username: str, address: str) -> Lock | None:
    """The lock that refuses this attempt, if any."""
    now = timezone.now().timestamp()
    for scope, ident in _idents(username, address).items():
        until = cache.get(f"login-lock:{scope}:{ident}")
        if until is not None and until > now:
            return Lock(scope=scope, seconds=math.ceil(until - now))
    return None


def login_failed(*, username: str, address: str) -> Lock | None:
    """Count a failed attempt; the lock it starts, if it reaches a limit."""
    window = settings.LOGIN_LOCKOUT_SECONDS
    started = None
    for scope, ident in _idents(username, address).items():
        key = f"login-failures:{scope}:{ident}"
        failures = cache_count(key, timeout=window)
        if failures >= _limits()[scope]:
            until = timezone.now().timestamp() + window
            cache.set(f"login-lock:{scope}:{ident}", until, timeout=window)
            cache.delete(key)
            login_locked_out.send(sender=Lock, scope=scope, ident=ident, failures=failures, until=until)
            started = started or Lock(scope=scope, seconds=window)
    return started


def login_succeeded(*, username: str) -> None:
    cache.delete(f"login-failures:account:{_idents(username, '')['account']}")
