"""Encryption at rest for uploaded SSH private keys (Fernet: AES-128-CBC + HMAC-SHA256).

PROVISIONING_KEY holds one or more Fernet keys separated by commas: the first encrypts, all decrypt, so a key can
be rotated by putting the new one first. Production requires it (settings.py); the demo generates one under
VAR_DIR once.
"""

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


class DecryptionError(Exception):
    """The stored secret cannot be decrypted with any configured key."""


def _keys() -> list[str]:
    configured = [k.strip() for k in settings.PROVISIONING_KEY.split(",") if k.strip()]
    if configured:
        return configured
    # Production refuses to start without PROVISIONING_KEY (settings.py). The demo's key is generated once and kept
    # beside its secret key, so stored SSH keys survive a restart.
    path = settings.VAR_DIR / "provisioning_key"
    if not path.exists():
        path.write_text(Fernet.generate_key().decode())
        path.chmod(0o600)
    return [path.read_text().strip()]


def _fernet() -> MultiFernet:
    try:
        return MultiFernet([Fernet(k) for k in _keys()])
    except ValueError as exc:
        raise ImproperlyConfigured(f"PROVISIONING_KEY is not a valid Fernet key: {exc}") from None


def encrypt(plaintext: bytes) -> str:
    return _fernet().encrypt(plaintext).decode()


def decrypt(token: str) -> bytes:
    try:
        return _fernet().decrypt(token.encode())
    except InvalidToken:
        raise DecryptionError(
            "the stored key cannot be decrypted with PROVISIONING_KEY (was the key changed?)"
        ) from None

