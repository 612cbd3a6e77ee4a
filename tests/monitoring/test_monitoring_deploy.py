"""deploy/: recording rules (promtool, and their maths against the Python definitions), Prometheus config,
Grafana provisioning and dashboards (structure, every query parses and names a real series), compose and
Dockerfiles (no docker engine here: structure and paths)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from monitoring_helpers import CLASS_NAMES, fitted_tables, model_weights, random_record, require_tool

from service.recalibration.settings import RecalibrationSettings
from service.recalibration.shadow import ShadowMonitor, shadow_stats
from service.telemetry import DECISIONS, QUANTILE_BUCKETS, BiasTotals, Telemetry, bias_report
from service.worker_metrics import WorkerMetrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RULES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
DATASOURCE_UID = "blda-prometheus"  # the provisioned datasource; dashboards pick theirs by variable
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Series Prometheus itself writes: scrape health and the alerts' state.
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE"}
GRAFANA_SCHEMA_VERSION = 39


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    tool = require_tool("promtool")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def recorded_names() -> set[str]:
    return {rule["record"] for path in RULES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if "record" in rule}  # fmt: skip


def exported_names() -> set[str]:
    """Every sample name the service exports, from a telemetry that served a request and a feedback."""
    tables = fitted_tables(*model_weights())
    telemetry = Telemetry()
    telemetry.register_version("m", "1", CLASS_NAMES, tables)
    telemetry.observe_segmentation(random_record(tables, 0))
    telemetry.observe_feedback("m", "1", np.ones((2, len(CLASS_NAMES), len(CLASS_NAMES)), np.int64))
    telemetry.http_requests.labels("/x", "GET", "200").inc()
    telemetry.http_duration.labels("/x", "GET").observe(0.1)
    # Live recalibration's shadow series (one shadowed request).
    shadow = ShadowMonitor(None, Path("."), RecalibrationSettings(), telemetry.registry)  # type: ignore[arg-type]
    mask, logit = np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.float32)
    shadow.export(
        "m", "1", "2", shadow_stats((mask, logit, tables), (mask, logit, tables), (2, 2)), CLASS_NAMES
    )
    for counter in (shadow.feedback_correct, shadow.feedback_predicted, shadow.feedback_true):
        counter.labels("m", "1", "active", CLASS_NAMES[0]).inc()
    workers = WorkerMetrics(telemetry.registry)
    workers.sample()
    workers.version_status.labels("m", "1", "ready").set(1)
    return {
        s.name for m in telemetry.registry.collect() for s in m.samples if not s.name.endswith("_created")
    }


# ---------------------------------------------------------------------------------------------------------
# Recording rules
# ---------------------------------------------------------------------------------------------------------


def test_rules_pass_promtool_check() -> None:
    assert RULES, "expected recording rules in deploy/prometheus/rules/"
    result = promtool("check", "rules", *map(str, RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def all_rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def test_rules_only_use_exported_series_and_bucket_bounds() -> None:
    known = exported_names() | recorded_names() | PROMETHEUS_SERIES
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                unknown = series_names(rule["expr"]) - known
                name = rule.get("record", rule.get("alert"))
                assert not unknown, f"{path.name}: {name}: unknown series {unknown}"
    bounds = set(re.findall(r'le="([^"]+)"', "".join(p.read_text() for p in RULES)))
    # The strings prometheus_client writes; "1.0" is left out (Prometheus 3 normalises it to "1").
    assert bounds == {str(b) for b in QUANTILE_BUCKETS[:-1]}


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    sd = config["scrape_configs"][0]["dns_sd_configs"][0]
    assert sd["names"] == ["blda"] and sd["type"] == "A" and sd["port"] == 8000
    config["rule_files"] = [str(DEPLOY / "prometheus" / "rules" / "*.yml")]  # where the container mounts them
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(local))
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.findall(r"SUCCESS: (\d+) rules found", result.stdout)
    assert len(found) == len(RULES) and sum(map(int, found)) == len(all_rules()), result.stdout
    # Alerts go to the compose file's Alertmanager service, on its port.
    (target,) = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    host, port = target.split(":")
    assert host in compose["services"] and f"{port}:{port}" in compose["services"][host]["ports"]


# The rule maths, against the Python definitions of GET /v1/models/{name}/bias (service.telemetry.bias_report):
# two replicas (instances) feed counters for 10 minutes; promtool evaluates the shipped rules at 10m.

MINUTES = 10
SCALE = 1e6  # compare round(value * 1e6): promtool compares floats exactly


def _series(name: str, labels: dict[str, str], per_minute: float) -> dict[str, str]:
    text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{text}}}", "values": f"0+{float(per_minute)!r}x{MINUTES}"}


def _rounded(value: float) -> float:
    return float(math.floor(value * SCALE + 0.5))


def _rules_unit_test(rng: np.random.Generator) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    names = ("road", "traffic light", "sky")
    c = len(names)
    totals = BiasTotals(class_names=names)  # per-minute sums over both instances
    series: list[dict[str, str]] = []
    base = {"model": "m", "version": "1"}
    slots = len(QUANTILE_BUCKETS) + 1
    for instance in ("a:8000", "b:8000"):
        common = {**base, "instance": instance, "job": "blda"}
        pixels = rng.integers(0, 1000, (2, c))
        pixels[1, 2] = 0 if instance == "a:8000" else pixels[1, 2]  # a class one replica never predicts
        calib_in = rng.integers(1, 500, c)
        flipped = np.stack([rng.integers(0, calib_in + 1), rng.integers(0, 200, c)])
        for d, decision in enumerate(DECISIONS):
            for k, name in enumerate(names):
                labels = {**common, "class": name, "decision": decision}
                series.append(_series("blda_predicted_pixels_total", labels, int(pixels[d, k])))
                series.append(_series("blda_calibration_flipped_pixels_total", labels, int(flipped[d, k])))
                for metric, counts_attr, sums_attr in (
                    ("blda_positive_quantile", "quantile_counts", "quantile_sums"),
                    ("blda_anchor_quantile", "anchor_counts", "anchor_sums"),
                ):
                    counts = np.zeros(slots)
                    counts[:-1] = rng.multinomial(int(pixels[d, k]), rng.dirichlet(np.ones(slots - 1)))
                    total = float(np.dot(counts[:-1], np.asarray(QUANTILE_BUCKETS) - 0.05).round(2))
                    cumulative = np.cumsum(counts)
                    for bound, value in zip([*map(str, QUANTILE_BUCKETS), "+Inf"], cumulative, strict=True):
                        series.append(_series(f"{metric}_bucket", {**labels, "le": bound}, int(value)))
                    series.append(_series(f"{metric}_count", labels, int(cumulative[-1])))
                    series.append(_series(f"{metric}_sum", labels, total))
                    getattr(totals, counts_attr)[d, k] += counts
                    getattr(totals, sums_attr)[d, k] += total
        for k, name in enumerate(names):
            series.append(
                _series("blda_calibration_input_pixels_total", {**common, "class": name}, int(calib_in[k]))
            )
        totals.pixels += pixels
        totals.calibration_input += calib_in
        totals.flipped += flipped
        confusion = rng.integers(0, 100, (2, c, c))
        confusion[:, 1, :] = 0  # a true class absent from the feedback
        totals.confusion += confusion
        for d, decision in enumerate(DECISIONS):
            for t, true_name in enumerate(names):
                for p, name in enumerate(names):
                    labels = {**common, "decision": decision, "true_class": true_name, "class": name}
                    series.append(
                        _series("blda_feedback_confusion_pixels_total", labels, int(confusion[d, t, p]))
                    )
                labels = {**common, "decision": decision, "class": true_name}
                series.append(_series("blda_feedback_correct_pixels_total", labels, int(confusion[d, t, t])))
    target_share = np.array([0.5, 0.125, 0.375])
    for k, name in enumerate(names):
        for instance in ("a:8000", "b:8000"):
            labels = {**base, "instance": instance, "job": "blda", "class": name, "domain": "target"}
            series.append({"series": _series("blda_calibration_class_share", labels, 0)["series"],
                           "values": f"{float(target_share[k])!r}+0x{MINUTES}"})  # fmt: skip

    report = bias_report(totals)
    tests: list[dict[str, Any]] = []

    def expect(rule: str, rows: list[tuple[dict[str, str], float | None]]) -> None:
        samples = [
            {"labels": "{" + ",".join(f'{k}="{v}"' for k, v in sorted({**base, **labels}.items())) + "}",
             "value": _rounded(value)}
            for labels, value in rows if value is not None
        ]  # fmt: skip
        tests.append(
            {"expr": f"round({rule} * {SCALE:g})", "eval_time": f"{MINUTES}m", "exp_samples": samples}
        )

    classes = report["classes"]

    def per_class(field: str) -> list[tuple[dict[str, str], float | None]]:
        return [
            ({"class": e["class"], "decision": decision}, e[decision][field])
            for e in classes
            for decision in DECISIONS
        ]

    expect("model_version_class_decision:blda_predicted_pixels:share_rate5m", per_class("predicted_share"))
    for metric in ("positive_quantile", "anchor_quantile"):
        expect(
            f"model_version_class_decision:blda_{metric}:mean_minus_half_rate5m",
            per_class(f"{metric}_mean_minus_half"),
        )
        expect(
            f"model_version_class_decision:blda_{metric}:l1_from_uniform_rate5m",
            per_class(f"{metric}_l1_from_uniform"),
        )
    expect("model_version:blda_calibration_flipped_pixels:ratio_rate5m", [({}, report["flip_rate"])])
    expect("model_version_class:blda_calibration_flip_out:ratio_rate5m",
           [({"class": e["class"]}, e["flip_out_rate"]) for e in classes])  # fmt: skip
    expect("model_version_class:blda_calibration_flip_in:ratio_rate5m",
           [({"class": e["class"]}, e["flip_in_rate"]) for e in classes])  # fmt: skip
    expect("model_version_class:blda_predicted_share_drift:rate5m",
           [({"class": e["class"]}, e["raw"]["predicted_share"] - target_share[i]) for i, e in enumerate(classes)])  # fmt: skip
    expect("model_version_decision_class:blda_feedback_iou:increase1h", per_class("feedback_iou"))
    expect("model_version_decision_class:blda_feedback_bias:increase1h", per_class("feedback_bias"))
    return series, tests


def test_rule_maths_match_the_python_definitions_across_replicas(tmp_path: Path) -> None:
    series, tests = _rules_unit_test(np.random.default_rng(0))
    assert sum(len(t["exp_samples"]) for t in tests) > 50
    unit = {
        "rule_files": [str(p) for p in RULES],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": tests}],
    }
    path = tmp_path / "rules_test.yml"
    path.write_text(yaml.safe_dump(unit, sort_keys=False))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


# ---------------------------------------------------------------------------------------------------------
# Grafana
# ---------------------------------------------------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
             "inf", "nan"}  # fmt: skip


def series_names(expr: str) -> set[str]:
    """Metric and rule names a PromQL expression selects (not functions, labels, keywords or numbers)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)\s*(\()?", text):
        name, call = match.group(1), match.group(2)
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def test_series_names_parser() -> None:
    expr = (
        'sum by (model, le) (rate(blda_x_bucket{class=~"$class", le="0.1"}[5m])) / ignoring (le) group_left () '
        "(a:b:c > 0) - on (model) group_left () 1 / count(group by (x) (y_total)) + 1e6"
    )
    assert series_names(expr) == {"blda_x_bucket", "a:b:c", "y_total"}
    assert grafana_to_promql('rate(x{m=~"$model", v=~"${version}"}[$__rate_interval])') == (
        'rate(x{m=~".*", v=~".*"}[5m])'
    )


def panels_of(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows
    return out


def grafana_to_promql(expr: str) -> str:
    # Grafana's interval variables first: the generic rule below would turn them into regexes.
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    return re.sub(r"\$(\w+)|\$\{(\w+)\}", ".*", expr)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    # Importable into any Grafana: no panel, query or variable is bound to the provisioned uid.
    assert DATASOURCE_UID not in path.read_text()
    dashboard = json.loads(path.read_text())
    assert dashboard["schemaVersion"] == GRAFANA_SCHEMA_VERSION
    assert re.fullmatch(r"[a-z0-9-]{1,40}", dashboard["uid"]) and dashboard["title"]
    panels = panels_of(dashboard)
    assert len(panels) >= 6
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        assert panel["title"] and panel["type"] in {
            "timeseries",
            "stat",
            "bargauge",
            "table",
            "gauge",
            "state-timeline",
        }
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"][
            "w"
        ] <= 24
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids)
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"].strip()
    source, *variables = dashboard["templating"]["list"]
    assert (source["name"], source["type"], source["query"]) == ("datasource", "datasource", "prometheus")
    for variable in variables:
        assert variable["type"] == "query" and variable["datasource"] == DATASOURCE, variable["name"]
    (annotation,) = annotations_of(dashboard)
    assert annotation["datasource"] == DATASOURCE and annotation["enable"]
    # Model-version changes: a (model, version) of blda_model_info that was not there a step before.
    assert series_names(grafana_to_promql(annotation["expr"])) == {"blda_model_info"}
    assert "unless" in annotation["expr"] and "offset" in annotation["expr"]
    assert "{{version}}" in annotation["textFormat"]


def annotations_of(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """The query annotations (the built-in Grafana one, if present, has no expr)."""
    return [a for a in dashboard["annotations"]["list"] if "expr" in a]


def test_every_panel_query_parses_and_names_a_real_series(tmp_path: Path) -> None:
    known = exported_names() | recorded_names() | PROMETHEUS_SERIES
    rules = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        exprs = [(p["title"], t["expr"]) for p in panels_of(dashboard) for t in p["targets"]]
        exprs += [(f"variable {v['name']}", v["query"]["query"]) for v in dashboard["templating"]["list"]
                  if v["type"] == "query"]  # fmt: skip
        exprs += [(f"annotation {a['name']}", a["expr"]) for a in annotations_of(dashboard)]
        for title, expr in exprs:
            label_values = re.fullmatch(r"label_values\((.+),\s*\w+\)", expr.strip())
            promql = grafana_to_promql(label_values.group(1) if label_values else expr)
            names = series_names(promql)
            assert names, f"{path.name}: {title}: no series in {expr!r}"
            assert names <= known, f"{path.name}: {title}: unknown series {names - known}"
            rules.append({"record": f"dashboard:check:{len(rules)}", "expr": promql})
    # promtool parses each query as the expression of a recording rule.
    check = tmp_path / "dashboard_queries.yml"
    check.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = promtool("check", "rules", str(check))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboards_show_what_the_issue_asks_for() -> None:
    exprs = " ".join(t["expr"] for p in DASHBOARDS for panel in panels_of(json.loads(p.read_text()))
                     for t in panel["targets"])  # fmt: skip
    for needed in (
        "blda_predicted_pixels:share_rate5m",
        'domain="source"',
        "blda_anchor_quantile:mean_minus_half",
        "blda_positive_quantile:l1_from_uniform",
        "blda_calibration_flipped_pixels:ratio",
        "blda_feedback_iou",
        "blda_feedback_bias",
        "blda_stage_duration_seconds:p95",
        "route_status:blda_http_requests:rate1m",
        "blda_http_requests_in_flight",
        'ALERTS{alertstate="firing"',
        "blda_process_cpu_seconds",
        "blda_process_resident_memory_bytes",
        "blda_process_open_fds",
        "blda_model_version_status",
        "route:blda_http_request_duration_seconds:p99_rate5m",
    ):
        assert needed in exprs, needed


def alert_thresholds() -> dict[str, float]:
    (group,) = [g for g in yaml.safe_load((DEPLOY / "prometheus/rules/alerts.yml").read_text())["groups"]
                if g["name"] == "blda_alert_thresholds"]  # fmt: skip
    return {
        r["record"]: float(re.fullmatch(r"vector\((.+)\)", r["expr"].strip()).group(1))
        for r in group["rules"]
    }


def test_the_bias_timeline_colours_the_alert_band() -> None:
    band = alert_thresholds()["blda:alert_threshold:positive_quantile_band"]
    dashboard = json.loads((DEPLOY / "grafana/dashboards/blda-bias.json").read_text())
    (timeline,) = [p for p in panels_of(dashboard) if p["type"] == "state-timeline"]
    (target,) = timeline["targets"]
    assert target["expr"].startswith(
        "model_version_class_decision:blda_positive_quantile:mean_minus_half_rate5m"
    )
    assert 'decision="raw"' in target["expr"] and target["legendFormat"] == "{{class}}"  # one row per class
    defaults = timeline["fieldConfig"]["defaults"]
    assert defaults["color"]["mode"] == "thresholds"
    steps = [step["value"] for step in defaults["thresholds"]["steps"]]
    assert steps == [None, -band, band]


def test_threshold_lines_are_the_alert_thresholds() -> None:
    """Panels draw the threshold series themselves: a change in alerts.yml moves the line too."""
    drawn = {t["expr"].lstrip("-") for p in DASHBOARDS for panel in panels_of(json.loads(p.read_text()))
             for t in panel["targets"] if "alert_threshold" in t["expr"]}  # fmt: skip
    assert drawn == {
        "blda:alert_threshold:positive_quantile_band",
        "blda:alert_threshold:predicted_share_drift",
        "blda:alert_threshold:calibration_flip_rate",
        "blda:alert_threshold:segment_p99_seconds",
    }


def test_grafana_provisioning_points_at_the_compose_services() -> None:
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["uid"] == DATASOURCE_UID and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/blda.yml").read_text())["providers"]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    path = providers[0]["options"]["path"]
    assert (REPO / mounts[path]).resolve() == (DEPLOY / "grafana" / "dashboards").resolve()


# ---------------------------------------------------------------------------------------------------------
# Compose and images
# ---------------------------------------------------------------------------------------------------------


def test_compose_file() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"blda", "prometheus", "alertmanager", "grafana", "redis"}
    # Every worker of every replica shares one state store: no sticky routing needed.
    assert services["blda"]["environment"]["BLDA_STATE_URL"] == "redis://redis:6379/0"
    assert "redis" in services["blda"]["depends_on"]
    assert re.fullmatch(r"redis:\d+\.\d+[\w.-]*", services["redis"]["image"])
    assert services["blda"]["deploy"]["replicas"] == 2
    assert services["blda"]["build"]["dockerfile"] == "Dockerfile"
    for name in ("prometheus", "alertmanager", "grafana"):
        image, _, tag = services[name]["image"].rpartition(":")
        assert image and re.fullmatch(r"v?\d+\.\d+\.\d+", tag), (
            f"{name}: expected a pinned version, got {tag!r}"
        )
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):  # bind mounts: the files must be in the repository
                assert (REPO / source).exists(), f"{name}: mount source {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
    prometheus_mounts = {v.split(":")[1] for v in services["prometheus"]["volumes"]}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/rules"} <= prometheus_mounts
    alertmanager = services["alertmanager"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in alertmanager["volumes"]}
    config = next(a.split("=", 1)[1] for a in alertmanager["command"] if a.startswith("--config.file="))
    assert (REPO / mounts[config]).resolve() == (DEPLOY / "alertmanager" / "alertmanager.yml").resolve()
    assert "--log.level=debug" in alertmanager["command"]  # the default receiver's record is the log
    command = services["blda"]["command"]
    assert (
        command[command.index("--port") + 1] == "8000" and command[command.index("--host") + 1] == "0.0.0.0"
    )
    assert int(command[command.index("--workers") + 1]) >= 2


@pytest.mark.parametrize(
    ("name", "base"), [("Dockerfile", "python:3.11-slim"), ("Dockerfile.gpu", "nvidia/cuda:")]
)
def test_dockerfiles(name: str, base: str) -> None:
    text = (REPO / name).read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert froms and froms[0].startswith(base)
    assert all(":" in image and not image.endswith(":latest") for image in froms)
    instructions = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert re.search(r'pip install "\.\[serve[,\w]*\]"', instructions) and "torch" not in instructions.lower()
    for source in re.findall(r"^COPY\s+(\S+)\s", text, flags=re.MULTILINE):
        assert (REPO / source).exists(), f"{name}: COPY {source}: not in the repository"
    if name == "Dockerfile.gpu":
        assert "runtime" in froms[0] and "cudnn" in froms[0]
    serve = " ".join(
        tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    )
    assert "onnxruntime-gpu" in serve and "torch" not in serve
