"""SSH to nodes with paramiko. Host keys are never accepted silently: a connection presents the pinned key of the
host (RejectPolicy for anything else), and the first contact only fetches the key for an operator to confirm."""

import base64
import io
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa

from portal.provisioning.parsing import fingerprint, known_hosts_entry

CONNECT_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 300.0
OUTPUT_LIMIT = 64 * 1024


class SshError(Exception):
    """Connecting or running a command failed; the message is safe to show the operator."""


class HostKeyChanged(SshError):
    pass


class HostKeyUnknown(SshError):
    pass


class AuthFailed(SshError):
    pass


class Unreachable(SshError):
    pass


class KeyFormatError(ValueError):
    pass


@dataclass(frozen=True)
class NormalizedKey:
    private_openssh: bytes
    public_line: str
    fingerprint: str


def normalize_private_key(data: bytes, *, passphrase: str = "") -> NormalizedKey:
    """Parse an OpenSSH or PEM private key (decrypting it with the passphrase if it has one) and return it
    unencrypted in OpenSSH format with its public line and fingerprint; the caller encrypts it at rest."""
    password = passphrase.encode() if passphrase else None
    key = None
    errors = []
    for loader in (serialization.load_ssh_private_key, serialization.load_pem_private_key):
        try:
            key = loader(data, password=password)
            break
        except TypeError as exc:  # encrypted without a passphrase, or a passphrase for a plain key
            errors.append(str(exc))
        except ValueError as exc:
            errors.append(str(exc))
    if key is None:
        if any("password" in e.lower() or "encrypted" in e.lower() for e in errors):
            raise KeyFormatError("the key is encrypted: give its passphrase (or the passphrase is wrong)")
        raise KeyFormatError("not an OpenSSH or PEM private key")
    if isinstance(key, dsa.DSAPrivateKey):
        raise KeyFormatError("DSA keys are not supported: use ed25519, ECDSA or RSA")
    try:
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    except ValueError as exc:
        raise KeyFormatError(f"unsupported key type: {exc}") from None
    pkey = load_pkey(private)
    return NormalizedKey(private_openssh=private, public_line=public.decode() + " tokenmill-portal",
                         fingerprint=fingerprint(pkey))


def load_pkey(private_openssh: bytes) -> paramiko.PKey:
    text = private_openssh.decode()
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError):
            continue
    raise KeyFormatError("paramiko cannot load this key")


def load_pkey_file(path: str) -> paramiko.PKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFormatError(f"cannot read {path}: {exc.strerror}") from None
    return load_pkey(normalize_private_key(data).private_openssh)


def _describe_network_error(host: str, port: int, exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {host}: {exc.strerror}"
    if isinstance(exc, TimeoutError):
        return f"{host}:{port} did not answer within {CONNECT_TIMEOUT_S:.0f} s"
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        return f"cannot connect to {host}:{port}: connection refused"
    if isinstance(exc, ConnectionRefusedError):
        return f"cannot connect to {host}:{port}: connection refused"
    return f"cannot connect to {host}:{port}: {exc}"


def fetch_host_key(*, host: str, port: int) -> paramiko.PKey:
    """The key the server presents, without authenticating (nothing is sent but the key exchange)."""
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    except OSError as exc:
        raise Unreachable(_describe_network_error(host, port, exc)) from None
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=CONNECT_TIMEOUT_S)
        return transport.get_remote_server_key()
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise Unreachable(f"{host}:{port} did not complete an SSH handshake: {exc}") from None
    finally:
        transport.close()


@dataclass(frozen=True)
class Result:
    exit_status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def text(self) -> str:
        return (self.stdout + ("\n" if self.stdout and self.stderr else "") + self.stderr).strip()


class Connection:
    """An authenticated session to one node. Commands run through the login user's shell; for a user other than
    root they run under `sudo -n` (passwordless sudo is required, and preflight checks it)."""

    def __init__(self, client: paramiko.SSHClient, *, username: str) -> None:
        self.client = client
        self.username = username
        self._sftp: paramiko.SFTPClient | None = None

    def wrap(self, command: str) -> str:
        return command if self.username == "root" else f"sudo -n sh -c {shlex.quote(command)}"

    def run(self, command: str, *, timeout: float = COMMAND_TIMEOUT_S, privileged: bool = True) -> Result:
        try:
            _stdin, stdout, stderr = self.client.exec_command(
                self.wrap(command) if privileged else command, timeout=timeout
            )
            _stdin.close()
            out = stdout.read(OUTPUT_LIMIT).decode("utf-8", "replace")
            err = stderr.read(OUTPUT_LIMIT).decode("utf-8", "replace")
            status = stdout.channel.recv_exit_status()
        except TimeoutError:
            raise SshError(f"command timed out after {timeout:.0f} s: {command[:200]}") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SshError(f"the SSH session broke: {exc}") from None
        return Result(exit_status=status, stdout=out, stderr=err)

    @property
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            try:
                self._sftp = self.client.open_sftp()
            except (paramiko.SSHException, OSError) as exc:
                raise SshError(f"the node refused SFTP: {exc}") from None
        return self._sftp

    def put(self, local: Path, remote: str) -> None:
        try:
            self.sftp.put(str(local), remote)
        except (paramiko.SSHException, OSError) as exc:
            raise SshError(f"uploading {local.name} to {remote} failed: {exc}") from None

    def write(self, remote: str, data: bytes, *, mode: int = 0o600) -> None:
        try:
            with self.sftp.open(remote, "wb") as fh:
                fh.chmod(mode)
                fh.write(data)
        except (paramiko.SSHException, OSError) as exc:
            raise SshError(f"writing {remote} failed: {exc}") from None

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
        self.client.close()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(*, host: str, port: int, username: str, pkey: paramiko.PKey, key_type: str, key_base64: str,
            pinned_fingerprint: str) -> Connection:
    """Log in, accepting only the pinned host key (HostKeyChanged when the server presents another one)."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    pinned = paramiko.PKey.from_type_string(key_type, base64.b64decode(key_base64))
    client.get_host_keys().add(known_hosts_entry(host, port), key_type, pinned)
    try:
        client.connect(host, port=port, username=username, pkey=pkey, timeout=CONNECT_TIMEOUT_S,
                       banner_timeout=CONNECT_TIMEOUT_S, auth_timeout=CONNECT_TIMEOUT_S, allow_agent=False,
                       look_for_keys=False)
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise HostKeyChanged(
            f"the host key of {host}:{port} changed: pinned {pinned_fingerprint}, the server now presents "
            f"{fingerprint(exc.key)} ({exc.key.get_name()}). This may be an attack; if the node was reinstalled, "
            "remove its pinned key under Provisioning > Host keys and confirm the new one."
        ) from None
    except paramiko.AuthenticationException:
        client.close()
        raise AuthFailed(
            f"{host}:{port} refused the key for user {username!r} (is the credential's public key in that "
            "user's authorized_keys?)"
        ) from None
    except paramiko.SSHException as exc:
        client.close()
        if "not found in known_hosts" in str(exc):
            raise HostKeyUnknown(f"{host}:{port} presented a host key of another type than the pinned one") from None
        raise Unreachable(f"SSH to {host}:{port} failed: {exc}") from None
    except OSError as exc:
        client.close()
        raise Unreachable(_describe_network_error(host, port, exc)) from None
    return Connection(client, username=username)
