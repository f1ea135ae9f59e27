from decimal import ROUND_HALF_UP, Decimal
from html import escape

from django import template
from django.urls import reverse
from django.utils.safestring import mark_safe

register = template.Library()


@register.filter
def pct(value: float | None) -> str:
    """A percentage with one decimal, or an em dash when there is no reading."""
    if value is None:
        return "—"
    return f"{value:.1f}%"


@register.filter
def util_class(value: float | None) -> str:
    """CSS class for a utilization cell: u0 (idle) .. u10 (saturated), nodata when unknown."""
    if value is None:
        return "nodata"
    return f"u{min(10, max(0, round(value / 10)))}"


@register.filter
def money(value: Decimal | None, currency: str = "") -> str:
    """Currency amount: four decimals below 10 (per-token prices are small), two with separators above."""
    if value is None:
        return "—"
    places = "0.0001" if abs(value) < 10 else "0.01"
    amount = value.quantize(Decimal(places), rounding=ROUND_HALF_UP)
    return f"{currency} {amount:,}".strip()


@register.filter
def ratio_pct(value: float | None) -> str:
    """A 0..1 ratio as a percentage."""
    if value is None:
        return "—"
    return f"{value * 100:.1f}%"


@register.filter
def intcomma_safe(value) -> str:
    if value is None or value == "—":
        return "—"
    return f"{int(value):,}"


@register.simple_tag
def holder(holders: dict, gpu_id: int, mig_id: int | None) -> str:
    """The tenant holding a unit now, or "free"."""
    tenant = holders.get((gpu_id, mig_id))
    return tenant.name if tenant else "free"


@register.filter
def signed_pct(value: float | None) -> str:
    """A relative change as a signed percentage, with a typographic minus for decreases: -0.4 gives -40.0%."""
    if value is None:
        return "—"
    sign = "+" if value > 0 else "\u2212" if value < 0 else ""
    return f"{sign}{abs(value) * 100:.1f}%"


@register.simple_tag
def gpu_cells(gpus) -> str:
    """The grid cells of a node's GPUs, built with plain string formatting: through the template engine (or
    format_html per cell) the 10,000 cells of a large fleet cost most of the page's time. Every string that came
    from an agent is escaped; the rest are numbers and our own class names."""
    cells = []
    names: dict[str, str] = {}  # a fleet has a handful of GPU models: escape each name once
    for gpu in gpus:
        name = names.get(gpu.name)
        if name is None:
            name = names[gpu.name] = escape(gpu.name)
        util = gpu.util
        if util is None:
            css, reading = "nodata", "—"
        else:
            css, reading = f"u{min(10, max(0, round(util / 10)))}", f"{util:.1f}%"
        temp = "" if gpu.temp is None else f" · {gpu.temp:.0f} °C"
        mig = ""
        if gpu.mig_slices:
            slices = "".join(f'<span class="slice s{n}" title="MIG {escape(p)}"></span>' for p, n in gpu.mig_slices)
            mig = f'<div class="mig">{slices}</div>'
        cells.append(f'<div class="gpu {css}" title="GPU {gpu.index} · {name} · {reading} utilization{temp}">'
                     f'{mig}</div>')
    return mark_safe("".join(cells))  # noqa: S308 - agent-supplied strings are escaped above


@register.simple_tag
def node_cards(nodes) -> str:
    """The grid's node cards, built like gpu_cells: a template loop over a thousand cards costs half a second."""
    cards = []
    # One reverse() for all cards (a thousand of them cost a fifth of the page); the id is the only variable part.
    url_prefix = reverse("fleet:node", args=[0]).removesuffix("0/")
    for node in nodes:
        simulated = ' <span class="badge sim" title="Reported by a simulated agent">simulated</span>' if (
            node.simulated) else ""
        status = escape(node.status)
        hostname = escape(node.hostname)
        cards.append(
            f'<a class="node status-{status}" href="{url_prefix}{node.pk}/" data-node="{hostname}">'
            f'<div class="nodehead"><strong>{hostname}</strong>{simulated}'
            f'<span class="badge status-{status}">{escape(node.status_label)}</span></div>'
            f'<div class="gpus">{gpu_cells(node.gpus)}</div></a>'
        )
    return mark_safe("".join(cards))  # noqa: S308 - agent-supplied strings are escaped above
