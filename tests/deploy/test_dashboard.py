"""The dashboard parses and queries only metrics the code exports, with the contract's labels."""

import json
import re
from typing import Any

import pytest

from deploy.files import DEPLOY
from deploy.metrics_contract import CONTRACT, metrics_in, promql_problems

GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h"}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        (DEPLOY / "grafana" / "tollgate-dashboard.json").read_text()
    )
    return loaded


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's interval variables replaced) of every target."""
    found = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found.append((panel["title"], expr))
    return found


def test_dashboard_is_a_grafana_dashboard() -> None:
    board = dashboard()
    assert board["uid"]
    assert board["title"]
    assert isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize(
    ("title", "expr"), dashboard_queries(), ids=[f"{t}: {e[:40]}" for t, e in dashboard_queries()]
)
def test_dashboard_queries_only_exported_metrics(title: str, expr: str) -> None:
    assert promql_problems(expr) == []


def test_dashboard_shows_every_metric_of_the_contract() -> None:
    shown = {name for _, expr in dashboard_queries() for name in metrics_in(expr)}
    families = {
        re.sub(r"_(bucket|sum|count)$", "", name) if name not in CONTRACT else name
        for name in shown
    }
    assert set(CONTRACT) - families == set()
