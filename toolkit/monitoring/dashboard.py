"""Read a Grafana dashboard as data: its panels, their PromQL, and the metrics that PromQL names.

`toolkit monitor snapshot` renders the panels without Grafana, and the tests check that every
query names only contract metrics; both need the same flattening of rows and the same
substitution of Grafana's `$variables`, so it lives here once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError


class DashboardError(ToolkitError):
    """A dashboard file that cannot be read, or a query with a variable nobody set."""


@dataclass(frozen=True)
class Target:
    """One PromQL query of a panel."""

    ref_id: str
    expr: str
    legend_format: str | None


@dataclass(frozen=True)
class Panel:
    """A dashboard panel with the row it sits in (`None` for rows and for panels above any row)."""

    id: int
    title: str
    type: str
    row: str | None
    unit: str | None
    axis_label: str | None
    datasource: dict[str, str] | None
    targets: tuple[Target, ...]


def load_dashboard(path: Path) -> dict[str, Any]:
    """Parse a dashboard JSON file (the dashboard model itself, as Grafana exports it).

    Raises:
        DashboardError: a missing file, invalid JSON, or JSON without a `panels` list.
    """
    try:
        dashboard = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DashboardError(f"dashboard {path} not found; pass --dashboard FILE.json") from None
    except json.JSONDecodeError as exc:
        raise DashboardError(f"dashboard {path} is not valid JSON ({exc}); re-export it") from None
    if not isinstance(dashboard, dict) or not isinstance(dashboard.get("panels"), list):
        raise DashboardError(f"dashboard {path} has no 'panels' list; export the dashboard model")
    return dashboard


def _panel(raw: dict[str, Any], row: str | None) -> Panel:
    defaults = raw.get("fieldConfig", {}).get("defaults", {})
    targets = tuple(
        Target(t.get("refId", ""), t["expr"], t.get("legendFormat"))
        for t in raw.get("targets", []) if t.get("expr")
    )
    return Panel(
        id=raw.get("id", 0), title=raw.get("title", ""), type=raw.get("type", ""), row=row,
        unit=defaults.get("unit"), axis_label=defaults.get("custom", {}).get("axisLabel"),
        datasource=raw.get("datasource"), targets=targets,
    )


def list_panels(dashboard: dict[str, Any]) -> list[Panel]:
    """Every panel in layout order, rows included, each tagged with the row that holds it.

    Grafana stores a collapsed row's panels inside the row and an expanded row's panels after
    it at top level, so both layouts are read.
    """
    panels: list[Panel] = []
    row: str | None = None
    for raw in dashboard.get("panels", []):
        if raw.get("type") == "row":
            row = raw.get("title", "")
            panels.append(_panel(raw, None))
            panels.extend(_panel(child, row) for child in raw.get("panels", []))
        else:
            panels.append(_panel(raw, row))
    return panels


_VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)(?::\w+)?\}|\$([A-Za-z_]\w*)")


def _default_variables(dashboard: dict[str, Any]) -> dict[str, str]:
    """"All" for every template variable, as a regex, and the datasource variable's uid."""
    values: dict[str, str] = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        name = variable.get("name", "")
        values[name] = "prometheus" if variable.get("type") == "datasource" else ".*"
    return values


def _substitute(expr: str, values: dict[str, str], where: str) -> str:
    """Replace `$name` and `${name}` (and `${name:format}`) in `expr` with `values`.

    Raises:
        DashboardError: a variable with no value, naming the `--var` flag that would set it.
    """

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise DashboardError(f"{where}: variable ${name} has no value; pass --var {name}=VALUE")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def panel_queries(
    dashboard: dict[str, Any],
    variables: dict[str, str],
    rate_interval: str = "1m",
    interval: str = "15s",
) -> list[tuple[Panel, Target]]:
    """Each panel's targets with Grafana's variables replaced, ready for Prometheus' API.

    Template variables not in `variables` mean "All" (`.*`); `$__rate_interval` and
    `$__interval` take the given durations because no Grafana is there to compute them.
    """
    values = {**_default_variables(dashboard), **variables,
              "__rate_interval": rate_interval, "__interval": interval}
    queries: list[tuple[Panel, Target]] = []
    for panel in list_panels(dashboard):
        for target in panel.targets:
            where = f"panel {panel.title!r} query {target.ref_id}"
            expr = _substitute(target.expr, values, where)
            queries.append((panel, Target(target.ref_id, expr, target.legend_format)))
    return queries


_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_LABEL_LISTS = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
_IDENTIFIER = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "atan2", "inf", "nan",
})


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression reads.

    A regex pass rather than a parser: strings, label matchers, range and subquery durations and
    label lists (`by (...)`, `on (...)`) are removed, then every identifier not called as a
    function and not a keyword is a metric. Enough for dashboards and alert rules, which is
    what it checks.
    """
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _LABEL_LISTS.sub("", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS}
