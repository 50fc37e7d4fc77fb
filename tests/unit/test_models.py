"""Model directories (save/load with fingerprint), id mapping, and users' own models as plugins."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from stream_adapt.config import pipeline_config
from stream_adapt.errors import ModelLoadError
from stream_adapt.events import Position
from stream_adapt.io.ports import Record
from stream_adapt.learning.models import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdaptableModel,
    NeuralRecommender,
    RecommenderConfig,
    freeze,
    load_model,
    load_plugin,
    save_model,
)
from stream_adapt.learning.pipeline import Pipeline
from stream_adapt.learning.updates import decode_update

USERS = [f"u{i}" for i in range(5)]
ITEMS = [f"i{i}" for i in range(12)]


def _model(lora_rank: int = 0) -> NeuralRecommender:
    torch.manual_seed(0)
    cfg = RecommenderConfig(n_users=len(USERS), n_items=len(ITEMS), dim=8, hidden=16, lora_rank=lora_rank)
    model = NeuralRecommender(cfg, USERS, ITEMS)
    with torch.no_grad():  # weights that make every user and item score differently
        for p in model.parameters():
            p.normal_(0, 0.5)
    freeze(model)
    return model


def _scores(model: NeuralRecommender, users: list[str], items: list[str]) -> torch.Tensor:
    """Scores [U, I] of every user for every item."""
    adapter = model.initial_adapter(model.entity_index(users))
    idx = model.counterpart_index(items).expand(len(users), -1)
    with torch.no_grad():
        return model.predict(adapter, idx, model.global_adapter())


@pytest.fixture
def saved(tmp_path: Path) -> tuple[NeuralRecommender, Path]:
    model = _model(lora_rank=2)
    directory = tmp_path / "model"
    save_model(model, directory)
    return model, directory


# ---- save / load --------------------------------------------------------------------------------------


def test_save_then_load_keeps_predictions_vocabularies_and_fingerprint(saved: tuple[NeuralRecommender, Path]) -> None:
    model, directory = saved
    loaded = load_model(directory)
    assert loaded.fingerprint == model.fingerprint
    assert loaded.fingerprint.startswith("sha256:")
    assert loaded.config == model.config
    assert loaded.user_ids == model.user_ids and loaded.item_ids == model.item_ids
    assert loaded.adapter_spec() == model.adapter_spec() == {"emb": (8,), "bias": (1,), "lora_b": (16, 2)}
    users, items = [*USERS, "stranger"], [*ITEMS, "new-item"]
    assert torch.equal(_scores(loaded, users, items), _scores(model, users, items))


def test_loaded_model_is_frozen(saved: tuple[NeuralRecommender, Path]) -> None:
    loaded = load_model(saved[1])
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())


def test_fingerprint_depends_on_the_weights(tmp_path: Path) -> None:
    a, b = _model(), _model()
    with torch.no_grad():
        b.item_bias.weight[3] += 0.001
    fingerprint = save_model(a, tmp_path / "a")
    assert fingerprint == a.fingerprint == load_model(tmp_path / "a").fingerprint
    assert save_model(b, tmp_path / "b") != fingerprint


def test_saving_the_same_model_again_gives_the_same_fingerprint(tmp_path: Path) -> None:
    model = _model()
    fingerprints = {save_model(model, tmp_path / f"copy{k}") for k in range(20)}
    assert len(fingerprints) == 1


def test_tampered_weights_fail_to_load_with_a_fingerprint_error(saved: tuple[NeuralRecommender, Path]) -> None:
    _, directory = saved
    weights = directory / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="fingerprint"):
        load_model(directory)


@pytest.mark.parametrize("field", ["users", "items", "config"])
def test_tampered_config_fails_to_load_with_a_fingerprint_error(
    saved: tuple[NeuralRecommender, Path], field: str
) -> None:
    _, directory = saved
    path = directory / CONFIG_FILE
    body = json.loads(path.read_text())
    if field == "config":
        body["config"]["value_range"] = [0.0, 10.0]
    else:
        body[field][0], body[field][1] = body[field][1], body[field][0]  # swap two ids' rows
    path.write_text(json.dumps(body))
    with pytest.raises(ModelLoadError, match="fingerprint"):
        load_model(directory)


def test_forged_fingerprint_in_the_config_fails_to_load(saved: tuple[NeuralRecommender, Path]) -> None:
    _, directory = saved
    path = directory / CONFIG_FILE
    body = json.loads(path.read_text())
    body["fingerprint"] = "sha256:" + "0" * 64
    path.write_text(json.dumps(body))
    with pytest.raises(ModelLoadError, match="fingerprint"):
        load_model(directory)


@pytest.mark.parametrize("missing", [WEIGHTS_FILE, CONFIG_FILE, None])
def test_missing_model_directory_or_file_gives_a_clear_error(
    saved: tuple[NeuralRecommender, Path], tmp_path: Path, missing: str | None
) -> None:
    _, directory = saved
    if missing is None:
        directory = tmp_path / "does-not-exist"
    else:
        (directory / missing).unlink()
    with pytest.raises(ModelLoadError) as info:
        load_model(directory)
    message = str(info.value)
    assert str(directory) in message
    assert "not a model directory" in message
    assert "stream-adapt pretrain" in message


@pytest.mark.parametrize("content", ["{not json", "{}", '{"fingerprint": "sha256:x"}', "[]"])
def test_malformed_config_file_gives_a_model_load_error(saved: tuple[NeuralRecommender, Path], content: str) -> None:
    _, directory = saved
    (directory / CONFIG_FILE).write_text(content)
    with pytest.raises(ModelLoadError, match="malformed"):
        load_model(directory)


@pytest.mark.parametrize("content", ["null", '"model"', "3"])
def test_config_file_that_is_not_a_json_object_gives_a_model_load_error(
    saved: tuple[NeuralRecommender, Path], content: str
) -> None:
    _, directory = saved
    (directory / CONFIG_FILE).write_text(content)
    with pytest.raises(ModelLoadError):
        load_model(directory)


def test_loading_as_item_entities_keeps_the_fingerprint_and_indexes_items(
    saved: tuple[NeuralRecommender, Path],
) -> None:
    model, directory = saved
    as_items = load_model(directory, entity="item")
    assert as_items.entity_kind == "item"
    assert as_items.fingerprint == model.fingerprint
    assert as_items.entity_index(["i3", "u3"]).tolist() == [4, 0]
    assert as_items.counterpart_index(["u3", "i3"]).tolist() == [4, 0]


# ---- id mapping ---------------------------------------------------------------------------------------


def test_known_ids_map_to_their_rows_and_unknown_ids_to_the_cold_start_row_0() -> None:
    model = _model()
    assert model.entity_index(["u0", "u4", "nobody", ""]).tolist() == [1, 5, 0, 0]
    assert model.counterpart_index(["i11", "unknown", "i0"]).tolist() == [12, 0, 1]


def test_unknown_user_is_scored_with_the_cold_start_row() -> None:
    model = _model()
    items = ITEMS[:4]
    stranger = _scores(model, ["never-seen"], items)
    cold_row = model.initial_adapter(torch.tensor([0]))
    with torch.no_grad():
        expected = model.predict(cold_row, model.counterpart_index(items).unsqueeze(0), model.global_adapter())
    assert torch.equal(stranger, expected)
    assert not torch.equal(stranger, _scores(model, ["u0"], items))


# ---- plugins ------------------------------------------------------------------------------------------

PLUGIN_SOURCE = '''
"""A user's own recommender: a fixed score per item plus a per-user bias (the adapter)."""

import json
from pathlib import Path

import torch


class BiasModel:
    entity_kind = "user"

    def __init__(self, items):
        self.items = {item: k + 1 for k, item in enumerate(items)}
        self.item_score = torch.linspace(2.0, 4.0, len(items) + 1)
        self.fingerprint = "sha256:bias-model-v1"

    def adapter_spec(self):
        return {"bias": (1,)}

    def global_spec(self):
        return {"offset": (1,)}

    def entity_index(self, ids):
        return torch.zeros(len(ids), dtype=torch.long)

    def counterpart_index(self, ids):
        return torch.tensor([self.items.get(i, 0) for i in ids], dtype=torch.long)

    def initial_adapter(self, entity_idx):
        return {"bias": torch.zeros(len(entity_idx), 1)}

    def global_adapter(self):
        return {"offset": torch.zeros(1)}

    def predict(self, adapter, counterpart_idx, shared):
        return self.item_score[counterpart_idx] + adapter["bias"] + shared["offset"]


def make(model_dir):
    return BiasModel(json.loads((Path(model_dir) / "items.json").read_text()))


def not_a_model(model_dir):
    return {"weights": []}
'''


@pytest.fixture
def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A plugin module written to tmp_path (on sys.path) with a model directory beside it."""
    name = "stream_adapt_test_plugin_" + tmp_path.name.replace("-", "_")
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "items.json").write_text(json.dumps(ITEMS))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_plugin_model_loads_from_module_and_factory_with_the_model_directory(
    plugin_module: str, tmp_path: Path
) -> None:
    model = load_plugin(f"{plugin_module}:make", tmp_path / "model")
    assert isinstance(model, AdaptableModel)
    assert model.fingerprint == "sha256:bias-model-v1"
    assert model.counterpart_index(["i0", "i11", "other"]).tolist() == [1, 12, 0]


def test_plugin_model_learns_through_the_pipeline(plugin_module: str, tmp_path: Path) -> None:
    """The protocol is all the pipeline needs: a user who rates everything 5 gets a higher bias."""
    model = load_plugin(f"{plugin_module}:make", tmp_path / "model")
    cfg = pipeline_config({"drift": {"global_detector": {"kind": "none"}, "entity_detector": {"kind": "none"}}})
    pipeline = Pipeline(model, cfg)
    records = [
        Record(
            json.dumps(
                {
                    "event_id": f"e{k}",
                    "user_id": "fan",
                    "item_id": ITEMS[k % len(ITEMS)],
                    "event_type": "rating",
                    "value": 5.0,
                    "timestamp": 1_700_000_000.0 + k,
                }
            ).encode(),
            Position("feedback", 0, k),
        )
        for k in range(cfg.window.shots)
    ]
    result = pipeline.process(records, now=1_700_001_000.0)
    assert [r.outcome for r in result.log] == ["accepted"]
    assert len(result.updates) == 1
    update, tensors = decode_update(result.updates[0].payload, model.adapter_spec(), model.fingerprint)
    assert update.entity == "fan" and update.version == 1
    assert float(tensors["bias"]) > 0.0


@pytest.mark.parametrize(
    "spec",
    ["no_colon_here", ":make", "module_only:", "stream_adapt_no_such_module_xyz:make", "json:no_such_factory"],
)
def test_plugin_with_a_bad_spec_raises_model_load_error_naming_it(spec: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_plugin(spec, None)
    assert repr(spec) in str(info.value)


def test_plugin_factory_returning_something_else_raises_model_load_error(plugin_module: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not implement AdaptableModel"):
        load_plugin(f"{plugin_module}:not_a_model", tmp_path / "model")


def test_plugin_spec_naming_something_that_is_not_callable_raises_model_load_error() -> None:
    with pytest.raises(ModelLoadError):
        load_plugin("math:pi", None)


def test_plugin_factory_that_raises_is_reported_as_model_load_error_with_its_message() -> None:
    # json.loads(None) raises TypeError inside the "factory": the error names the plugin and the cause.
    with pytest.raises(ModelLoadError, match=r"'json:loads' failed: TypeError"):
        load_plugin("json:loads", None)
