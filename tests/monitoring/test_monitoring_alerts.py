"""Alerts: promtool unit tests of every alert (deploy/prometheus/tests/alerts_test.yml), their annotations
and runbook anchors, thresholds defined in one place, and the Alertmanager configuration (amtool).

On CI (CI=true) a missing promtool or amtool fails these tests instead of skipping them.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from monitoring_helpers import require_tool

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ALERT_RULES = DEPLOY / "prometheus" / "rules" / "alerts.yml"
UNIT_TESTS = DEPLOY / "prometheus" / "tests" / "alerts_test.yml"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
THRESHOLD_GROUP = "blda_alert_thresholds"
THRESHOLD_PREFIX = "blda:alert_threshold:"
# Labels that say which model, version, class, route or replica an alert is about: the summary names them.
SUBJECT_LABELS = ("model", "version", "class", "decision", "route", "status", "instance")


def run(tool: str, *args: str, package: str = "prometheus") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool(tool, package), *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def groups() -> list[dict[str, Any]]:
    return list(yaml.safe_load(ALERT_RULES.read_text())["groups"])


def alerts() -> list[dict[str, Any]]:
    return [rule for group in groups() for rule in group["rules"] if "alert" in rule]


def unit_evaluations() -> list[dict[str, Any]]:
    return [e for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"] for e in test["alert_rule_test"]]


def readme_anchors() -> set[str]:
    """GitHub's heading anchors of deploy/README.md: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", (DEPLOY / "README.md").read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_alert_unit_tests_pass() -> None:
    result = run("promtool", "test", "rules", str(UNIT_TESTS))
    assert result.returncode == 0 and "SUCCESS" in result.stdout, (result.stdout + result.stderr)[-6000:]


def test_the_unit_tests_load_the_shipped_rules() -> None:
    files = {(UNIT_TESTS.parent / f).resolve() for f in yaml.safe_load(UNIT_TESTS.read_text())["rule_files"]}
    assert files == {p.resolve() for p in (DEPLOY / "prometheus" / "rules").glob("*.yml")}


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    evaluations = unit_evaluations()
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names)) >= 10
    for name in names:
        mine = [e for e in evaluations if e["alertname"] == name]
        assert any(e["exp_alerts"] for e in mine), f"{name}: no unit test where it fires"
        assert any(not e["exp_alerts"] for e in mine), f"{name}: no unit test where it must not fire"
    assert {e["alertname"] for e in evaluations} <= set(names), (
        "a unit test names an alert that is not shipped"
    )


def test_alerts_are_qualified_and_link_their_runbook() -> None:
    anchors = readme_anchors()
    fired = {e["alertname"]: e["exp_alerts"] for e in unit_evaluations() if e["exp_alerts"]}
    for alert in alerts():
        name = alert["alert"]
        assert re.fullmatch(r"\d+[smh]", alert["for"]) and not re.fullmatch(r"0+[smh]", alert["for"]), name
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        notes = alert["annotations"]
        assert notes["summary"] and notes["description"], name
        path, _, anchor = notes["runbook_url"].partition("#")
        assert path == "deploy/README.md" and anchor in anchors, f"{name}: no section #{anchor} in {path}"
        assert anchor == name.lower(), f"{name}: expected its runbook under its own name, got #{anchor}"
        # What the alert is about (model, version, class, route, ...) is in its summary.
        for label in SUBJECT_LABELS:
            if label in fired[name][0]["exp_labels"]:
                assert f"$labels.{label}" in notes["summary"], f"{name}: summary does not name its {label}"


def _numbers(expr: str) -> list[str]:
    """Numeric literals of a PromQL expression, outside strings, label matchers, ranges and offsets."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\boffset\s+\w+", " ", text)
    return re.findall(r"(?<![\w:.])(\d+(?:\.\d+)?(?:e[+-]?\d+)?)(?![\w.])", text)


def test_thresholds_are_defined_once_and_alerts_use_no_other_number() -> None:
    (thresholds,) = [g for g in groups() if g["name"] == THRESHOLD_GROUP]
    defined = {}
    for rule in thresholds["rules"]:
        assert rule["record"].startswith(THRESHOLD_PREFIX) and "alert" not in rule
        value = re.fullmatch(r"vector\(([0-9.e+-]+)\)", rule["expr"].strip())
        assert value, f"{rule['record']}: expected vector(<number>), got {rule['expr']!r}"
        defined[rule["record"]] = float(value.group(1))
    others = [r for p in (DEPLOY / "prometheus" / "rules").glob("*.yml")
              for g in yaml.safe_load(p.read_text())["groups"] if g["name"] != THRESHOLD_GROUP
              for r in g["rules"]]  # fmt: skip
    assert not [r for r in others if r.get("record", "").startswith(THRESHOLD_PREFIX)]
    used = set()
    for alert in alerts():
        used |= set(re.findall(rf"{re.escape(THRESHOLD_PREFIX)}\w+", alert["expr"]))
        # 0 only: "no traffic" and "status gauge set" are comparisons with zero, not tunable thresholds.
        assert set(_numbers(alert["expr"])) <= {"0"}, f"{alert['alert']}: a number outside the thresholds"
    assert used == set(defined), f"thresholds undefined {used - set(defined)}, unused {set(defined) - used}"


def test_numbers_finder() -> None:
    expr = 'rate(x_total{status=~"5.."}[5m]) / (y:p99_rate5m > 0) > 0.25 and z offset 1h < 1e3'
    assert _numbers(expr) == ["0", "0.25", "1e3"]


def test_alertmanager_config_passes_amtool_and_every_alert_is_logged() -> None:
    check = run("amtool", "check-config", str(ALERTMANAGER), package="prometheus-alertmanager")
    assert check.returncode == 0 and "SUCCESS" in check.stdout, check.stdout + check.stderr
    config = yaml.safe_load(ALERTMANAGER.read_text())
    receivers = {r["name"]: r for r in config["receivers"]}
    assert config["route"]["receiver"] == "log" and set(receivers["log"]) == {"name"}
    (webhook,) = receivers["example-webhook"]["webhook_configs"]
    assert webhook["url"].startswith("http")
    for alert in alerts():
        labels = [f"alertname={alert['alert']}", *(f"{k}={v}" for k, v in alert["labels"].items())]
        routed = run("amtool", "config", "routes", "test", f"--config.file={ALERTMANAGER}", *labels,
                     package="prometheus-alertmanager")  # fmt: skip
        assert routed.returncode == 0 and routed.stdout.split() == ["log"], routed.stdout + routed.stderr
