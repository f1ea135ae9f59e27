"""Plotly figure specs for SLA compliance (plain dicts, drawn by plotly.js: see templates/includes/figure.html)."""

from portal.charts import TIME_AXIS, layout, y_axis
from portal.sla.models import SLI_UNITS, SlaEvaluation, Sli


def _axis(sli: str) -> dict:
    unit = SLI_UNITS[Sli(sli)]
    return y_axis(title={"text": "seconds" if unit == "s" else "percent"}, rangemode="tozero",
                  tickformat=".2~f" if unit == "s" else ".1f")


def sli_chart(sli: str, evaluations: list[SlaEvaluation], *, name: str = "measured") -> dict:
    """One SLI over time (each evaluation window's value) against its target as a dashed step line."""
    x = [f"{e.window_end:%Y-%m-%dT%H:%M}Z" for e in evaluations]
    colors = ["#c0392b" if e.compliant is False else "#2e7d4f" for e in evaluations]
    return {"data": [
        {"type": "scatter", "mode": "lines+markers", "name": name, "x": x, "y": [e.value for e in evaluations],
         "marker": {"color": colors, "size": 5}, "line": {"color": "#4a6fd1"}},
        {"type": "scatter", "mode": "lines", "name": "target", "x": x, "y": [float(e.target) for e in evaluations],
         "line": {"dash": "dash", "color": "#888", "shape": "hv"}},
    ], "layout": layout(height=280, xaxis=TIME_AXIS, yaxis=_axis(sli))}


def fleet_sli_chart(sli: str, series: dict[str, list[SlaEvaluation]]) -> dict:
    """One SLI across tenants: a line per tenant, and a dashed line per distinct target."""
    traces = []
    targets: dict[float, list[str]] = {}
    for tenant_name, evaluations in sorted(series.items()):
        x = [f"{e.window_end:%Y-%m-%dT%H:%M}Z" for e in evaluations]
        traces.append({"type": "scatter", "mode": "lines", "name": tenant_name, "x": x,
                       "y": [e.value for e in evaluations]})
        if evaluations:
            targets.setdefault(float(evaluations[-1].target), []).append(tenant_name)
    xs = [e.window_end for evs in series.values() for e in evs]
    if xs:
        span = [f"{min(xs):%Y-%m-%dT%H:%M}Z", f"{max(xs):%Y-%m-%dT%H:%M}Z"]
        for target, names in sorted(targets.items()):
            traces.append({"type": "scatter", "mode": "lines", "name": f"target {target:g} ({', '.join(names)})",
                           "x": span, "y": [target, target], "line": {"dash": "dash", "color": "#888"}})
    return {"data": traces, "layout": layout(height=280, xaxis=TIME_AXIS, yaxis=_axis(sli))}


def goodput_chart(hours: list, targets: dict[str, float]) -> dict:
    """Per hour, the share of requests (tokens, for ITL) that met each latency target (sla.goodput)."""
    x = [f"{ts:%Y-%m-%dT%H:%M}Z" for ts, _g in hours]
    traces = [{"type": "scatter", "mode": "lines", "name": f"{Sli(sli).label} ≤ {target:g} s", "x": x,
               "y": [None if g.shares[sli] is None else round(100 * g.shares[sli], 2) for _ts, g in hours]}
              for sli, target in targets.items()]
    return {"data": traces, "layout": layout(height=280, xaxis=TIME_AXIS, yaxis=y_axis(
        title={"text": "percent within target"}, range=[0, 100.5], tickformat=".0f"))}
