"""deploy/ and docker-compose.yml are correct by construction: checked against the code and the tools.

No Docker engine or Kubernetes runs here, so these tests hold the files to what can be checked: the
Prometheus tools (`promtool check config|rules`, `promtool test rules`), `docker-compose config`, every
command a container runs parses with the real CLI, every expression uses metrics the exporter serves,
and the Kubernetes probes point at the endpoints the service serves. The same expressions run against a
real Prometheus in tests/integration/test_observability.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from stream_adapt.cli import build_parser
from stream_adapt.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "stream-adapt.json"
RULES = DEPLOY / "prometheus" / "rules" / "stream-adapt.yml"
METRIC_NAME = re.compile(r"\b((?:stream_adapt|process)_[a-z_]+)\b")


def tool(name: str) -> str:
    """The tool's path; skipped where it is not installed, except in CI (.ci/run installs it)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return path


def run(*cmd: str, cwd: Path = REPO) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def exported_sample_names() -> set[str]:
    metrics = Metrics(topic="t", registry=CollectorRegistry())
    metrics.observe_lag({("t", 0): 1}, {("t", 0): 1})  # the lag series exist once statistics arrived
    return {s.name for family in metrics.registry.collect() for s in family.samples}


def parses(argv: list[str]) -> None:
    """Fail the test (not exit it) when the CLI refuses `argv`."""
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`stream-adapt {shlex.join(argv)}` does not parse (exit {exc.code})")


# ---- Prometheus ----------------------------------------------------------------------------------
def test_promtool_accepts_the_scrape_config_and_the_rules() -> None:
    promtool = tool("promtool")
    run(promtool, "check", "config", "prometheus.yml", cwd=DEPLOY / "prometheus")
    assert "SUCCESS: 7 rules found" in run(promtool, "check", "rules", str(RULES))


def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    out = run(tool("promtool"), "test", "rules", str(DEPLOY / "prometheus" / "tests" / "stream-adapt_test.yml"))
    assert "SUCCESS" in out


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    tests = yaml.safe_load((DEPLOY / "prometheus" / "tests" / "stream-adapt_test.yml").read_text())
    fired = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"] if case.get("exp_alerts")}
    quiet = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"] if not case.get("exp_alerts")}
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts == fired == quiet
    assert {
        "StreamAdaptConsumerLagGrowing",
        "StreamAdaptNoEventsWhileInputFlows",
        "StreamAdaptRollbackRatioHigh",
        "StreamAdaptPublishFailures",
        "StreamAdaptDriftStorm",
        "StreamAdaptNotReady",
    } <= alerts


def test_the_compose_prometheus_scrapes_the_port_the_service_serves() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "stream-adapt")
    assert job["dns_sd_configs"][0]["port"] == 9464
    assert all(r["expr"].count("job=") <= 1 for r in alert_rules())
    assert 'up{job="stream-adapt"}' in RULES.read_text()  # the job name the rules expect


# ---- Grafana -------------------------------------------------------------------------------------
def test_the_dashboard_json_is_what_make_dashboard_writes() -> None:
    spec = importlib.util.spec_from_file_location("make_dashboard", DEPLOY / "grafana" / "make_dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build() == dashboard(), "regenerate: python deploy/grafana/make_dashboard.py"


def test_every_dashboard_and_alert_expression_uses_only_metrics_the_exporter_serves() -> None:
    exported = exported_sample_names()
    used = {
        name for expr in dashboard_exprs() + [r["expr"] for r in alert_rules()] for name in METRIC_NAME.findall(expr)
    }
    assert used - exported == set()
    stream_adapt_used = {n for n in used if n.startswith("stream_adapt_")}
    assert len(stream_adapt_used) >= 30  # the dashboard covers the exporter, not a corner of it


def test_the_dashboard_covers_what_operators_asked_for() -> None:
    text = " ".join(dashboard_exprs())
    for metric in (
        "stream_adapt_records_consumed_total",  # throughput
        "stream_adapt_consumer_lag_records",  # lag per partition
        "stream_adapt_adaptations_total",  # outcomes
        "stream_adapt_adaptation_query_loss_before_sum",  # loss before/after
        "stream_adapt_adaptation_query_loss_after_sum",
        "stream_adapt_update_delivery_seconds_bucket",  # freshness quantiles
        "stream_adapt_update_freshness_seconds_bucket",
        "stream_adapt_drift_detections_total",  # drift
        "stream_adapt_dead_letters_total",  # dead letters
        "stream_adapt_publish_failures_total",  # errors
    ):
        assert metric in text, metric


def test_every_panel_reads_the_provisioned_datasource_and_filters_by_instance() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert set(variables) == {"datasource", "topic", "instance"}
    assert "$topic" in variables["instance"]["definition"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert '$instance"' in target["expr"], f"{panel['title']}: {target['expr']}"
            if "stream_adapt_consumer_lag" in target["expr"] or "records_consumed" in target["expr"]:
                assert '$topic"' in target["expr"], f"{panel['title']}: {target['expr']}"


def test_dashboard_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, panel["title"]
        taken |= cells


def test_grafana_provisioning_points_at_the_stack_prometheus_and_the_dashboard_folder() -> None:
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert (source["type"], source["url"], source["isDefault"]) == ("prometheus", "http://prometheus:9090", True)
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/stream-adapt.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"


# ---- docker-compose ------------------------------------------------------------------------------
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_docker_compose_validates_the_stack() -> None:
    run(tool("docker-compose"), "config", "--quiet")
    services = set(run(tool("docker-compose"), "config", "--services").split())
    assert services == {"kafka", "topics", "prepare", "stream-adapt", "replay", "prometheus", "grafana"}


def test_every_command_a_compose_container_runs_parses_with_the_cli() -> None:
    services = compose()["services"]
    commands = [services[name]["command"] for name in ("topics", "stream-adapt", "replay")]
    (script,) = services["prepare"]["command"]
    commands += [shlex.split(part)[1:] for part in re.findall(r"stream-adapt [^&|)]+", script)]
    assert len(commands) == 5
    for argv in commands:
        parses([str(a) for a in argv])
    assert services["stream-adapt"]["command"][-2:] == ["--metrics-port", "9464"]


def test_compose_builds_the_image_from_the_dockerfile_and_mounts_existing_config() -> None:
    services = compose()["services"]
    for name in ("topics", "prepare", "stream-adapt", "replay"):
        assert services[name]["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, one node
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), volume


def test_the_image_is_slim_non_root_with_cpu_torch_at_the_pinned_version() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "FROM python:${PYTHON_VERSION}-slim" in dockerfile
    assert re.search(r"^USER 10001", dockerfile, re.M)
    assert "download.pytorch.org/whl/cpu" in dockerfile and "constraints.txt" in dockerfile
    assert "EXPOSE 9464" in dockerfile
    assert ".venv" in (REPO / ".dockerignore").read_text().split()


# ---- Kubernetes ----------------------------------------------------------------------------------
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    docs = [doc for f in kustomization["resources"] for doc in yaml.safe_load_all((DEPLOY / "k8s" / f).read_text())]
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


def test_the_deployment_probes_the_health_endpoints_on_the_metrics_port() -> None:
    found = manifests()
    deployment = found[("Deployment", "stream-adapt")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = found[("ConfigMap", "stream-adapt-env")]["data"]
    assert ports["metrics"] == int(env["STREAM_ADAPT_METRICS_PORT"]) == 9464
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    limits = container["resources"]["limits"]
    assert limits["cpu"] and limits["memory"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    parses(container["args"])
    for source in container["envFrom"]:
        ref = source.get("configMapRef") or source["secretRef"]
        assert ("ConfigMap", ref["name"]) in found or ref.get("optional") is True, ref


def test_the_service_selects_the_members_and_publishes_not_ready_ones_for_scraping() -> None:
    found = manifests()
    pod_labels = found[("Deployment", "stream-adapt")]["spec"]["template"]["metadata"]["labels"]
    service = found[("Service", "stream-adapt-metrics")]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9464, "targetPort": "metrics"}]
    assert service["metadata"]["annotations"]["prometheus.io/port"] == "9464"


def test_the_configmaps_make_valid_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stream_adapt.config import load_settings

    found = manifests()
    for key, val in found[("ConfigMap", "stream-adapt-env")]["data"].items():
        monkeypatch.setenv(key, val)
    config = tmp_path / "config.toml"
    config.write_text(found[("ConfigMap", "stream-adapt-config")]["data"]["config.toml"])
    tomllib.loads(config.read_text())
    settings = load_settings(config)
    assert settings.metrics_port == 9464 and settings.kafka.group == "stream-adapt"
    assert settings.ready_max_lag == 10_000
