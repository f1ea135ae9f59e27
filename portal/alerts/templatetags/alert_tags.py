from django import template

from portal.telemetry.xid import xid_meaning as meaning

register = template.Library()


@register.filter
def xid_meaning(code: int | None) -> str:
    """What an XID means and what to do about it (NVIDIA's XID table)."""
    return meaning(code)
