"""The alert rules parse (PromQL by promql-parser), query only metrics the code exports, and
each has a runbook section."""

import re
from typing import Any

import promql_parser
import pytest
import yaml

from deploy.files import DEPLOY, OPERATIONS, github_anchors, manifests
from deploy.metrics_contract import _selectors, metrics_in, promql_problems


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules_have_the_shape_of_a_prometheus_rule_file() -> None:
    document = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    assert set(document) == {"groups"}
    group_names = [group["name"] for group in document["groups"]]
    assert len(group_names) == len(set(group_names))
    alerts = [rule["alert"] for rule in alert_rules()]
    assert len(alerts) == len(set(alerts))
    for rule in alert_rules():
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
        assert re.fullmatch(r"Tollgate[A-Z][A-Za-z]+", rule["alert"])
        if "for" in rule:
            assert re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert {"summary", "description", "runbook"} <= set(rule["annotations"])


@pytest.mark.parametrize("rule", alert_rules(), ids=[r["alert"] for r in alert_rules()])
def test_alert_queries_only_exported_metrics(rule: dict[str, Any]) -> None:
    assert promql_problems(rule["expr"]) == []


def test_alerts_watch_what_operators_must_be_paged_for() -> None:
    watched = {name for rule in alert_rules() for name in metrics_in(rule["expr"])}
    assert {
        "up",
        "tollgate_http_requests_total",
        "tollgate_queue_oldest_job_age_seconds",
        "tollgate_upstream_requests_total",
        "tollgate_channel_circuit_opened_total",
        "tollgate_callback_give_ups_total",
        "tollgate_ledger_check_problems",
        "tollgate_ledger_check_last_run_timestamp_seconds",
    } <= watched


def test_every_alert_has_a_runbook_section() -> None:
    anchors = github_anchors(OPERATIONS.read_text())
    for rule in alert_rules():
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert path == "docs/operations.md", rule["alert"]
        assert anchor == rule["alert"].lower(), rule["alert"]
        assert anchor in anchors, rule["alert"]


def scrape_jobs() -> dict[str, set[str]]:
    """Job names each scrape configuration gives Tollgate's targets."""
    kubernetes = yaml.safe_load((DEPLOY / "prometheus" / "scrape-kubernetes.yaml").read_text())
    (job,) = kubernetes["scrape_configs"]
    rule = next(r for r in job["relabel_configs"] if r.get("target_label") == "job")
    assert rule["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]
    scraped = set()
    for _, doc in manifests():
        template = doc["spec"]["template"] if doc["kind"] == "Deployment" else None
        if template and template["metadata"].get("annotations", {}).get("prometheus.io/scrape"):
            component = template["metadata"]["labels"]["app.kubernetes.io/component"]
            scraped.add(rule["replacement"].replace("$1", component))
    compose_jobs = yaml.safe_load((DEPLOY / "prometheus" / "scrape-compose.yaml").read_text())
    return {
        "kubernetes": scraped,
        "compose": {job["job_name"] for job in compose_jobs["scrape_configs"]},
    }


def test_alerts_name_the_jobs_the_scrape_configurations_make() -> None:
    jobs = scrape_jobs()
    assert jobs["kubernetes"] == jobs["compose"]
    named = set()
    for rule in alert_rules():
        for selector in _selectors(promql_parser.parse(rule["expr"])):
            for matcher in selector.matchers.matchers:
                if matcher.name == "job":
                    named |= set(matcher.value.split("|"))
    assert named
    assert named <= jobs["compose"]
