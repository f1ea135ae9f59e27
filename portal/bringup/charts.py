"""The bring-up timeline: one row per node, a bar per lifecycle stage from the day it entered it to the next
(or now), and the plan's target day as a line."""

from datetime import datetime, time

from django.utils import timezone

from portal.bringup.selectors import BringUp
from portal.charts import TIME_AXIS, layout, y_axis
from portal.fleet.models import NodeLifecycle

STAGE_COLOURS = {
    NodeLifecycle.PLANNED: "#c9ced6", NodeLifecycle.PROVISIONING: "#7aa6d8", NodeLifecycle.BURN_IN: "#e0b050",
    NodeLifecycle.SELLABLE: "#4c9a62", NodeLifecycle.CORDONED: "#c8553d", NodeLifecycle.RETIRED: "#6b6b6b",
}


def _ms(at: datetime) -> float:
    return at.timestamp() * 1000


def timeline_figure(bringup: BringUp, *, now: datetime | None = None) -> dict:
    now = now or timezone.now()
    bars: dict[str, dict] = {}
    for node in bringup.nodes:
        changes = list(node.lifecycle_changes.all())
        for change, following in zip(changes, [*changes[1:], None], strict=True):
            end = following.at if following else now
            trace = bars.setdefault(change.lifecycle, {
                "type": "bar", "orientation": "h", "name": NodeLifecycle(change.lifecycle).label,
                "marker": {"color": STAGE_COLOURS[change.lifecycle]}, "y": [], "x": [], "base": [],
                "hovertemplate": "%{y}: %{fullData.name}<extra></extra>",
            })
            trace["y"].append(node.hostname)
            trace["base"].append(_ms(change.at))
            trace["x"].append(max(_ms(end) - _ms(change.at), 60_000))
    target = datetime.combine(bringup.target_date, time.min, tzinfo=now.tzinfo)
    return {
        "data": [bars[s] for s in STAGE_COLOURS if s in bars],
        "layout": layout(
            barmode="overlay", hovermode="closest", height=max(220, 28 * len(bringup.nodes) + 90),
            xaxis={**TIME_AXIS, "title": {"text": "Date (UTC)"}}, yaxis=y_axis(autorange="reversed"),
            shapes=[{"type": "line", "x0": _ms(target), "x1": _ms(target), "yref": "paper", "y0": 0, "y1": 1,
                     "line": {"color": "#c8553d", "dash": "dash"}}],
            annotations=[{"x": _ms(target), "yref": "paper", "y": 1, "text": "90-day target"
                          if bringup.plan.target_days == 90 else f"{bringup.plan.target_days}-day target",
                          "showarrow": False, "yanchor": "bottom"}],
        ),
    }
