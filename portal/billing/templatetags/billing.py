from decimal import Decimal

from django import template

register = template.Library()


@register.filter
def unit_price(value: Decimal | None) -> str:
    """A price per million tokens without trailing zeros beyond the cent: 0.05, 0.045, 2.00 (not 0.050000)."""
    if value is None:
        return ""
    normalized = value.normalize()
    if normalized.as_tuple().exponent > -2:
        return f"{value.quantize(Decimal('0.01')):f}"
    return f"{normalized:f}"
