"""Meaning of the common NVIDIA XID codes (NVIDIA's "XID Errors" table), and which ones page an operator."""

from portal.alerts.models import Severity

XID_MEANINGS: dict[int, tuple[str, str]] = {
    13: ("Graphics engine exception", "Usually an application error (illegal address, bad instruction)"),
    31: ("GPU memory page fault", "Usually an application out-of-bounds access"),
    32: ("Invalid or corrupted push buffer stream", "Driver or PCIe problem"),
    43: ("GPU stopped processing", "A user application faulted; the GPU recovered"),
    45: ("Preemptive cleanup, due to previous errors", "Follows another XID; look at the one before it"),
    48: ("Double bit ECC error", "Uncorrectable memory error: drain the GPU and reset it"),
    61: ("Internal micro-controller breakpoint/warning", "Reset the GPU; report to NVIDIA if it repeats"),
    62: ("Internal micro-controller halt", "Reset the GPU"),
    63: ("ECC page retirement or row remapping recorded", "Reset the GPU to apply the remap"),
    64: ("ECC page retirement or row remapper recording failure", "Replace the GPU if it repeats"),
    74: ("NVLink error", "Check NVLink cabling and the GPU; may need a node reboot"),
    79: ("GPU has fallen off the bus", "Hardware or power problem: the GPU is unusable until the node is fixed"),
    92: ("High single-bit ECC error rate", "Watch the GPU; plan replacement"),
    94: ("Contained ECC error", "An application was killed; the GPU keeps running"),
    95: ("Uncontained ECC error", "Reset the GPU: all its applications were affected"),
    119: ("GSP RPC timeout", "Reset the GPU; update the driver if it repeats"),
    120: ("GSP error", "Reset the GPU"),
}

_CRITICAL = {48, 62, 64, 74, 79, 95, 119, 120}
_WARNING = {32, 61, 63, 92, 94}


def xid_meaning(code: int | None) -> str:
    if code is None or code not in XID_MEANINGS:
        return "Unlisted XID: see NVIDIA's XID catalogue"
    title, action = XID_MEANINGS[code]
    return f"{title}. {action}."


def xid_alert(code: int | None) -> tuple[str, str] | None:
    """(severity, title) for XIDs an operator must act on; None for application-level ones."""
    if code in _CRITICAL:
        return Severity.CRITICAL, f"XID {code}: {XID_MEANINGS[code][0]}"
    if code in _WARNING:
        return Severity.WARNING, f"XID {code}: {XID_MEANINGS[code][0]}"
    return None
