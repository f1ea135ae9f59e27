from django import template

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
