"""Configuration: frozen pydantic models, loaded from a file, STREAM_ADAPT_* env and CLI flags.

The learning core takes `PipelineConfig` (plain, frozen); the edges take `Settings`, which adds Kafka,
metrics and runtime options. Precedence, highest first: CLI flags, environment
(`STREAM_ADAPT_ADAPT__LR=0.1`, nested with `__`), the config file (`--config FILE`, TOML or JSON),
defaults. An invalid value fails at start with the field named (`ConfigError`).
"""

from __future__ import annotations

import contextvars
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from stream_adapt.errors import ConfigError
from stream_adapt.events import DEFAULT_MAX_FUTURE_S, DEFAULT_MAX_RECORD_BYTES, EventType

#: Setting names containing one of these are secrets: never printed.
SECRET_WORDS = ("password", "secret", "token", "key", "jaas", "credential")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EventsConfig(_Frozen):
    """What counts as a valid event, and which ones the model learns from."""

    max_record_bytes: int = Field(
        DEFAULT_MAX_RECORD_BYTES, ge=256, le=16 * 1024 * 1024, description="Larger records are dead-lettered."
    )
    max_future_s: float = Field(
        DEFAULT_MAX_FUTURE_S, ge=0, description="Event timestamps further ahead of the clock are dead-lettered."
    )
    dedup_capacity: int = Field(
        200_000, ge=0, description="How many recent event_ids are remembered to drop duplicates (0: off)."
    )
    learn_types: tuple[EventType, ...] = Field(
        (EventType.RATING,),
        min_length=1,
        description="Event types the model learns from; other valid events are counted and skipped.",
    )


class WindowConfig(_Frozen):
    """Per-entity few-shot windows."""

    entity: Literal["user", "item"] = Field("user", description="Adapt per user or per item.")
    shots: int = Field(8, ge=2, le=1024, description="K: events per window (support + query).")
    query_shots: int = Field(2, ge=1, description="The last Q events of a window are its query shots.")
    min_shots: int = Field(4, ge=2, description="A window older than max_age is adapted if it has this many.")
    max_age_s: float = Field(
        7 * 24 * 3600.0, gt=0, description="Event-time age after which a partial window is closed."
    )
    max_entities: int = Field(
        100_000, ge=1, description="Open windows (and per-entity drift state) kept; least recent evicted."
    )

    @field_validator("query_shots")
    @classmethod
    def _query_below_shots(cls, q: int, info: ValidationInfo) -> int:
        shots = info.data.get("shots")
        if shots is not None and q >= shots:
            raise ValueError(f"must be smaller than shots ({shots})")
        return q

    @field_validator("min_shots")
    @classmethod
    def _min_between(cls, m: int, info: ValidationInfo) -> int:
        shots, q = info.data.get("shots"), info.data.get("query_shots")
        if shots is not None and m > shots:
            raise ValueError(f"must not exceed shots ({shots})")
        if q is not None and m <= q:
            raise ValueError(f"must exceed query_shots ({q}): a window needs support shots")
        return m


class AdaptConfig(_Frozen):
    """The few gradient steps run on each window's support shots."""

    steps: int = Field(5, ge=1, le=200, description="Gradient steps per adaptation.")
    optimizer: Literal["sgd", "adam"] = Field(
        "sgd", description="SGD: steps scale with the error, so drifted entities move far and others little."
    )
    lr: float | None = Field(
        None,
        gt=0,
        le=10,
        description="Adaptation learning rate; null: the step sizes the model meta-learned at pretraining, else 0.01.",
    )
    lr_scale: dict[str, float] | None = Field(
        None,
        description="Per adapter tensor: learning-rate multiplier (a bias is one well-determined number, an "
        'embedding has many dimensions and few shots); null: the model\'s learned ones, else {"bias": 3}.',
    )
    l2: float = Field(0.01, ge=0, description="Pull toward the starting adapter: l2 * ||theta - theta0||^2.")
    max_batch: int = Field(4096, ge=1, description="At most this many windows per vectorised call.")
    device: str = Field("cpu", description="torch device for adaptation ('cpu', 'cuda').")
    threads: int = Field(
        1, ge=0, description="torch intra-op threads (0: torch's default). One is fastest on small shared hosts."
    )


#: Step sizes when neither the configuration nor the model (meta-learned) gives them.
DEFAULT_ADAPT_LR = 0.01  # chosen on validation splits of ML-100K (evaluate --validation); see README
DEFAULT_LR_SCALE = {"bias": 3.0}


class GateConfig(_Frozen):
    """Accept an adapted version only if it is better on the window's query shots, finite and bounded."""

    enabled: bool = Field(
        True, description="false: accept every finite adaptation (an ablation; the norm bounds still apply)."
    )
    min_improvement: float = Field(
        0.0, ge=0, lt=1, description="Relative query-loss improvement needed to accept (0: any strict gain)."
    )
    max_delta_norm: float = Field(5.0, gt=0, description="Largest L2 change of the adapter in one step.")
    max_adapter_norm: float = Field(50.0, gt=0, description="Largest L2 norm an accepted adapter may have.")
    min_interval_s: float = Field(
        0.0, ge=0, description="Per-entity rate limit: event-time seconds between accepted versions."
    )


class DetectorConfig(_Frozen):
    """One river drift detector on the absolute prequential error (its parameters are in error units)."""

    kind: Literal["adwin", "page_hinkley", "kswin", "none"] = Field("adwin", description="River detector.")
    adwin_delta: float = Field(0.002, gt=0, lt=1, description="ADWIN confidence (smaller: fewer alarms).")
    adwin_clock: int = Field(32, ge=1, description="ADWIN checks for change every `clock` updates.")
    ph_threshold: float = Field(50.0, gt=0, description="PageHinkley: cumulative excess error that signals drift.")
    ph_delta: float = Field(0.005, ge=0, description="PageHinkley: error increase tolerated per event.")
    ph_min_instances: int = Field(30, ge=1, description="PageHinkley: events before it may signal.")
    kswin_alpha: float = Field(0.005, gt=0, lt=1, description="KSWIN: significance of the KS test.")
    kswin_window: int = Field(100, ge=20, description="KSWIN: window size (~230 us per update).")


class DriftConfig(_Frozen):
    """Drift detection: one detector over all events, and one per recently active entity.

    Their defaults differ on purpose. The global stream is long: ADWIN is sensitive yet rarely wrong
    there. An entity's stream is short (a few dozen events): ADWIN almost never fires on it, while a
    PageHinkley with a threshold of ~8 rating-units of excess error caught every drifted user of the
    synthetic stream with few false alarms (see README, "Drift").
    """

    global_detector: DetectorConfig = DetectorConfig(kind="adwin")
    entity_detector: DetectorConfig = DetectorConfig(kind="page_hinkley", ph_threshold=8.0, ph_min_instances=10)
    entity_warmup: int = Field(10, ge=0, description="Events an entity must have before its drift counts.")
    reset_on_drift: bool = Field(True, description="Re-adapt a drifted entity from the initial adapter.")
    reservoir_size: int = Field(4096, ge=64, description="Recent events kept to re-adapt the shared part.")
    reservoir_entity_share: float = Field(
        1 / 32,
        gt=0,
        le=1,
        description="Largest share of that reservoir one entity may hold (1: no cap). Stops one entity's burst "
        "from steering the shared part for everyone; costs ML-100K's session-heavy stream 0.016 MAE (README).",
    )
    global_steps: int = Field(20, ge=1, description="Adam steps when re-adapting the shared part.")
    global_lr: float = Field(0.02, gt=0, description="Learning rate when re-adapting the shared part.")


class PipelineConfig(_Frozen):
    """Everything the learning core needs. Pure: no I/O settings here."""

    events: EventsConfig = EventsConfig()
    window: WindowConfig = WindowConfig()
    adapt: AdaptConfig = AdaptConfig()
    gate: GateConfig = GateConfig()
    drift: DriftConfig = DriftConfig()
    seed: int = Field(0, description="Seed of everything random in the pipeline.")


class KafkaConfig(_Frozen):
    """Kafka connection and topics. `extra` passes librdkafka keys through (security.protocol, ssl.*...)."""

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers.")
    topic: str = Field("feedback", description="Input topic of feedback events, keyed by entity id.")
    model_topic: str = Field("stream-adapt.models", description="Compacted topic of adapter versions.")
    log_topic: str = Field("stream-adapt.adaptations", description="Every adaptation outcome, as JSON.")
    dead_letter_topic: str = Field("stream-adapt.dead-letters", description="Invalid records, with why and where.")
    group: str = Field("stream-adapt", description="Consumer group: add instances to scale out.")
    sasl_username: str | None = Field(None, description="SASL username (with sasl_password).")
    sasl_password: SecretStr | None = Field(None, description="SASL password; never logged.")
    extra: dict[str, str] = Field(
        default_factory=dict, repr=False, description="Other librdkafka settings, passed through (values not shown)."
    )
    exactly_once: bool = Field(False, description="Kafka transactions: outputs and offsets commit together.")

    @classmethod
    def prefixed(cls, prefix: str, bootstrap_servers: str, group: str | None = None) -> KafkaConfig:
        """The four topics named `{prefix}.feedback`, `.models`, `.adaptations`, `.dead-letters` and the
        group `{prefix}.group` (or `group`): one self-contained set, as the demo and the benchmarks use."""
        return cls(
            bootstrap_servers=bootstrap_servers,
            topic=f"{prefix}.feedback",
            model_topic=f"{prefix}.models",
            log_topic=f"{prefix}.adaptations",
            dead_letter_topic=f"{prefix}.dead-letters",
            group=group or f"{prefix}.group",
        )


class Settings(BaseSettings):
    """Service settings: the pipeline plus its edges."""

    model_config = SettingsConfigDict(
        env_prefix="STREAM_ADAPT_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    pipeline: PipelineConfig = PipelineConfig()
    kafka: KafkaConfig = KafkaConfig()
    instance_id: str | None = Field(
        None,
        description="This member's name (client.id, transactional.id); default: the host name. Members "
        "sharing a host need distinct ones.",
    )
    batch_size: int = Field(2000, ge=1, description="Records polled per batch.")
    poll_timeout_s: float = Field(0.5, gt=0, description="Longest wait for a batch.")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve /metrics, /healthz and /readyz on this port (0: any free port)."
    )
    metrics_host: str = Field("0.0.0.0", description="Address the metrics endpoint listens on.")
    ready_max_lag: int = Field(
        10_000, ge=0, description="/readyz turns ready once the read lag over the owned partitions is at most this."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest first: flags (init values), then the environment, then the config file.
        return (init_settings, env_settings, _FileSource(settings_cls))


#: The config file's values while `load_settings` builds a `Settings` (read by `_FileSource`).
_FILE_VALUES: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("stream_adapt_config_file")


class _FileSource(PydanticBaseSettingsSource):
    """The config file as the lowest-priority settings source."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return _FILE_VALUES.get({}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_FILE_VALUES.get({}))


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise ConfigError(f"config file {path} is not valid {kind}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table/object at the top level")
    return data


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the field by its dotted path."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err.get("loc", ()))
        secret = any(word in loc for word in SECRET_WORDS) or loc.startswith("kafka.extra")
        shown = "<redacted>" if secret else f"{err.get('input')!r:.60}"
        lines.append(f"{prefix}{loc or '(root)'}: {err.get('msg')} (got {shown})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings(config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build `Settings`; precedence: overrides (flags) > environment > file > defaults.

    Raises `ConfigError` naming every invalid field (or environment variable).
    """
    token = _FILE_VALUES.set(_read_file(config_file) if config_file else {})
    try:
        return Settings(**(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from exc
    except SettingsError as exc:  # e.g. STREAM_ADAPT_KAFKA__EXTRA='{x' is not JSON
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        raise ConfigError(f"invalid configuration from the environment: {exc}{cause}") from exc
    finally:
        _FILE_VALUES.reset(token)


def pipeline_config(overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """A `PipelineConfig` from plain values (tests, benchmarks); `ConfigError` names the field."""
    try:
        return PipelineConfig.model_validate(overrides or {})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "pipeline.")) from exc


def _rows(model: BaseModel, prefix: str) -> list[tuple[str, str, str]]:
    """(dotted key, default, meaning) of every leaf setting, defaults read from the default instance."""
    rows = []
    for name, info in type(model).model_fields.items():
        key = f"{prefix}{info.alias or name}"
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            rows += _rows(value, key + ".")
            continue
        if isinstance(value, SecretStr):
            shown = '"**********"'
        else:
            shown = json.dumps(list(value) if isinstance(value, tuple) else value, default=str)
        rows.append((key, shown, (info.description or "").replace("|", "\\|")))
    return rows


def reference_table() -> str:
    """Every setting with its default and meaning, as a Markdown table (the README's reference)."""
    lines = ["| setting | default | meaning |", "|---|---|---|"]
    lines += [f"| `{k}` | `{d}` | {m} |" for k, d, m in _rows(Settings(), "")]
    return "\n".join(lines)
