"""Configuration: valid defaults, ConfigError naming the field, file < env < overrides, secrets hidden."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from stream_adapt.config import PipelineConfig, Settings, load_settings, pipeline_config
from stream_adapt.errors import ConfigError

SECRET = "hunter2-s3cr3t"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No STREAM_ADAPT_* variable of the caller's shell leaks into a test."""
    for name in list(os.environ):
        if name.upper().startswith("STREAM_ADAPT_"):
            monkeypatch.delenv(name)


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stream-adapt.toml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_the_same_however_they_are_built() -> None:
    cfg = pipeline_config()
    assert cfg == PipelineConfig()
    assert cfg.window.query_shots < cfg.window.shots
    assert cfg.window.query_shots < cfg.window.min_shots <= cfg.window.shots
    settings = load_settings()
    assert settings.pipeline == cfg
    assert settings == Settings()


def test_config_is_frozen() -> None:
    cfg = pipeline_config()
    with pytest.raises(ValidationError):
        cfg.window.shots = 3  # type: ignore[misc]
    with pytest.raises(ValidationError):
        load_settings().batch_size = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"window": {"shots": 1}}, "pipeline.window.shots"),
        ({"window": {"entity": "session"}}, "pipeline.window.entity"),
        ({"window": {"max_age_s": 0}}, "pipeline.window.max_age_s"),
        ({"adapt": {"lr": -1}}, "pipeline.adapt.lr"),
        ({"adapt": {"steps": 0}}, "pipeline.adapt.steps"),
        ({"adapt": {"optimizer": "lbfgs"}}, "pipeline.adapt.optimizer"),
        ({"gate": {"min_improvement": 1.0}}, "pipeline.gate.min_improvement"),
        ({"drift": {"entity_detector": {"kind": "magic"}}}, "pipeline.drift.entity_detector.kind"),
        ({"events": {"learn_types": ["rating", "review"]}}, "pipeline.events.learn_types.1"),
        ({"bogus": 1}, "pipeline.bogus"),
        ({"window": {"bogus": 1}}, "pipeline.window.bogus"),
    ],
)
def test_invalid_pipeline_value_raises_config_error_naming_the_dotted_field(
    overrides: dict[str, Any], path: str
) -> None:
    with pytest.raises(ConfigError) as info:
        pipeline_config(overrides)
    assert path in str(info.value)


@pytest.mark.parametrize(
    ("window", "field"),
    [
        ({"shots": 8, "query_shots": 8}, "query_shots"),
        ({"shots": 8, "query_shots": 9}, "query_shots"),
        ({"shots": 8, "min_shots": 9}, "min_shots"),
        ({"shots": 8, "query_shots": 4, "min_shots": 4}, "min_shots"),
    ],
)
def test_inconsistent_window_sizes_raise_config_error_naming_the_section_and_field(
    window: dict[str, int], field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        pipeline_config({"window": window})
    message = str(info.value)
    assert "pipeline.window" in message
    assert field in message


def test_invalid_override_of_settings_raises_config_error_naming_the_dotted_field() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides={"pipeline": {"window": {"shots": 1}}})
    assert "pipeline.window.shots" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_settings(overrides={"metrics_port": 70000})
    assert "metrics_port" in str(info.value)


def test_unknown_key_in_a_config_file_raises_config_error_naming_it(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[pipeline.adapt]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "pipeline.adapt.learning_rate" in str(info.value)


def test_toml_file_values_are_loaded(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[pipeline.adapt]\nlr = 0.5\nsteps = 3\n[kafka]\ntopic = "ratings"\n')
    settings = load_settings(path)
    assert settings.pipeline.adapt.lr == 0.5
    assert settings.pipeline.adapt.steps == 3
    assert settings.kafka.topic == "ratings"


def test_json_file_values_are_loaded(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"pipeline": {"window": {"shots": 12, "query_shots": 3}}}))
    settings = load_settings(path)
    assert (settings.pipeline.window.shots, settings.pipeline.window.query_shots) == (12, 3)


def test_env_overrides_the_file_and_leaves_its_other_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _toml(tmp_path, "[pipeline.adapt]\nlr = 0.5\nsteps = 3\n")
    monkeypatch.setenv("STREAM_ADAPT_PIPELINE__ADAPT__LR", "0.25")
    settings = load_settings(path)
    assert settings.pipeline.adapt.lr == 0.25
    assert settings.pipeline.adapt.steps == 3


def test_overrides_beat_the_file_and_leave_its_other_values(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[pipeline.adapt]\nlr = 0.5\nsteps = 3\n")
    settings = load_settings(path, {"pipeline": {"adapt": {"lr": 0.125}}})
    assert settings.pipeline.adapt.lr == 0.125
    assert settings.pipeline.adapt.steps == 3


def test_overrides_beat_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _toml(tmp_path, "[pipeline.adapt]\nlr = 0.5\nsteps = 3\n")
    monkeypatch.setenv("STREAM_ADAPT_PIPELINE__ADAPT__LR", "0.25")
    settings = load_settings(path, {"pipeline": {"adapt": {"lr": 0.125}}})
    assert settings.pipeline.adapt.lr == 0.125
    assert settings.pipeline.adapt.steps == 3


def test_invalid_env_value_raises_config_error_naming_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_ADAPT_PIPELINE__ADAPT__LR", "fast")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "pipeline.adapt.lr" in str(info.value)


def test_malformed_json_in_a_nested_env_var_raises_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_ADAPT_KAFKA__EXTRA", "{not json")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "kafka" in str(info.value)


def test_missing_or_unparsable_config_file_raises_config_error_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(missing)
    assert str(missing) in str(info.value)
    broken = _toml(tmp_path, "[pipeline.adapt\nlr = \n")
    with pytest.raises(ConfigError) as info:
        load_settings(broken)
    assert str(broken) in str(info.value)
    assert "TOML" in str(info.value)


# ---- secrets ------------------------------------------------------------------------------------------


def _shown(settings: Settings) -> str:
    """Every way a settings object is commonly printed or logged."""
    return " ".join(
        [str(settings), repr(settings), str(settings.kafka), repr(settings.kafka), settings.model_dump_json()]
    )


def test_secret_from_a_file_is_usable_but_never_shown(tmp_path: Path) -> None:
    path = _toml(tmp_path, f'[kafka]\nsasl_username = "svc"\nsasl_password = "{SECRET}"\n')
    settings = load_settings(path)
    assert settings.kafka.sasl_password is not None
    assert settings.kafka.sasl_password.get_secret_value() == SECRET
    assert SECRET not in _shown(settings)


def test_secret_from_env_survives_overrides_and_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_ADAPT_KAFKA__SASL_PASSWORD", SECRET)
    settings = load_settings(overrides={"pipeline": {"adapt": {"lr": 0.1}}})
    assert settings.kafka.sasl_password is not None
    assert settings.kafka.sasl_password.get_secret_value() == SECRET
    assert SECRET not in _shown(settings)


def test_config_error_about_another_field_does_not_show_the_secret(tmp_path: Path) -> None:
    path = _toml(tmp_path, f'[kafka]\nsasl_password = "{SECRET}"\ngroup = 5\n[pipeline.window]\nshots = 1\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "kafka.group" in str(info.value)
    assert "pipeline.window.shots" in str(info.value)
    assert SECRET not in str(info.value)


def test_config_error_about_the_secret_itself_redacts_its_value() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides={"kafka": {"sasl_password": [SECRET]}})
    message = str(info.value)
    assert "kafka.sasl_password" in message
    assert SECRET not in message
    assert SECRET not in repr(info.value)
