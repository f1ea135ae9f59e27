"""Plotly figure spec of the noisy-neighbour view (a plain dict, drawn by plotly.js: templates/includes/figure.html)."""

from portal.capacity.isolation import NoisyNeighbours
from portal.charts import TIME_AXIS, layout, y_axis


def noisy_neighbours_chart(view: NoisyNeighbours) -> dict:
    """The tenant's TTFT p95 per hour (line, seconds, left axis) over its co-tenants' tokens/s on the shared GPUs
    (bars, right axis), so a latency that climbs with the neighbours' load shows as the two rising together."""
    x = [f"{h.hour:%Y-%m-%dT%H:%M}Z" for h in view.hours]
    return {"data": [
        {"type": "bar", "name": "co-tenants' tokens/s on the shared GPUs", "x": x, "yaxis": "y2",
         "y": [None if h.co_tokens_per_s is None else round(h.co_tokens_per_s, 1) for h in view.hours],
         "marker": {"color": "#c9d3ea"}},
        {"type": "scatter", "mode": "lines+markers", "name": "TTFT p95 on the shared GPUs (s)", "x": x,
         "y": [None if h.ttft_p95_s is None else round(h.ttft_p95_s, 4) for h in view.hours],
         "line": {"color": "#c0392b"}, "marker": {"size": 4}},
    ], "layout": layout(
        height=300, xaxis=TIME_AXIS, bargap=0.15,
        yaxis=y_axis(title={"text": "TTFT p95, seconds"}, rangemode="tozero", tickformat=".2~f"),
        yaxis2=y_axis(title={"text": "tokens/s"}, rangemode="tozero", overlaying="y", side="right",
                      showgrid=False),
    )}
