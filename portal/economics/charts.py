"""Plotly figure specs (plain dicts, rendered by plotly.js in the browser: no server-side figure objects)."""

from decimal import Decimal

from portal.economics.selectors import SitePeriod

_LAYOUT = {"margin": {"l": 60, "r": 20, "t": 30, "b": 40}, "height": 320, "legend": {"orientation": "h"},
           "hovermode": "x unified"}


def _num(value: Decimal | None) -> float | None:
    return float(value) if value is not None else None


def cost_per_mtok_chart(periods: list[SitePeriod]) -> dict:
    traces = []
    for period in periods:
        days = period.daily
        traces.append({
            "type": "scatter", "mode": "lines+markers", "name": f"{period.site.name} ({period.site.currency})",
            "x": [f"{d:%Y-%m-%d}" for d, _ in days], "y": [_num(c.per_million_tokens) for _, c in days],
        })
    return {"data": traces, "layout": {**_LAYOUT, "yaxis": {"title": {"text": "cost per 1M tokens"}}}}


def cost_breakdown_chart(periods: list[SitePeriod]) -> dict:
    traces = []
    for period in periods:
        days = period.daily
        x = [f"{d:%Y-%m-%d}" for d, _ in days]
        label = f"{period.site.name} ({period.site.currency})"
        traces.append({"type": "bar", "name": f"{label} total", "x": x, "y": [_num(c.total) for _, c in days]})
        traces.append({"type": "scatter", "mode": "lines", "name": f"{label} unallocated", "x": x,
                       "y": [_num(c.idle) for _, c in days], "line": {"dash": "dot"}})
    return {"data": traces, "layout": {**_LAYOUT, "barmode": "group", "yaxis": {"title": {"text": "cost per day"}}}}


def utilization_curve_chart(points: dict[str, list[tuple[float, Decimal, str]]]) -> dict:
    traces = [
        {"type": "scatter", "mode": "markers", "name": site, "x": [round(u * 100, 1) for u, _, _ in pts],
         "y": [_num(c) for _, c, _ in pts], "text": [d for _, _, d in pts],
         "hovertemplate": "%{text}: %{x}% busy, %{y:.3f} per 1M tokens<extra>%{fullData.name}</extra>"}
        for site, pts in points.items()
    ]
    layout = {**_LAYOUT, "hovermode": "closest", "xaxis": {"title": {"text": "utilization (%)"}},
              "yaxis": {"title": {"text": "cost per 1M tokens"}}}
    return {"data": traces, "layout": layout}


# Node series carry epoch milliseconds: a date axis shows them as UTC times.
_DATE_AXIS = {"type": "date"}


def node_charts(series: dict) -> list[dict]:
    """Utilization, memory, power and temperature per GPU, and tokens/s per endpoint."""
    charts = []
    for key, title, unit in (("util", "Utilization", "%"), ("memory", "Memory used", "MiB"),
                             ("power", "Power", "W"), ("temp", "Temperature", "°C")):
        charts.append({"id": f"chart-{key}", "title": title, "figure": {
            "data": [{"type": "scatter", "mode": "lines", "name": g["name"], "x": g["ts"], "y": g[key]}
                     for g in series["gpus"]],
            "layout": {**_LAYOUT, "height": 260, "xaxis": _DATE_AXIS, "yaxis": {"title": {"text": unit}}},
        }})
    charts.append({"id": "chart-tokens", "title": "Tokens per second (input + output)", "figure": {
        "data": [{"type": "scatter", "mode": "lines", "name": t["name"], "x": t["ts"], "y": t["tps"]}
                 for t in series["tokens"]],
        "layout": {**_LAYOUT, "height": 260, "xaxis": _DATE_AXIS, "yaxis": {"title": {"text": "tokens/s"}}},
    }})
    return charts


def what_if_chart(model, result) -> dict:
    """The site's modelled curve of cost per 1M tokens against utilization, its measured days, and the scenario."""
    xs = [u / 100 for u in range(5, 101, 5)]
    curve = [(x, model.cost_per_million(x)) for x in xs]
    alone = [(x, model.cost_per_million(x, throughput_at=model.measured_utilization)) for x in xs]
    traces = [
        {"type": "scatter", "mode": "lines", "name": "model (this site's measured costs)",
         "x": [round(x * 100) for x, _ in curve], "y": [_num(c) for _, c in curve]},
        {"type": "scatter", "mode": "lines", "name": "utilization alone (throughput as today)",
         "line": {"dash": "dot"}, "x": [round(x * 100) for x, _ in alone], "y": [_num(c) for _, c in alone]},
        {"type": "scatter", "mode": "markers", "name": "measured days",
         "x": [round(u * 100, 1) for u, _ in model.points], "y": [round(c, 4) for _, c in model.points]},
        {"type": "scatter", "mode": "markers", "name": "scenario", "marker": {"size": 14, "symbol": "star"},
         "x": [round(result.utilization * 100, 1)], "y": [_num(result.cost_per_million)]},
    ]
    layout = {**_LAYOUT, "hovermode": "closest", "xaxis": {"title": {"text": "utilization (%)"}},
              "yaxis": {"title": {"text": f"cost per 1M tokens ({model.site.currency})"}, "type": "log"}}
    return {"data": traces, "layout": layout}
