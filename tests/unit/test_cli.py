"""The `stream-adapt` command as a user runs it: a real subprocess, exit codes, outputs on disk."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from stream_adapt.learning.models import CONFIG_FILE, WEIGHTS_FILE

TIMEOUT_S = 120  # a hung command fails the test instead of the session; no test waits on time


def _stream_adapt(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAM_ADAPT_")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "stream_adapt", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


@dataclass
class Workspace:
    root: Path
    data: Path
    model: Path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """`synth` a small world, then `pretrain` on its history: the two commands every user runs first."""
    root = tmp_path_factory.mktemp("cli")
    synth = _stream_adapt("synth", "--out", "data", "--users", "120", "--items", "110", "--seed", "3", cwd=root)
    assert synth.returncode == 0, synth.stderr
    summary = json.loads(synth.stdout)
    assert summary["n_users"] == 120 and summary["n_items"] == 110 and summary["seed"] == 3
    for name in ("history.jsonl", "live.jsonl", "truth.npz", "synth.json"):
        assert (root / "data" / name).is_file(), name
    pretrain = _stream_adapt(
        "pretrain",
        "--events", "data/history.jsonl",
        "--out", "model",
        "--epochs", "2", "--dim", "8", "--hidden", "16",
        cwd=root,
    )  # fmt: skip
    assert pretrain.returncode == 0, pretrain.stderr
    assert "wrote model" in pretrain.stdout
    assert (root / "model" / WEIGHTS_FILE).is_file() and (root / "model" / CONFIG_FILE).is_file()
    return Workspace(root, root / "data", root / "model")


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_on_a_file_writes_outputs_and_a_summary_json_that_agree(workspace: Workspace) -> None:
    run = _stream_adapt(
        "run",
        "--model", "model",
        "--source", "file:data/live.jsonl",
        "--sink", "dir:out",
        "--summary-json", "summary.json",
        "--quiet",
        cwd=workspace.root,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = json.loads((workspace.root / "summary.json").read_text())
    for key in ("events", "invalid", "windows_filled", "updates_published", "mae_before", "mae_after"):
        assert key in summary, key
    for section, key in [
        ("adaptations", "accepted"),
        ("adaptations", "rolled_back"),
        ("drift", "entity"),
        ("drift", "global"),
    ]:
        assert key in summary[section], f"{section}.{key}"

    synth = json.loads((workspace.data / "synth.json").read_text())
    assert summary["records"] == synth["live_lines"]
    assert summary["events"] == synth["live_valid_events"]
    assert summary["invalid"] == synth["live_lines"] - synth["live_valid_events"]
    assert summary["adaptations"]["accepted"] > 0 and summary["updates_published"] > 0
    assert 0 < summary["mae_after"] < summary["mae_before"]

    out = workspace.root / "out"
    updates, log, dead = (
        _lines(out / "updates.jsonl"),
        _lines(out / "adaptation_log.jsonl"),
        _lines(out / "dead_letters.jsonl"),
    )
    assert len(updates) == summary["updates_published"]
    outcomes = [rec["outcome"] for rec in log]
    adaptations = summary["adaptations"]
    assert outcomes.count("accepted") == adaptations["accepted"]
    assert outcomes.count("rolled_back") == adaptations["rolled_back"]
    assert len(dead) == summary["invalid"]
    assert {d["reason"] for d in dead} <= set(synth["invalid_by_kind"])
    fingerprint = json.loads((workspace.model / CONFIG_FILE).read_text())["fingerprint"]
    first = updates[0]
    assert first["headers"]["stream-adapt-base-fingerprint"] == fingerprint  # type: ignore[index]
    assert base64.b64decode(first["payload_b64"])  # type: ignore[arg-type]


def test_config_error_exits_2_naming_the_field(workspace: Workspace) -> None:
    run = _stream_adapt(
        "run", "--model", "model", "--source", "file:data/live.jsonl", "--sink", "dir:bad", "--shots", "1",
        cwd=workspace.root,
    )  # fmt: skip
    assert run.returncode == 2
    assert "pipeline.window.shots" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (workspace.root / "bad").exists(), "nothing runs on an invalid configuration"


def test_missing_model_directory_exits_1_with_a_clear_message(workspace: Workspace) -> None:
    run = _stream_adapt(
        "run", "--model", "no-such-model", "--source", "file:data/live.jsonl", "--sink", "dir:nowhere",
        cwd=workspace.root,
    )  # fmt: skip
    assert run.returncode == 1
    assert "no-such-model is not a model directory" in run.stderr
    assert "stream-adapt pretrain" in run.stderr
    assert "Traceback" not in run.stderr


def test_help_lists_the_subcommands_and_run_help_its_options(tmp_path: Path) -> None:
    top = _stream_adapt("--help", cwd=tmp_path)
    assert top.returncode == 0
    for command in ("synth", "pretrain", "run", "demo", "schemas"):
        assert command in top.stdout
    run = _stream_adapt("run", "--help", cwd=tmp_path)
    assert run.returncode == 0
    for option in ("--model", "--source", "--sink", "--summary-json", "--shots", "--set"):
        assert option in run.stdout


def test_missing_required_argument_is_a_usage_error(tmp_path: Path) -> None:
    run = _stream_adapt("run", "--model", "model", cwd=tmp_path)
    assert run.returncode == 2
    assert "--source" in run.stderr
