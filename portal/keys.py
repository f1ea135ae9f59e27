"""Prefixed secrets shown once: `<kind>_<prefix>_<secret>`, stored as prefix + HMAC-SHA256(secret key, full value).

The prefix finds the row with one indexed lookup; the digest is compared in constant time. A database leak
reveals no usable credential, and rotating SECRET_KEY invalidates them all.
"""

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from django.conf import settings

PREFIX_LEN = 12


@dataclass(frozen=True)
class IssuedKey:
    value: str
    prefix: str
    digest: str


def key_digest(value: str) -> str:
    return hmac.new(settings.SECRET_KEY.encode(), value.encode(), hashlib.sha256).hexdigest()


def issue_key(*, kind: str) -> IssuedKey:
    prefix = secrets.token_hex(PREFIX_LEN // 2)
    value = f"{kind}_{prefix}_{secrets.token_urlsafe(32)}"
    return IssuedKey(value=value, prefix=prefix, digest=key_digest(value))


def key_prefix(value: str, *, kind: str) -> str | None:
    """The lookup prefix of a presented key, or None when it is not of this kind's shape."""
    parts = value.split("_", 2)
    if len(parts) != 3 or parts[0] != kind or len(parts[1]) != PREFIX_LEN:
        return None
    return parts[1]


def key_matches(value: str, digest: str) -> bool:
    return hmac.compare_digest(key_digest(value), digest)
