"""Plotly figure specs (plain dicts, rendered by plotly.js in the browser: no server-side figure objects)."""

from decimal import Decimal

from portal.charts import DAY_AXIS, LAYOUT, TIME_AXIS, x_axis, y_axis
from portal.economics.selectors import SitePeriod


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
    return {"data": traces, "layout": {**LAYOUT, "xaxis": DAY_AXIS,
                                       "yaxis": y_axis(title={"text": "cost per 1M tokens"},
                                                      tickformat=",.2f")}}


def cost_breakdown_chart(periods: list[SitePeriod]) -> dict:
    traces = []
    for period in periods:
        days = period.daily
        x = [f"{d:%Y-%m-%d}" for d, _ in days]
        label = f"{period.site.name} ({period.site.currency})"
        traces.append({"type": "bar", "name": f"{label} total", "x": x, "y": [_num(c.total) for _, c in days]})
        traces.append({"type": "scatter", "mode": "lines", "name": f"{label} unallocated", "x": x,
                       "y": [_num(c.idle) for _, c in days], "line": {"dash": "dot"}})
    return {"data": traces, "layout": {**LAYOUT, "barmode": "group",
                                       "xaxis": DAY_AXIS,
                                       "yaxis": y_axis(title={"text": "cost per day"}, tickformat=",.0f")}}


def utilization_curve_chart(points: dict[str, list[tuple[float, Decimal, str]]]) -> dict:
    traces = [
        {"type": "scatter", "mode": "markers", "name": site, "x": [round(u * 100, 1) for u, _, _ in pts],
         "y": [_num(c) for _, c, _ in pts], "text": [d for _, _, d in pts],
         "hovertemplate": "%{text}: %{x}% busy, %{y:.3f} per 1M tokens<extra>%{fullData.name}</extra>"}
        for site, pts in points.items()
    ]
    layout = {**LAYOUT, "hovermode": "closest",
              "xaxis": x_axis(title={"text": "utilization (%)"}, ticksuffix="%"),
              "yaxis": y_axis(title={"text": "cost per 1M tokens"}, tickformat=",.2f")}
    return {"data": traces, "layout": layout}


# (title with its unit, series key, scale from the series' unit, y tick format)
NODE_CHARTS = (("util", "Utilization (%)", 1, ".0f"), ("memory", "Memory used (GiB)", 1 / 1024, ",.0f"),
               ("power", "Power (W)", 1, ",.0f"), ("temp", "Temperature (°C)", 1, ".0f"))


def _scaled(values: list, scale: float) -> list:
    return values if scale == 1 else [None if v is None else round(v * scale, 1) for v in values]


def node_charts(series: dict) -> list[dict]:
    """Utilization, memory, power and temperature per GPU, and tokens/s per endpoint; each title names its unit
    (the axis carries plain numbers)."""
    charts = []
    for key, title, scale, ticks in NODE_CHARTS:
        charts.append({"id": f"chart-{key}", "title": title, "figure": {
            "data": [{"type": "scatter", "mode": "lines", "name": g["name"], "x": g["ts"], "y": _scaled(g[key], scale)}
                     for g in series["gpus"]],
            "layout": {**LAYOUT, "height": 280, "xaxis": TIME_AXIS, "yaxis": y_axis(tickformat=ticks)},
        }})
    charts.append({"id": "chart-tokens", "title": "Tokens per second (input + output)", "figure": {
        "data": [{"type": "scatter", "mode": "lines", "name": t["name"], "x": t["ts"], "y": t["tps"]}
                 for t in series["tokens"]],
        "layout": {**LAYOUT, "height": 280, "xaxis": TIME_AXIS, "yaxis": y_axis(tickformat=".3~s")},
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
    # A log axis labelled at 1, 2 and 5 of each decade (plotly's "D2"), so no tick goes unlabelled.
    layout = {**LAYOUT, "hovermode": "closest",
              "xaxis": x_axis(title={"text": "utilization (%)"}, ticksuffix="%"),
              "yaxis": y_axis(title={"text": f"cost per 1M tokens ({model.site.currency})"}, type="log",
                             dtick="D2", tickformat=",.2f")}
    return {"data": traces, "layout": layout}
