"""Which XIDs page an operator, and what an XID means (from NVIDIA's catalog, portal.health.catalog)."""

from portal.alerts.models import Severity
from portal.health.catalog import CATALOG

# The operator's pager, apart from the placement policy (portal.health): faults that need a person now are
# critical; memory events the GPU survived, and PCIe stream errors, are warnings; application faults page no one.
_CRITICAL = {48, 62, 64, 74, 79, 95, 119, 120}
_WARNING = {32, 61, 63, 92, 94}


def xid_meaning(code: int | None) -> str:
    entry = CATALOG.get(code) if code is not None else None
    if entry is None:
        return "Unlisted XID: see NVIDIA's XID catalogue"
    return f"{entry.title}. {entry.note}"


def xid_alert(code: int | None) -> tuple[str, str] | None:
    """(severity, title) for XIDs an operator must act on; None for application-level ones."""
    if code in _CRITICAL:
        return Severity.CRITICAL, f"XID {code}: {CATALOG[code].title}"
    if code in _WARNING:
        return Severity.WARNING, f"XID {code}: {CATALOG[code].title}"
    return None
