"""Plotly figure specs for the tenant portal (plain dicts, drawn by plotly.js: see templates/includes/figure.html)."""

from datetime import date, timedelta

from portal.capacity.selectors import UsageLine
from portal.charts import DAY_AXIS, layout, y_axis


def usage_by_day_chart(lines: list[UsageLine], *, start: date, end: date) -> dict:
    """Tokens (input + output) per UTC day, one stacked bar series per model; days without usage show as zero."""
    days = [start + timedelta(days=i) for i in range((end - start).days + 1)]
    by_model: dict[str, dict[date, int]] = {}
    for line in lines:
        if line.day is not None:
            per_day = by_model.setdefault(line.model, {})
            per_day[line.day.date()] = per_day.get(line.day.date(), 0) + line.tokens
    traces = [
        {"type": "bar", "name": model, "x": [f"{d:%Y-%m-%d}" for d in days], "y": [per_day.get(d, 0) for d in days]}
        for model, per_day in sorted(by_model.items())
    ]
    return {"data": traces, "layout": layout(height=340, barmode="stack", xaxis=DAY_AXIS,
                                             yaxis=y_axis(title={"text": "tokens per day"}, tickformat=".3~s"))}
