"""The Grafana dashboard and the Prometheus alerts in deploy/ work with the gateway's metrics.

promtool (Debian's `prometheus` package, installed by `make deps`) checks the rules, runs their
unit tests (deploy/prometheus/alerts_test.yml), and runs every dashboard query on series made up
from docs/metrics.md's tables. Every metric name and label value the files use must be one
docs/metrics.md documents: those are the names the gateway promises.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "sse-gateway.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DEPLOY_README = ROOT / "deploy" / "README.md"
METRICS_DOC = ROOT / "docs" / "metrics.md"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEVERITIES = {"critical", "warning"}
# Names in an expression that are not metric names: operators and modifiers.
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# A name, then "(" when it is a function's (a whole name is taken: no backtracking into it).
IDENTIFIER = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", re.S)
# Grafana's variables, replaced by values Prometheus accepts, to parse a dashboard query.
GRAFANA_VARIABLES = ((re.compile(r"\$__rate_interval"), "5m"), (re.compile(r"\$\w+"), ".*"))


def promtool() -> str:
    """promtool's path. Absent: a skip on a developer's machine, a failure on CI (CI is set)."""
    found = shutil.which("promtool")
    if found is not None:
        return found
    if os.environ.get("CI"):
        pytest.fail(
            "promtool is not installed: `make deps` installs it (Debian package prometheus)"
        )
    pytest.skip(
        "promtool is not installed (Debian package prometheus; `make system-deps` as root "
        "installs it); on CI (CI set) this is a failure"
    )


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


# --------------------------------------------------------------------------- names


class Documented(NamedTuple):
    """A row of docs/metrics.md's tables: the type ("" where the row gives none), its labels."""

    kind: str
    labels: tuple[str, ...]


def documented_metrics() -> dict[str, Documented]:
    """{metric name: Documented} from the tables of docs/metrics.md (columns by their header)."""
    found: dict[str, Documented] = {}
    header: list[str] = []
    for line in METRICS_DOC.read_text().splitlines():
        if not line.startswith("|"):
            header = []
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not header:
            header = cells
            continue
        row = dict(zip(header, cells, strict=False))
        labels = tuple(re.findall(r"`(\w+)`", row.get("Labels", "")))
        for name in re.findall(r"`([a-zA-Z_:][a-zA-Z0-9_:]*)`", row.get("Name", "")):
            found[name] = Documented(row.get("Type", ""), labels)
    return found


def allowed_names() -> set[str]:
    """The names a query may use: the documented ones, and a histogram's three series."""
    names: set[str] = set()
    for name, documented in documented_metrics().items():
        if documented.kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(name)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, labels or keywords)."""
    text = STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = GROUPING.sub("", text)
    return {
        name
        for name, call in IDENTIFIER.findall(text)
        if not call and name.lower() not in PROMQL_KEYWORDS
    }


def test_the_name_reader_finds_metrics_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, event) (rate(a_bucket{job=~"$job", x="b c"}'
        "[$__rate_interval]))) / on (job) group_left (x) b_total offset 5m and c > 1e3 "
        "and without (y) d"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d"}
    assert metric_names("absent(sse_gateway_broker_connected)") == {"sse_gateway_broker_connected"}


def test_the_metrics_document_is_read() -> None:
    documented = documented_metrics()
    assert documented["sse_gateway_delivery_latency_seconds"] == ("histogram", ("event",))
    assert documented["sse_gateway_connections"] == ("gauge", ("brand",))
    assert documented["sse_gateway_connections_closed_total"] == ("counter", ("reason",))
    assert documented["sse_gateway_event_loop_lag_seconds"] == ("gauge", ())
    assert documented["process_max_fds"] == ("", ())
    allowed = allowed_names()
    assert "sse_gateway_delivery_latency_seconds_bucket" in allowed
    assert "sse_gateway_delivery_latency_seconds" not in allowed
    assert "sse_gateway_connections_total" not in allowed  # a name it does not document


# --------------------------------------------------------------------------- dashboard


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that queries (not the rows), those inside collapsed rows included."""
    for panel in board["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def variable_expr(variable: dict[str, Any]) -> str:
    """The PromQL inside a query variable's label_values(expr, label)."""
    query = variable["query"]
    text = query["query"] if isinstance(query, dict) else query
    match = LABEL_VALUES.match(text)
    assert match, f"variable {variable['name']}: expected label_values(expr, label), got {text!r}"
    return match.group(1)


def dashboard_exprs() -> dict[str, str]:
    """{where: PromQL} for every panel target and query variable of the dashboard."""
    board = dashboard()
    exprs = {
        f"panel {panel['id']} {panel['title']!r} {target['refId']}": target["expr"]
        for panel in panels(board)
        for target in panel["targets"]
    }
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            exprs[f"variable {variable['name']}"] = variable_expr(variable)
    return exprs


def test_the_dashboard_is_valid_and_every_panel_queries_the_chosen_datasource() -> None:
    board = dashboard()
    assert board["schemaVersion"] == 39
    assert board["uid"] == "sse-gateway"
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "brand"):
        assert variables[name]["type"] == "query", name
        assert variables[name]["datasource"] == DATASOURCE, name
    found = list(panels(board))
    assert len(found) >= 20
    rows = [panel for panel in board["panels"] if panel["type"] == "row"]
    ids = [panel["id"] for panel in found + rows]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in found:
        where = f"panel {panel['id']} {panel['title']!r}"
        assert panel["datasource"] == DATASOURCE, where
        assert panel["targets"], f"{where} has no query"
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, f"{where} is wider than the grid"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, where
            assert target["expr"].strip(), f"{where} has an empty query"
            # every query follows the instance picker ($job and $instance)
            assert 'instance=~"$instance"' in target["expr"], where
            assert 'job=~"$job"' in target["expr"], where


def test_the_dashboard_shows_the_latency_quantiles_and_connections_by_brand() -> None:
    exprs = "\n".join(dashboard_exprs().values())
    for quantile in ("0.5", "0.99", "0.999"):
        assert f"histogram_quantile({quantile}, sum by (le)" in exprs
    assert "sum by (le, event) (rate(sse_gateway_delivery_latency_seconds_bucket" in exprs
    assert 'sum by (brand) (sse_gateway_connections{job=~"$job"' in exprs
    assert 'brand=~"$brand"' in exprs


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """promtool parses the queries, with Grafana's variables replaced by valid values."""
    rules = []
    for index, expr in enumerate(dashboard_exprs().values()):
        for pattern, value in GRAFANA_VARIABLES:
            expr = pattern.sub(value, expr)
        rules.append({"record": f"dashboard:query_{index}:parses", "expr": expr})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


# Label values of the series made up for the queries to run on (names from docs/metrics.md).
SAMPLE_LABEL_VALUES = {
    "brand": ("acme", "other"),
    "reason": ("client", "slow_consumer"),
    "outcome": ("recovered", "covered"),
    "event": ("bet",),
}


def sample_series() -> list[dict[str, str]]:
    """promtool input series shaped as docs/metrics.md says: one instance, every documented
    metric with its labels; counters grow, a histogram has three buckets, _sum and _count."""
    series = []
    for name, documented in documented_metrics().items():
        combos: list[dict[str, str]] = [{"job": "sse-gateway", "instance": "a:8080"}]
        for label in documented.labels:
            values = SAMPLE_LABEL_VALUES.get(label, ("x",))  # a label added later: any value
            combos = [{**c, label: v} for c in combos for v in values]
        for labels in combos:
            shaped: list[tuple[str, dict[str, str], str]]
            if documented.kind == "histogram":
                shaped = [
                    (f"{name}_bucket", {**labels, "le": le}, f"0+{n}x40")
                    for le, n in (("0.05", 90), ("0.5", 100), ("+Inf", 100))
                ]
                shaped += [(f"{name}_sum", labels, "0+5x40"), (f"{name}_count", labels, "0+100x40")]
            elif name.endswith("_total"):
                shaped = [(name, labels, "0+60x40")]
            else:
                shaped = [(name, labels, "1000x40" if name.endswith("max_fds") else "50x40")]
            for metric, metric_labels, values in shaped:
                matchers = ", ".join(f'{k}="{v}"' for k, v in metric_labels.items())
                series.append({"series": f"{metric}{{{matchers}}}", "values": values})
    return series


def test_every_dashboard_query_returns_series_on_documented_metrics(tmp_path: Path) -> None:
    """A label or a join (on (job, instance)) that the documented series do not have would
    leave a panel empty: each query must return at least one series on them."""
    cases = []
    for expr in dashboard_exprs().values():
        for pattern, value in GRAFANA_VARIABLES:
            expr = pattern.sub(value, expr)
        # count() of a non-empty result is >= 1, so clamped it is 1 (NaN samples count too);
        # promtool prints the query of a failing case
        cases.append(
            {
                "expr": f"clamp_max(count({expr}), 1)",
                "eval_time": "30m",
                "exp_samples": [{"labels": "{}", "value": 1}],
            }
        )
    test_file = tmp_path / "dashboard_test.yml"
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": [],
                "evaluation_interval": "1m",
                "tests": [
                    {"interval": "1m", "input_series": sample_series(), "promql_expr_test": cases}
                ],
            }
        )
    )
    result = run_promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_label_values_the_files_match_on_are_documented() -> None:
    doc = METRICS_DOC.read_text()
    exprs = list(dashboard_exprs().values()) + [rule["expr"] for rule in alert_rules()]
    matched = {
        (label, value)
        for expr in exprs
        for label, value in re.findall(r'(\w+)=~?"([^"$]+)"', expr)
        if label not in ("job", "instance")
    }
    assert ("reason", "slow_consumer") in matched
    missing = {pair for pair in matched if f"`{pair[1]}`" not in doc}
    assert not missing, f"label values not in docs/metrics.md: {missing}"


# --------------------------------------------------------------------------- alerts


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def readme_anchors() -> set[str]:
    """GitHub's anchors of deploy/README.md's headings (lower case, punctuation dropped)."""
    anchors = set()
    for line in DEPLOY_README.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_each_alert_has_a_duration_a_severity_and_a_runbook() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert {
        "SSEGatewayNoBrokerSubscriber",
        "SSEGatewayAbsent",
        "SSEGatewaySlowConsumerClosesHigh",
        "SSEGatewayDeliveryLatencyHigh",
        "SSEGatewayConnectionsNearLimit",
        "SSEGatewayEventLoopLagHigh",
    } <= set(names)
    anchors = readme_anchors()
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page == "deploy/README.md", name
        assert anchor == name.lower() and anchor in anchors, f"{name}: no runbook section"


def test_each_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    cases: dict[str, list[bool]] = {}
    for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(bool(case["exp_alerts"]))
    for rule in alert_rules():
        outcomes = cases.get(rule["alert"], [])
        assert True in outcomes, f"{rule['alert']}: no case where it fires"
        assert False in outcomes, f"{rule['alert']}: no case where it stays quiet"


def test_every_metric_in_the_dashboard_and_alerts_is_documented() -> None:
    used = {where: metric_names(expr) for where, expr in dashboard_exprs().items()}
    used.update({f"alert {rule['alert']}": metric_names(rule["expr"]) for rule in alert_rules()})
    assert all(used.values()), [where for where, names in used.items() if not names]
    allowed = allowed_names()
    undocumented = {where: names - allowed for where, names in used.items() if names - allowed}
    assert not undocumented, f"not in docs/metrics.md: {undocumented}"


def test_promtool_accepts_the_rules() -> None:
    result = run_promtool("check", "rules", str(ALERTS.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    result = run_promtool("test", "rules", str(ALERTS_TEST.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
