"""The metrics contract: names, types, labels and label values shared by the code
(gateway/metrics.py), the dashboard and the alert rules; and PromQL checked against it."""

import ast
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import promql_parser

# The metric names, labels and label values shared by the code (gateway/metrics.py), the
# dashboard and the alert rules. test_metrics_contract_is_what_the_code_exports checks the
# names and types against what gateway.metrics registers; labels and their values are the
# contract's (prometheus-client does not publish a metric's label names).


@dataclass(frozen=True)
class Family:
    type: str  # counter, gauge or histogram
    labels: frozenset[str] = frozenset()
    # For labels with a fixed set of values: those values.
    values: Mapping[str, frozenset[str]] = field(default_factory=dict)


def _family(kind: str, *labels: str, **values: str) -> Family:
    return Family(
        kind,
        frozenset(labels),
        {label: frozenset(allowed.split()) for label, allowed in values.items()},
    )


PHASES = "submit poll cancel download"
QUEUES = "generate callbacks"

CONTRACT: dict[str, Family] = {
    "tollgate_http_requests_total": _family("counter", "route", "method", "status"),
    "tollgate_http_request_duration_seconds": _family("histogram", "route", "method"),
    "tollgate_tasks_submitted_total": _family("counter", "model"),
    "tollgate_tasks_finished_total": _family(
        "counter", "model", "status", status="completed failed cancelled"
    ),
    "tollgate_tasks_open": _family("gauge", "model", "status", status="pending processing"),
    "tollgate_generation_runs_total": _family(
        "counter", "outcome", outcome="completed failed parked skipped stopped"
    ),
    "tollgate_queue_depth": _family("gauge", "queue", queue=QUEUES),
    "tollgate_queue_oldest_job_age_seconds": _family("gauge", "queue", queue=QUEUES),
    "tollgate_upstream_requests_total": _family(
        "counter",
        "provider",
        "channel",
        "phase",
        "outcome",
        phase=PHASES,
        outcome="ok timeout unavailable rate_limited rejected bad_response",
    ),
    "tollgate_upstream_request_duration_seconds": _family(
        "histogram", "provider", "channel", "phase", phase=PHASES
    ),
    "tollgate_channel_circuit_opened_total": _family("counter", "channel"),
    "tollgate_upstream_jobs_abandoned_total": _family(
        "counter",
        "provider",
        "channel",
        "reason",
        "cancel",
        reason="deadline failover cancel",
        cancel="confirmed failed unsupported",
    ),
    "tollgate_callback_attempts_total": _family("counter", "outcome", outcome="delivered failed"),
    "tollgate_callback_give_ups_total": _family("counter"),
    # `tenant` only with TOLLGATE_METRICS_TENANT_LABELS=true.
    "tollgate_credits_reserved_microcredits_total": _family("counter", "tenant"),
    "tollgate_credits_captured_microcredits_total": _family("counter", "tenant"),
    "tollgate_credits_released_microcredits_total": _family("counter", "tenant"),
    "tollgate_rate_limit_refusals_total": _family(
        "counter", "scope", scope="key tenant in_flight key_budget"
    ),
    "tollgate_dependency_up": _family("gauge", "dependency", dependency="redis postgres"),
    "tollgate_model_backlog_seconds": _family("gauge", "model"),
    "tollgate_ledger_check_problems": _family("gauge"),
    "tollgate_ledger_check_last_run_timestamp_seconds": _family("gauge"),
    "tollgate_results_deleted_files_total": _family("counter", "backend", backend="file s3"),
    "tollgate_results_deleted_bytes_total": _family("counter", "backend", backend="file s3"),
    "tollgate_storage_errors_total": _family(
        "counter", "backend", "operation", backend="file s3", operation="put delete"
    ),
}

# Series Prometheus itself records for every scrape target.
SYNTHETIC = {"up": _family("gauge")}
# Labels every scraped series carries: the target's (scrape-kubernetes.yaml adds the last two).
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod"})


def family_name(name: str, family: Family) -> str:
    """The name prometheus-client gives the family (a counter's without ``_total``)."""
    return name.removesuffix("_total") if family.type == "counter" else name


def families_in_code() -> dict[str, str]:
    """Family name -> type of every ``tollgate_`` metric the code exports: what
    gateway.metrics registers in prometheus-client's default registry, and the gauges it
    builds at each scrape from PostgreSQL and Redis (``GaugeMetricFamily`` in its source)."""
    from prometheus_client import REGISTRY

    import gateway.metrics  # registers its metrics

    found = {f.name: f.type for f in REGISTRY.collect() if f.name.startswith("tollgate_")}
    source = ast.parse(Path(gateway.metrics.__file__).read_text())
    for node in ast.walk(source):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "GaugeMetricFamily"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found[node.args[0].value] = "gauge"
    return found


def exported_series() -> dict[str, Family]:
    """Every series name a query may use -> the family that labels it."""
    series = dict(SYNTHETIC)
    for name, family in CONTRACT.items():
        if family.type == "histogram":
            series[name + "_bucket"] = Family(family.type, family.labels | {"le"}, family.values)
            series[name + "_sum"] = family
            series[name + "_count"] = family
        else:
            series[name] = family
    return series


# --- PromQL -------------------------------------------------------------------------------

_SIMPLE_ALTERNATION = re.compile(r"[A-Za-z0-9_]+(\|[A-Za-z0-9_]+)*")


def _selectors(node: Any) -> Iterator[Any]:
    found: list[Any] = []
    promql_parser.walk(
        node, lambda n: found.append(n) if isinstance(n, promql_parser.VectorSelector) else None
    )
    yield from found


def _labels_of(node: Any, series: Mapping[str, Family]) -> frozenset[str]:
    labels = set(TARGET_LABELS)
    for selector in _selectors(node):
        if selector.name in series:
            labels |= series[selector.name].labels
    return frozenset(labels)


def promql_problems(expr: str) -> list[str]:
    """What is wrong with ``expr``: a metric the code does not export, a label its metric
    does not have, a label value outside the contract's. Raises ValueError if it does not
    parse."""
    tree = promql_parser.parse(expr)
    series = exported_series()
    problems: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            family = series.get(node.name) if node.name else None
            if family is None:
                problems.append(f"{node.name or node}: not a metric the code exports")
                return
            for matcher in node.matchers.matchers:
                if matcher.name not in family.labels | TARGET_LABELS:
                    problems.append(f"{node.name}: has no label {matcher.name!r}")
                allowed = family.values.get(matcher.name)
                if allowed is None:
                    continue
                if matcher.op in (promql_parser.MatchOp.Equal, promql_parser.MatchOp.NotEqual):
                    values = {matcher.value}
                elif _SIMPLE_ALTERNATION.fullmatch(matcher.value):
                    values = set(matcher.value.split("|"))
                else:
                    values = set()
                for value in sorted(values - allowed):
                    problems.append(f"{node.name}: {matcher.name}={value!r} never occurs")
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            available = _labels_of(node.expr, series)
            for label in node.modifier.labels:
                if label not in available:
                    problems.append(f"{node.op} by/without {label!r}: no such label below")
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            matching = node.modifier.matching
            available = _labels_of(node.lhs, series) | _labels_of(node.rhs, series)
            for label in matching.labels if matching is not None else ():
                if label not in available:
                    problems.append(f"{node.op} on/ignoring {label!r}: no such label")

    promql_parser.walk(tree, visit)
    return problems


def metrics_in(expr: str) -> set[str]:
    return {s.name for s in _selectors(promql_parser.parse(expr)) if s.name}
