"""What every plotly figure of the portal shares (plain dicts, drawn by plotly.js from the plotly package): the
layout, and axes whose labels stay level and are never clipped. Each chart names its unit in its title or axis
title, with plain numbers on the ticks."""

# Legends sit under the plot (never a scrolling box over it); axes make room for their labels.
LAYOUT = {"margin": {"l": 60, "r": 20, "t": 30, "b": 40}, "height": 320, "hovermode": "x unified",
          "legend": {"orientation": "h", "yanchor": "top", "y": -0.18, "font": {"size": 11}},
          "xaxis": {"automargin": True, "tickangle": 0}, "yaxis": {"automargin": True}}
# Days (strings YYYY-MM-DD) and times (epoch milliseconds, UTC) on a date axis.
DAY_AXIS = {**LAYOUT["xaxis"], "type": "date", "tickformat": "%b %d"}
TIME_AXIS = {**LAYOUT["xaxis"], "type": "date", "nticks": 7, "tickformat": "%H:%M\n%b %d"}


def y_axis(**extra) -> dict:
    return {**LAYOUT["yaxis"], **extra}


def x_axis(**extra) -> dict:
    return {**LAYOUT["xaxis"], **extra}


def layout(**extra) -> dict:
    return {**LAYOUT, **extra}
