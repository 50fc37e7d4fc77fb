"""Meta-learned cold start: it lowers its own (prequential) objective, lands in the model, and the
pipeline uses the learned step sizes unless the configuration sets them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from stream_adapt.config import pipeline_config
from stream_adapt.datasets import load_events
from stream_adapt.learning.meta import MetaConfig, meta_learn_init
from stream_adapt.learning.models import load_model, save_model
from stream_adapt.learning.pipeline import Pipeline
from stream_adapt.learning.pretrain import PretrainConfig, pretrain
from stream_adapt.synth import DEFAULT_CONFIG, generate


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> list:
    root = tmp_path_factory.mktemp("meta")
    generate(root, dataclasses.replace(DEFAULT_CONFIG, n_users=200, n_items=150), seed=3)
    events, _ = load_events(root / "history.jsonl")
    return events


def test_meta_learning_lowers_the_prequential_error_of_its_tasks_and_writes_the_cold_start_row(history: list) -> None:
    torch.manual_seed(0)
    model, _ = pretrain(history, PretrainConfig(epochs=3, dim=8, hidden=16))
    row_before = model.initial_adapter(torch.zeros(1, dtype=torch.long))["emb"].clone()
    report = meta_learn_init(model, history, MetaConfig(iterations=60, meta_batch=64, windows=2))
    assert report.tasks > 50
    assert report.mse_after < report.mse_before
    assert not torch.equal(model.initial_adapter(torch.zeros(1, dtype=torch.long))["emb"], row_before)
    learned = model.config.extra["adapt"]
    assert learned["lr"] == pytest.approx(report.lr) and learned["lr_scale"] == report.lr_scale


def test_the_pipeline_takes_the_models_learned_step_sizes_unless_the_configuration_sets_them(
    history: list, tmp_path: Path
) -> None:
    model, _ = pretrain(history, PretrainConfig(epochs=2, dim=8, hidden=16, meta=MetaConfig(iterations=20, windows=2)))
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")  # the learned step sizes travel with the model
    learned = loaded.config.extra["adapt"]
    assert Pipeline(loaded, pipeline_config()).cfg.adapt.lr == pytest.approx(learned["lr"])
    assert Pipeline(loaded, pipeline_config()).cfg.adapt.lr_scale == pytest.approx(learned["lr_scale"])
    assert Pipeline(loaded, pipeline_config({"adapt": {"lr": 0.5}})).cfg.adapt.lr == 0.5


def test_meta_learning_without_enough_history_says_so(history: list) -> None:
    model, _ = pretrain(history, PretrainConfig(epochs=1, dim=8, hidden=16))
    with pytest.raises(ValueError, match="cannot meta-learn"):
        meta_learn_init(model, history[:20], MetaConfig(windows=4))
