"""Recommenders that declare small per-entity adapters on top of frozen base weights.

The contract (`AdaptableModel`) is batched: `predict(adapter, counterpart_idx)` scores, for each of B
entities with its own adapter tensors (leading dimension B), a [B, K] block of counterparts (items when
entities are users). Adaptation differentiates through it for all B entities at once.

The built-in `NeuralRecommender`:
    pred = g + b_e + b_c + <e, c> + head([u, i, u*i])
with entity/counterpart embeddings e, c and biases. The per-entity adapter is {emb, bias} (optionally a
rank-r LoRA delta on the head's first layer); an entity starts from its base row, or from the learned
cold-start row (index 0, trained with entity dropout and optionally meta-learned) when unseen. The shared
("global") adapter is {global_bias, counterpart_bias}: the part that drifts when popularity shifts.

Users plug their own model in with `module:factory` (see `load_plugin`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from stream_adapt.errors import ModelLoadError

Adapter = dict[str, Tensor]
EntityKind = Literal["user", "item"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"


@runtime_checkable
class AdaptableModel(Protocol):
    """What the pipeline needs from a recommender. All tensors float32 on `device`."""

    entity_kind: EntityKind
    fingerprint: str

    def adapter_spec(self) -> dict[str, tuple[int, ...]]:
        """Per-entity adapter tensor names and shapes (without the batch dimension)."""
        ...

    def global_spec(self) -> dict[str, tuple[int, ...]]:
        """Shared adapter tensor names and shapes."""
        ...

    def entity_index(self, ids: Sequence[str]) -> Tensor:
        """Long [N] indices of entity ids; unknown ids map to 0 (the cold-start row)."""
        ...

    def counterpart_index(self, ids: Sequence[str]) -> Tensor:
        """Long [N] indices of counterpart ids (items for user entities); unknown ids map to 0."""
        ...

    def initial_adapter(self, entity_idx: Tensor) -> Adapter:
        """The starting adapter for each entity index: tensors [N, *shape]."""
        ...

    def global_adapter(self) -> Adapter:
        """A fresh copy of the base model's shared adapter (the pipeline owns and re-adapts its copy)."""
        ...

    def predict(self, adapter: Adapter, counterpart_idx: Tensor, shared: Adapter) -> Tensor:
        """Scores [B, K] for adapters [B, ...], counterpart indices [B, K] and the shared adapter."""
        ...


@dataclass(frozen=True)
class RecommenderConfig:
    """Architecture of the built-in model (saved beside its weights)."""

    n_users: int
    n_items: int
    dim: int = 32
    hidden: int = 64
    lora_rank: int = 0
    entity: EntityKind = "user"
    value_range: tuple[float, float] = (0.0, 5.0)
    kind: str = "neural-recommender/1"
    extra: dict[str, Any] = field(default_factory=dict)


class NeuralRecommender(nn.Module):
    """A small, strong default: biased MF plus an MLP interaction head. Base weights are frozen."""

    def __init__(self, config: RecommenderConfig, users: Sequence[str] = (), items: Sequence[str] = ()):
        super().__init__()
        self.config = config
        self.entity_kind: EntityKind = config.entity
        d, h = config.dim, config.hidden
        # Row 0 of each table is the cold-start row for unknown ids.
        self.user_emb = nn.Embedding(config.n_users + 1, d)
        self.item_emb = nn.Embedding(config.n_items + 1, d)
        self.user_bias = nn.Embedding(config.n_users + 1, 1)
        self.item_bias = nn.Embedding(config.n_items + 1, 1)
        self.global_bias = nn.Parameter(torch.zeros(1))
        self.head1 = nn.Linear(3 * d, h)
        self.head2 = nn.Linear(h, 1)
        nn.init.normal_(self.user_emb.weight, std=0.05)
        nn.init.normal_(self.item_emb.weight, std=0.05)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)
        nn.init.normal_(self.head2.weight, std=0.01)
        nn.init.zeros_(self.head2.bias)
        if config.lora_rank:
            # A fixed random down-projection shared by all entities; each entity learns its up-projection.
            gen = torch.Generator().manual_seed(1234)
            self.register_buffer("lora_a", torch.randn(config.lora_rank, 3 * d, generator=gen) / (3 * d) ** 0.5)
        self.user_ids = {u: i + 1 for i, u in enumerate(users)}
        self.item_ids = {it: i + 1 for i, it in enumerate(items)}
        self.fingerprint = ""

    # ---- tables by role -------------------------------------------------------------------------
    def _entity_tables(self) -> tuple[nn.Embedding, nn.Embedding]:
        return (self.user_emb, self.user_bias) if self.entity_kind == "user" else (self.item_emb, self.item_bias)

    def _counterpart_tables(self) -> tuple[nn.Embedding, nn.Embedding]:
        return (self.item_emb, self.item_bias) if self.entity_kind == "user" else (self.user_emb, self.user_bias)

    def _ids(self, role: Literal["entity", "counterpart"]) -> dict[str, int]:
        is_user = (role == "entity") == (self.entity_kind == "user")
        return self.user_ids if is_user else self.item_ids

    # ---- AdaptableModel -------------------------------------------------------------------------
    def adapter_spec(self) -> dict[str, tuple[int, ...]]:
        spec: dict[str, tuple[int, ...]] = {"emb": (self.config.dim,), "bias": (1,)}
        if self.config.lora_rank:
            spec["lora_b"] = (self.config.hidden, self.config.lora_rank)
        return spec

    def global_spec(self) -> dict[str, tuple[int, ...]]:
        n = self._counterpart_tables()[1].num_embeddings
        return {"global_bias": (1,), "counterpart_bias": (n,)}

    def entity_index(self, ids: Sequence[str]) -> Tensor:
        table = self._ids("entity")
        return torch.tensor([table.get(i, 0) for i in ids], dtype=torch.long)

    def counterpart_index(self, ids: Sequence[str]) -> Tensor:
        table = self._ids("counterpart")
        return torch.tensor([table.get(i, 0) for i in ids], dtype=torch.long)

    def initial_adapter(self, entity_idx: Tensor) -> Adapter:
        emb, bias = self._entity_tables()
        out = {"emb": emb.weight[entity_idx].detach(), "bias": bias.weight[entity_idx].detach()}
        if self.config.lora_rank:
            out["lora_b"] = torch.zeros(len(entity_idx), self.config.hidden, self.config.lora_rank)
        return out

    def global_adapter(self) -> Adapter:
        return {
            "global_bias": self.global_bias.detach().clone(),
            "counterpart_bias": self._counterpart_tables()[1].weight.detach()[:, 0].clone(),
        }

    def predict(self, adapter: Adapter, counterpart_idx: Tensor, shared: Adapter) -> Tensor:
        e = adapter["emb"]  # [B, d]
        c = self._counterpart_tables()[0].weight[counterpart_idx]  # [B, K, d]
        e_k = e.unsqueeze(1).expand_as(c)
        u, i = (e_k, c) if self.entity_kind == "user" else (c, e_k)
        x = torch.cat((u, i, u * i), dim=-1)  # [B, K, 3d]
        hidden = self.head1(x)
        if "lora_b" in adapter:
            # delta W = lora_b @ lora_a, per entity: [B, h, r] @ [r, 3d]
            lora_a: Tensor = self.lora_a  # type: ignore[assignment]  # a registered buffer
            hidden = hidden + torch.einsum("bkr,bhr->bkh", x @ lora_a.T, adapter["lora_b"])
        out = self.head2(torch.relu(hidden)).squeeze(-1)  # [B, K]
        dot = (e_k * c).sum(-1)
        return shared["global_bias"] + adapter["bias"] + shared["counterpart_bias"][counterpart_idx] + dot + out

    # ---- pretraining forward (all weights trainable) ----------------------------------------------
    def forward(self, user_idx: Tensor, item_idx: Tensor) -> Tensor:
        """Plain forward for pretraining: one score per (user, item) pair, base tables only."""
        emb, bias = self._entity_tables()
        ent_idx, cp_idx = (user_idx, item_idx) if self.entity_kind == "user" else (item_idx, user_idx)
        adapter: Adapter = {"emb": emb(ent_idx), "bias": bias(ent_idx)}
        shared = {"global_bias": self.global_bias, "counterpart_bias": self._counterpart_tables()[1].weight[:, 0]}
        if self.config.lora_rank:
            adapter["lora_b"] = torch.zeros(len(ent_idx), self.config.hidden, self.config.lora_rank)
        return self.predict(adapter, cp_idx.unsqueeze(1), shared).squeeze(1)


def served(model: AdaptableModel, predictions: Tensor) -> Tensor:
    """Predictions as served: clamped to the model's value range when it has one (ratings 1-5 stay in 1-5).

    Adaptation optimises the raw predictions (a clamp has no gradient outside the range); everything
    that scores or serves (prequential error, the gate, serving, evaluation) uses these.
    """
    value_range = getattr(getattr(model, "config", None), "value_range", None)
    return predictions.clamp(*value_range) if value_range else predictions


def freeze(model: nn.Module) -> None:
    """Base weights never change after pretraining."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def save_model(model: NeuralRecommender, directory: Path) -> str:
    """Write weights (safetensors) and config (JSON with vocabularies and fingerprint). Returns fingerprint."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(weights), metadata={"format": "pt", "kind": model.config.kind})
    users = sorted(model.user_ids, key=model.user_ids.__getitem__)
    items = sorted(model.item_ids, key=model.item_ids.__getitem__)
    body = {"config": asdict(model.config), "users": users, "items": items}
    fingerprint = _fingerprint(tensors, body)
    body["fingerprint"] = fingerprint
    (directory / CONFIG_FILE).write_text(json.dumps(body))
    model.fingerprint = fingerprint
    return fingerprint


def _fingerprint(tensors: dict[str, Tensor], body: dict[str, Any]) -> str:
    """sha256 over the tensors (sorted names, dtypes, shapes, bytes) and the config.

    Not over the weight file: safetensors writes its metadata in no fixed order, so the same weights
    could give two fingerprints and every adapter published against one would look foreign.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(body, sort_keys=True).encode())
    return "sha256:" + h.hexdigest()


def load_model(directory: Path, entity: EntityKind | None = None) -> NeuralRecommender:
    """Load a model directory written by `save_model`; verify its fingerprint; freeze it."""
    weights, cfg_path = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    if not weights.is_file() or not cfg_path.is_file():
        raise ModelLoadError(
            f"{directory} is not a model directory (needs {WEIGHTS_FILE} and {CONFIG_FILE}); "
            "create one with `stream-adapt pretrain`"
        )
    try:
        body = json.loads(cfg_path.read_text())
        if not isinstance(body, dict):
            raise TypeError(f"expected a JSON object, got {type(body).__name__}")
        fingerprint = body.pop("fingerprint")
        raw_cfg = dict(body["config"])
        raw_cfg["value_range"] = tuple(raw_cfg["value_range"])
        config = RecommenderConfig(**raw_cfg)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{cfg_path} is malformed: {exc}") from exc
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise ModelLoadError(f"{weights}: cannot load weights: {exc}") from exc
    if _fingerprint(state, body) != fingerprint:
        raise ModelLoadError(f"{directory}: fingerprint mismatch; weights or config were modified")
    if entity is not None and entity != config.entity:
        config = RecommenderConfig(**{**asdict(config), "entity": entity})
    try:
        model = NeuralRecommender(config, body["users"], body["items"])
        model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ModelLoadError(f"{directory}: weights do not fit the config: {exc}") from exc
    freeze(model)
    model.fingerprint = fingerprint
    return model


def load_plugin(spec: str, model_dir: Path | None) -> AdaptableModel:
    """Load a user's model from `module:factory`; the factory gets the model directory (or None)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelLoadError(f"model plugin {spec!r} must look like 'package.module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"cannot import model plugin {spec!r}: {exc}") from exc
    if not callable(factory):
        raise ModelLoadError(f"model plugin {spec!r} names a {type(factory).__name__}, not a factory function")
    try:
        model = factory(model_dir)
    except Exception as exc:
        raise ModelLoadError(f"model plugin {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, AdaptableModel):
        raise ModelLoadError(f"{spec!r} returned {type(model).__name__}, which does not implement AdaptableModel")
    return model
