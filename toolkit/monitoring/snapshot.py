"""`toolkit monitor snapshot`: the Grafana dashboard rendered to one PNG, straight from Prometheus.

For hosts where Grafana is not installed (or not reachable): the panels' own PromQL runs through
Prometheus' `/api/v1/query_range`, so the picture shows exactly what the dashboard would.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from toolkit.errors import ToolkitError
from toolkit.monitoring.dashboard import Panel, Target, load_dashboard, panel_queries


class SnapshotError(ToolkitError):
    """Prometheus unreachable or answering an error, a bad range, or nothing to plot."""


@dataclass(frozen=True)
class Series:
    """One returned series, labelled as the panel's legend format would label it."""

    label: str
    times: tuple[datetime, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class SnapshotResult:
    """What a snapshot contains: the file, and which panels had data."""

    out: Path
    panels_with_data: int
    series: int
    empty_panels: tuple[str, ...]

    def __str__(self) -> str:
        empty = f" (empty: {', '.join(self.empty_panels)})" if self.empty_panels else ""
        return (f"{self.panels_with_data} panels with data, {self.series} series, "
                f"{len(self.empty_panels)} empty{empty}")


_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: Grafana unit ids -> axis labels.
_UNIT_LABELS = {
    "s": "seconds", "bytes": "bytes", "percentunit": "fraction (0-1)", "percent": "percent",
    "reqps": "requests/s", "short": "", "none": "",
}


def parse_range(text: str) -> int:
    """Seconds in a Prometheus-style duration (`90s`, `15m`, `1h`, `1h30m`, `7d`) or plain seconds.

    Raises:
        SnapshotError: anything else, or a zero duration.
    """
    text = text.strip()
    if text.isdigit():
        seconds = int(text)
    elif text and _DURATION.sub("", text) == "":
        seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION.findall(text))
    else:
        raise SnapshotError(f"--range {text!r} is not a duration; use e.g. 15m, 1h, 1h30m or 1d")
    if seconds <= 0:
        raise SnapshotError(f"--range {text!r} is empty; use a positive duration such as 1h")
    return seconds


def format_range(seconds: int) -> str:
    """The inverse of `parse_range`, for titles and messages (`5400` -> `1h30m`)."""
    parts = []
    for unit in ("w", "d", "h", "m", "s"):
        count, seconds = divmod(seconds, _UNIT_SECONDS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def _legend(legend_format: str | None, labels: dict[str, str]) -> str:
    if legend_format and legend_format != "__auto":
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), legend_format)
    shown = {k: v for k, v in labels.items() if k != "__name__"}
    name = labels.get("__name__", "")
    return name + ("{" + ", ".join(f'{k}="{v}"' for k, v in shown.items()) + "}" if shown else "")


def _query_range(
    client: httpx.Client, base_url: str, expr: str, start: float, end: float, step_s: int,
    where: str,
) -> list[dict[str, Any]]:
    try:
        response = client.get(f"{base_url}/api/v1/query_range",
                              params={"query": expr, "start": start, "end": end, "step": step_s})
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise SnapshotError(f"cannot reach Prometheus at {base_url} ({exc}); start it or fix "
                            "--prometheus") from None
    try:
        body = response.json()
    except ValueError:
        raise SnapshotError(f"{base_url} answered HTTP {response.status_code} without JSON; "
                            "is --prometheus the Prometheus base URL?") from None
    if body.get("status") != "success":
        raise SnapshotError(f"{where}: Prometheus rejected the query ({body.get('error')}); "
                            "fix the panel's expr in the dashboard")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _series(target: Target, result: list[dict[str, Any]]) -> list[Series]:
    found = []
    for item in result:
        points = [(float(t), float(v)) for t, v in item.get("values", [])]
        finite = [(t, v) for t, v in points if math.isfinite(v)]
        if finite:
            found.append(Series(
                _legend(target.legend_format, item.get("metric", {})),
                tuple(datetime.fromtimestamp(t) for t, _ in finite),
                tuple(v for _, v in finite),
            ))
    return found


def _plot(panels: list[tuple[Panel, list[Series]]], title: str, out: Path) -> None:
    # Figure + FigureCanvasAgg rather than pyplot: no global backend or figure state, so a
    # snapshot works headless and inside a server process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, date2num
    from matplotlib.figure import Figure

    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(7 * cols, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    for index, (panel, series) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, index + 1)
        for line in series:
            ax.plot(date2num(line.times), line.values, label=line.label)
        ax.set_title(f"{panel.row} / {panel.title}" if panel.row else panel.title, fontsize=10)
        unit = panel.unit or ""
        ax.set_ylabel(panel.axis_label or _UNIT_LABELS.get(unit, unit.removeprefix("suffix:")))
        locator = AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, format="png", dpi=100)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_snapshot(
    prometheus_url: str,
    dashboard_path: Path,
    out: Path,
    range_s: int = 3600,
    step_s: int | None = None,
    variables: dict[str, str] | None = None,
) -> SnapshotResult:
    """Query every panel of the dashboard over the last `range_s` seconds and plot them to `out`.

    Panels whose queries return no finite sample (the vLLM row under an embedded engine, a
    latency quantile with no traffic) are left out of the picture and listed in the result.
    The PNG is written to a temporary file and renamed, so `out` is never half-written.

    Raises:
        SnapshotError: a URL that is not http(s), Prometheus unreachable or rejecting a query,
            or no panel with data at all.
        DashboardError: an unreadable dashboard or a variable without a value.
    """
    base_url = prometheus_url.rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise SnapshotError(f"--prometheus {prometheus_url!r} is not a URL; use "
                            "http://HOST:9090")
    dashboard = load_dashboard(dashboard_path)
    # ~240 points per line, and a rate window of 4 steps (at least 1m) as Grafana's
    # $__rate_interval would pick for a 15s scrape interval.
    step = step_s or max(1, range_s // 240)
    queries = panel_queries(dashboard, variables or {}, rate_interval=f"{max(60, 4 * step)}s",
                            interval=f"{step}s")
    end = time.time()
    by_panel: dict[tuple[int, str], tuple[Panel, list[Series]]] = {}
    with httpx.Client(timeout=30) as client:
        for panel, target in queries:
            where = f"panel {panel.title!r} query {target.ref_id}"
            result = _query_range(client, base_url, target.expr, end - range_s, end, step, where)
            key = (panel.id, panel.title)
            by_panel.setdefault(key, (panel, []))[1].extend(_series(target, result))
    with_data = [(panel, series) for panel, series in by_panel.values() if series]
    empty = tuple(panel.title for panel, series in by_panel.values() if not series)
    if not with_data:
        raise SnapshotError(f"no panel has data in the last {format_range(range_s)} at "
                            f"{base_url}; check {base_url}/targets scrapes the gateway, or "
                            "widen --range")
    name = dashboard.get("title", Path(dashboard_path).stem)
    title = f"{name}: {format_range(range_s)} to {datetime.fromtimestamp(end):%Y-%m-%d %H:%M:%S}"
    _plot(with_data, title, Path(out))
    return SnapshotResult(Path(out), len(with_data), sum(len(s) for _, s in with_data), empty)
