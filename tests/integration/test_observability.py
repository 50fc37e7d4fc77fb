"""A real Prometheus scrapes a running member that consumes from the local broker.

After a short load, every expression of the Grafana dashboard and of the alert rules returns data
through Prometheus's HTTP API (no panel would show "No data", no alert is blind because its two sides
never match), every rule evaluates without error, and `/readyz` turns ready only once the member owns
partitions.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from service_helpers import World, first_lines, kafka_topics, make_service, run_member, wait_for

from stream_adapt.io.broker import free_port
from stream_adapt.metrics import Observability
from stream_adapt.replay import replay_file

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "stream-adapt.json"
RULES = REPO / "deploy" / "prometheus" / "rules" / "stream-adapt.yml"
JOB = "stream-adapt"  # the job name the alert rules expect


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Prometheus:
    """The Debian `prometheus` server on a free loopback port, scraping `target` every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("prometheus is not installed (.ci/run installs it)")
            pytest.skip("prometheus is not installed (apt-get install prometheus)")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        cmd = [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address={self.url.removeprefix('http://')}",
            "--log.level=warn",
        ]
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(lambda: self._ready(), 30, f"Prometheus to start (log: {self.log})")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-2000:]
        try:
            return _get(self.url + "/-/ready")[0] == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        status, body = _get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        reply = json.loads(body)
        assert status == 200 and reply["status"] == "success", f"{path} {params}: {body[:500]}"
        return reply["data"]

    def query(self, expr: str) -> list[float]:
        """The values an instant query returns now (one per series)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [float(data["result"][1])]
        return [float(series["value"][1]) for series in data["result"]]

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(20)


@pytest.fixture
def observed_member(world: World, kafka_bootstrap: str, tmp_path: Path) -> Iterator[tuple[Any, Observability, Any]]:
    """A member consuming a fresh 2-partition topic, serving metrics on a free port (not started yet)."""
    kafka = kafka_topics(kafka_bootstrap, partitions=2)
    service = make_service(world, kafka, "observed")
    obs = Observability(topic=kafka.topic, host="127.0.0.1", port=0, ready_max_lag=1000)
    obs.watch(service)
    yield service, obs, kafka
    obs.close()


def dashboard_queries(instance: str, topic: str) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard target and variable, variables filled in as Grafana does."""
    board = json.loads(DASHBOARD.read_text())
    values = {"$instance": instance, "$topic": topic, "$__rate_interval": "1m"}  # "." matches itself too

    def fill(expr: str) -> str:
        for name, val in values.items():
            expr = expr.replace(name, val)
        assert "$" not in expr, expr
        return expr

    queries = [(p["title"], fill(t["expr"])) for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":  # label_values(selector, label): the label's values must exist
            selector, label = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["definition"]).groups()  # type: ignore[union-attr]
            queries.append((f"${variable['name']}", fill(f"count by ({label}) ({selector})")))
    return queries


def with_bool(expr: str) -> str:
    """`expr` with every comparison made `bool`: it then returns its operands' series (0 or 1) instead of
    only the firing ones, so an alert whose sides never match (a label mismatch) shows up as no data."""
    out, depth, quote = [], 0, ""
    i = 0
    while i < len(expr):
        c = expr[i]
        if quote:
            quote = "" if c == quote and expr[i - 1] != "\\" else quote
        elif c in "\"'":
            quote = c
        elif c in "{(" and c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif depth == 0 and (op := re.match(r"==|!=|>=|<=|>|<", expr[i:])):
            out.append(op.group() + " bool")
            i += len(op.group())
            continue
        out.append(c)
        i += 1
    return "".join(out)


def test_with_bool_turns_comparisons_outside_selectors_into_bool_ones() -> None:
    expr = 'sum by (job) (rate(x_total{a!="b", c=~"d|e"}[5m])) > 0.5 and up{job="j"} == 0'
    assert with_bool(expr) == 'sum by (job) (rate(x_total{a!="b", c=~"d|e"}[5m])) > bool 0.5 and up{job="j"} == bool 0'


def test_prometheus_gets_data_for_every_dashboard_panel_and_alert_rule_from_a_running_member(
    world: World, observed_member: tuple[Any, Observability, Any], tmp_path: Path
) -> None:
    service, obs, kafka = observed_member
    target = f"127.0.0.1:{obs.server.port}"
    readyz = obs.url.removesuffix("/metrics") + "/readyz"
    assert _get(readyz)[0] == 503  # not started: no partitions
    prometheus = Prometheus(tmp_path, target)
    member = run_member(service, "observed")
    try:
        wait_for(lambda: _get(readyz)[0] == 200, 60, "the member to become ready")
        assert (obs.metrics.registry.get_sample_value("stream_adapt_assigned_partitions") or 0) > 0

        events = first_lines(world.live, tmp_path / "live.jsonl", 3000)
        sent = replay_file(events, kafka, rate=1000).sent  # ~3 s of load: several scrapes see it grow
        wait_for(lambda: member.stats.records >= sent, 60, "the member to process every record")
        consumed = f'stream_adapt_records_consumed_total{{job="{JOB}"}}'
        wait_for(lambda: prometheus.query(consumed) == [float(sent)], 30, "Prometheus to scrape the last batch")
        assert member.stats.updates > 0 and member.stats.invalid  # updates and dead letters to show

        # The counters Prometheus scraped are the member's own totals.
        stats = member.stats
        expected = {
            "sum(stream_adapt_dead_letters_total)": sum(stats.invalid.values()),
            'sum(stream_adapt_events_consumed_total{status="learned"})': stats.learned,
            'sum(stream_adapt_adaptations_total{outcome="accepted"})': stats.outcomes["accepted"],
            'sum(stream_adapt_adaptations_total{outcome="rolled_back"})': stats.outcomes["rolled_back"],
            "sum(stream_adapt_updates_published_total)": stats.updates,
            'stream_adapt_messages_delivered_total{output="model"}': stats.updates,
            'stream_adapt_messages_delivered_total{output="dead_letter"}': sum(stats.invalid.values()),
        }
        wait_for(
            lambda: all(prometheus.query(q) == [float(n)] for q, n in expected.items()),
            30,
            f"Prometheus to hold the member's totals {expected}",
        )

        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        assert len(rules) == 7
        wait_for(
            lambda: all(r["health"] == "ok" for g in prometheus.api("rules")["groups"] for r in g["rules"]),
            20,
            "every alert rule to evaluate without error",
        )

        queries = dashboard_queries(target, kafka.topic)
        queries += [(f"alert {r['name']}", with_bool(r["query"])) for r in rules]
        no_data = [f"{title}: {expr}" for title, expr in queries if not any(map(math.isfinite, prometheus.query(expr)))]
        assert not no_data, "no data for:\n" + "\n".join(no_data)
        assert prometheus.query(f'up{{job="{JOB}"}}') == [1.0]
    finally:
        member.stop()
        prometheus.close()


def test_readyz_turns_ready_only_on_the_member_that_owns_partitions(
    world: World, kafka_bootstrap: str, tmp_path: Path
) -> None:
    kafka = kafka_topics(kafka_bootstrap, partitions=1)
    observed: list[tuple[Observability, Any]] = []
    try:
        for name in ("a", "b"):
            service = make_service(world, kafka, name)
            obs = Observability(topic=kafka.topic, host="127.0.0.1", port=0)
            obs.watch(service)
            base = obs.url.removesuffix("/metrics")
            assert _get(base + "/readyz")[0] == 503 and _get(base + "/healthz")[0] == 200
            observed.append((obs, run_member(service, name)))
            if name == "a":
                wait_for(lambda base=base: _get(base + "/readyz")[0] == 200, 60, "a to own the partition")  # type: ignore[misc]

        def states() -> list[tuple[int, str]]:
            return [_get(obs.url.removesuffix("/metrics") + "/readyz") for obs, _ in observed]

        # b joined: one partition, two members; after the rebalance exactly one of them owns it
        wait_for(
            lambda: (
                sorted(code for code, _ in states()) == [200, 503]
                and all(m.service.runner.stats is not None for _, m in observed)
                and sum(len(m.service.source.assignment) for _, m in observed) == 1
            ),
            60,
            "the rebalance to settle",
        )
        for (obs, member), (code, text) in zip(observed, states(), strict=True):
            owns = bool(member.service.source.assignment)
            assert (code == 200) == owns, text
            if not owns:
                assert "no partitions assigned" in text
            assert _get(obs.url.removesuffix("/metrics") + "/healthz")[0] == 200  # idle, not dead
    finally:
        for obs, member in observed:
            member.stop()
            obs.close()
