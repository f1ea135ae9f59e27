"""SSH credentials the portal logs in with, and the host keys it pins: written once, audited."""

import paramiko
from django.db import transaction
from django.utils import timezone

from portal.accounts.models import User
from portal.audit.services import audit_record
from portal.provisioning import crypto, ssh
from portal.provisioning.models import KnownHost, SshCredential
from portal.provisioning.parsing import fingerprint


class ProvisioningError(Exception):
    """An operator action that cannot be done now; the message is safe to show."""



def credential_create_upload(*, name: str, key_data: bytes, passphrase: str = "", by: User | None) -> SshCredential:
    """Store an uploaded private key encrypted (unencrypted OpenSSH format inside the Fernet token, so jobs need no
    passphrase). ssh.KeyFormatError when it is not a usable key."""
    key = ssh.normalize_private_key(key_data, passphrase=passphrase)
    with transaction.atomic():
        credential = SshCredential.objects.create(
            name=name, private_key_encrypted=crypto.encrypt(key.private_openssh), public_key=key.public_line,
            fingerprint=key.fingerprint, created_by=by,
        )
        audit_record(actor=by, action="provisioning.credential_upload", target=credential,
                     after={"fingerprint": key.fingerprint})
    return credential


def credential_create_path(*, name: str, path: str, by: User | None) -> SshCredential:
    """Refer to a key file on the portal host (read at each connection; it must be unencrypted)."""
    pkey = ssh.load_pkey_file(path)
    with transaction.atomic():
        credential = SshCredential.objects.create(
            name=name, key_path=path, public_key=f"{pkey.get_name()} {pkey.get_base64()} tokenmill-portal",
            fingerprint=fingerprint(pkey), created_by=by,
        )
        audit_record(actor=by, action="provisioning.credential_path", target=credential, after={"path": path})
    return credential


def known_host_pin(*, host: str, port: int, key: paramiko.PKey, source: str, by: User | None) -> KnownHost:
    """Pin `key` for host:port. ProvisioningError if another key is already pinned there."""
    existing = KnownHost.objects.filter(host=host, port=port).first()
    if existing is not None:
        if existing.key_base64 == key.get_base64() and existing.key_type == key.get_name():
            return existing
        raise ProvisioningError(
            f"{host}:{port} already has the pinned key {existing.fingerprint}; remove it first if the node's key "
            "really changed"
        )
    known = KnownHost.objects.create(
        host=host, port=port, key_type=key.get_name(), key_base64=key.get_base64(), fingerprint=fingerprint(key),
        source=source, added_by=by, added_at=timezone.now(),
    )
    audit_record(actor=by, action="provisioning.host_key_pin", target=known,
                 after={"fingerprint": known.fingerprint, "source": source})
    return known


def known_host_remove(*, known_host: KnownHost, by: User | None) -> None:
    with transaction.atomic():
        audit_record(actor=by, action="provisioning.host_key_remove", target=known_host,
                     before={"fingerprint": known_host.fingerprint})
        known_host.delete()
