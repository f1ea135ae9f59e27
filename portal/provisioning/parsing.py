"""Pure parsers: the operator's host list, nvidia-smi's --query-gpu CSV, df, /etc/os-release, known_hosts."""

import base64
import csv
import hashlib
import ipaddress
import re
import shlex
from dataclasses import dataclass

import paramiko

# What preflight asks nvidia-smi for; the order is the CSV's column order.
QUERY_GPU_FIELDS = ("index", "name", "uuid", "pci.bus_id", "driver_version", "memory.total", "mig.mode.current",
                    "mig.mode.pending")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
_IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
_USER = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")


@dataclass(frozen=True)
class HostSpec:
    user: str
    host: str
    port: int
    name: str


def valid_host(host: str) -> bool:
    if _IPV4.match(host):
        return all(int(part) <= 255 for part in host.split("."))
    if ":" in host:  # IPv6 literal
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    return bool(_HOSTNAME.match(host))


def parse_host_line(line: str, *, default_user: str, default_port: int) -> HostSpec:
    """`[user@]host[:port] [name]`; an IPv6 host is written in brackets: `root@[fd00::5]:22`. ValueError says what
    is wrong."""
    parts = line.split()
    if len(parts) > 2:
        raise ValueError("expected [user@]host[:port] and an optional node name")
    target, name = parts[0], parts[1] if len(parts) == 2 else ""
    user = default_user
    if "@" in target:
        user, target = target.rsplit("@", 1)
        if not _USER.match(user):
            raise ValueError(f"{user!r} is not a valid user name")
    port = default_port
    if target.startswith("["):
        host, sep, rest = target[1:].partition("]")
        if not sep:
            raise ValueError("unclosed [ in an IPv6 address")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"unexpected {rest!r} after the address")
            port = _port(rest[1:])
    elif target.count(":") == 1:
        host, port_text = target.split(":")
        port = _port(port_text)
    else:
        host = target
    if not valid_host(host):
        raise ValueError(f"{host!r} is not a valid host name or address")
    name = name or host
    if not valid_node_name(name):
        raise ValueError(f"{name!r} is not a valid node name (letters, digits, . _ -)")
    return HostSpec(user=user, host=host, port=port, name=name)


def valid_node_name(name: str) -> bool:
    """A hostname a node may report itself under (letters, digits, . _ -)."""
    return bool(_NODE_NAME.match(name))


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"port {text!r} must be a number from 1 to 65535")
    return int(text)


def parse_host_lines(text: str, *, default_user: str, default_port: int) -> list[HostSpec]:
    """Every non-blank, non-comment line; a list of `line N: problem` messages if any line is wrong."""
    specs, errors, seen = [], [], set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            spec = parse_host_line(line, default_user=default_user, default_port=default_port)
        except ValueError as exc:
            errors.append(f"line {number}: {exc}")
            continue
        if (spec.host, spec.port) in seen:
            errors.append(f"line {number}: {spec.host}:{spec.port} is listed twice")
            continue
        seen.add((spec.host, spec.port))
        specs.append(spec)
    if errors:
        raise HostListError(errors)
    return specs


class HostListError(ValueError):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    pci_bus_id: str
    driver_version: str
    memory_total_mib: int | None
    mig_current: bool | None
    mig_pending: bool | None

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def _na(value: str) -> str | None:
    """nvidia-smi writes `[N/A]`, `N/A`, `[Not Supported]` or `[Insufficient Permissions]` for absent values."""
    value = value.strip()
    return None if not value or value in {"N/A", "[N/A]"} or value.startswith("[") else value


def _mib(value: str) -> int | None:
    value = _na(value)
    if value is None:
        return None
    number = value.removesuffix("MiB").strip()
    return int(number) if number.isdigit() else None


def _enabled(value: str) -> bool | None:
    value = _na(value)
    return None if value is None else value.lower() == "enabled"


def _query_csv(text: str, required: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of `nvidia-smi --query-gpu=... --format=csv` by column name (units in brackets stripped, so the
    full ~210-column capture reads the same as our queries); ValueError naming what is missing or malformed."""
    try:
        # By lines, so output relayed with CR-LF line ends reads the same.
        rows = [r for r in csv.reader(text.strip().splitlines(), skipinitialspace=True) if r]
    except csv.Error as exc:
        raise ValueError(f"nvidia-smi output is not CSV: {exc}") from None
    if not rows:
        raise ValueError("nvidia-smi printed nothing")
    header = [h.split(" [")[0].strip() for h in rows[0]]
    missing = [f for f in required if f not in header]
    if missing:
        raise ValueError(f"nvidia-smi output has no {', '.join(missing)} column (not --query-gpu CSV?)")
    table = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"nvidia-smi CSV line {number} has {len(row)} fields, the header {len(header)}")
        table.append(dict(zip(header, row, strict=True)))
    return table


def parse_query_gpu_csv(text: str) -> list[GpuInfo]:
    """Rows of `nvidia-smi --query-gpu=... --format=csv` (with its header). Columns are found by name, units in
    brackets stripped (`memory.total [MiB]`), so the full ~210-column capture parses the same as our query."""
    gpus = []
    for values in _query_csv(text, ("index", "name", "uuid", "driver_version")):
        gpus.append(GpuInfo(
            index=int(values["index"]),
            name=values["name"].strip(),
            uuid=values["uuid"].strip(),
            pci_bus_id=(values.get("pci.bus_id") or "").strip(),
            driver_version=values["driver_version"].strip(),
            memory_total_mib=_mib(values.get("memory.total", "")),
            mig_current=_enabled(values.get("mig.mode.current", "")),
            mig_pending=_enabled(values.get("mig.mode.pending", "")),
        ))
    return gpus


MEMORY_HEALTH_FIELDS = ("index", "ecc.errors.uncorrected.volatile.total", "retired_pages.pending",
                        "remapped_rows.pending", "remapped_rows.failure")


@dataclass(frozen=True)
class MemoryHealth:
    """A GPU's memory faults as nvidia-smi reports them; None where the GPU does not report one (MIG mode hides
    the row remapper, and only pre-Ampere GPUs retire pages)."""

    index: int
    uncorrected_volatile: int | None
    retired_pending: bool | None
    remap_pending: bool | None
    remap_failure: bool | None

    @property
    def problems(self) -> list[str]:
        found = []
        if self.uncorrected_volatile:
            found.append(f"{self.uncorrected_volatile} uncorrected ECC error(s) since the driver loaded")
        if self.retired_pending:
            found.append("a page retirement is pending (needs a GPU reset)")
        if self.remap_pending:
            found.append("a row remap is pending (needs a GPU reset)")
        if self.remap_failure:
            found.append("row remapping failed: the GPU is out of spare rows")
        return found


def parse_memory_health_csv(text: str) -> list[MemoryHealth]:
    """Rows of `nvidia-smi --query-gpu=<MEMORY_HEALTH_FIELDS> --format=csv`, columns found by name."""
    found = []
    for values in _query_csv(text, MEMORY_HEALTH_FIELDS):
        count = _na(values["ecc.errors.uncorrected.volatile.total"])
        found.append(MemoryHealth(
            index=int(values["index"]),
            uncorrected_volatile=int(count) if count is not None and count.isdigit() else None,
            retired_pending=_yes(values["retired_pages.pending"]),
            remap_pending=_yes(values["remapped_rows.pending"]),
            remap_failure=_yes(values["remapped_rows.failure"]),
        ))
    return found


def _yes(value: str) -> bool | None:
    value = _na(value)
    return None if value is None else value.lower() == "yes"


def parse_df_available_mib(text: str) -> int:
    """Available space from `df -Pk PATH` (POSIX format: the 4th field of the last line, in KiB)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) < 2:
        raise ValueError("df printed no filesystem line")
    fields = lines[-1].split()
    if len(fields) < 6 or not fields[3].isdigit():
        raise ValueError(f"unexpected df line: {lines[-1]!r}")
    return int(fields[3]) // 1024


def parse_os_release(text: str) -> str:
    """PRETTY_NAME (else NAME VERSION_ID) from /etc/os-release."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            try:
                values[key.strip()] = " ".join(shlex.split(value))
            except ValueError:
                values[key.strip()] = value.strip().strip('"')
    return values.get("PRETTY_NAME") or " ".join(filter(None, [values.get("NAME"), values.get("VERSION_ID")]))


def parse_python_version(text: str) -> tuple[int, int, int] | None:
    match = re.search(r"Python (\d+)\.(\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint: `SHA256:` + unpadded base64 of the SHA-256 of the key blob."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def known_hosts_entry(host: str, port: int) -> str:
    """How known_hosts names a host: `host` on port 22, `[host]:port` otherwise."""
    return host if port == 22 else f"[{host}]:{port}"


def known_hosts_lookup(text: str, *, host: str, port: int) -> list[paramiko.PKey]:
    """Keys a known_hosts text lists for host:port (hashed entries included); revoked (@revoked) and CA
    (@cert-authority) lines are ignored. ValueError for a line that is not a known_hosts entry."""
    keys = paramiko.HostKeys()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#") or line.startswith("@"):
            continue
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line, lineno=number)
        except (paramiko.SSHException, ValueError, TypeError) as exc:
            raise ValueError(f"known_hosts line {number}: {exc}") from None
        if entry is None:
            raise ValueError(f"known_hosts line {number} is not a host key entry")
        for name in entry.hostnames:
            keys.add(name, entry.key.get_name(), entry.key)
    found = keys.lookup(known_hosts_entry(host, port))
    return list(found.values()) if found else []
