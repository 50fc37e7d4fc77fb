"""Few-shot adaptation of many entities at once, and the accept/rollback gate.

`adapt_batched` runs S optimiser steps for B windows in one vectorised computation: the B adapters are
rows of leaf tensors, the loss is the sum of the B per-window losses, so one backward pass yields every
window's own gradient (rows share no parameters). SGD and Adam are elementwise, hence batched too.
`adapt_loop` is the plain per-entity reference (torch.optim on one window at a time) that tests
compare against; it is 50-100x slower and never on the hot path.

Per window: loss(theta) = mean over support shots of (pred - y)^2 + l2 * ||theta - theta0||^2.
The gate compares the query-shot MSE after vs before and rejects non-finite, too-large or worse results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from stream_adapt.config import DEFAULT_ADAPT_LR, DEFAULT_LR_SCALE, AdaptConfig, GateConfig
from stream_adapt.learning.models import AdaptableModel, Adapter, served

# Adam constants, identical to torch.optim.Adam's defaults so the reference loop matches.
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


@dataclass
class WindowBatch:
    """B windows, padded to the longest, ready for one vectorised adaptation."""

    start: Adapter  # [B, ...] adapter each window starts from
    support_idx: Tensor  # [B, S] counterpart indices
    support_y: Tensor  # [B, S]
    support_mask: Tensor  # [B, S] 1.0 for real shots, 0.0 for padding
    query_idx: Tensor  # [B, Q]
    query_y: Tensor
    query_mask: Tensor
    shared: Adapter  # the shared (global) adapter in force, the same for every window

    def __len__(self) -> int:
        return int(self.support_idx.shape[0])


@dataclass
class AdaptResult:
    adapter: Adapter  # [B, ...] adapted tensors (detached)
    loss_before: Tensor  # [B] query MSE with the start adapter
    loss_after: Tensor  # [B] query MSE with the adapted one
    mae_before: Tensor  # [B] query MAE with the start adapter
    mae_after: Tensor  # [B]


def pad_batch(
    start: Adapter,
    support: list[tuple[list[int], list[float]]],
    query: list[tuple[list[int], list[float]]],
    shared: Adapter,
) -> WindowBatch:
    """Build a `WindowBatch` from per-window (counterpart indices, targets) lists of varying length."""

    def pad(rows: list[tuple[list[int], list[float]]]) -> tuple[Tensor, Tensor, Tensor]:
        width = max((len(r[0]) for r in rows), default=1) or 1
        idx = torch.tensor([i + [0] * (width - len(i)) for i, _ in rows], dtype=torch.long)
        y = torch.tensor([v + [0.0] * (width - len(v)) for _, v in rows], dtype=torch.float32)
        mask = torch.tensor([[1.0] * len(i) + [0.0] * (width - len(i)) for i, _ in rows], dtype=torch.float32)
        return idx, y, mask

    s_idx, s_y, s_m = pad(support)
    q_idx, q_y, q_m = pad(query)
    return WindowBatch(start, s_idx, s_y, s_m, q_idx, q_y, q_m, shared)


def step_size(cfg: AdaptConfig, name: str) -> float:
    """The learning rate of one adapter tensor: `lr` times its `lr_scale` (defaults when unset)."""
    lr = cfg.lr if cfg.lr is not None else DEFAULT_ADAPT_LR
    scale = cfg.lr_scale if cfg.lr_scale is not None else DEFAULT_LR_SCALE
    return lr * scale.get(name, 1.0)


def with_model_step_sizes(cfg: AdaptConfig, model: object) -> AdaptConfig:
    """`cfg` with unset step sizes taken from the model's meta-learned ones (`config.extra["adapt"]`)."""
    learned = getattr(getattr(model, "config", None), "extra", {}).get("adapt") or {}
    update: dict[str, object] = {}
    if cfg.lr is None and "lr" in learned:
        update["lr"] = float(learned["lr"])
    if cfg.lr_scale is None and "lr_scale" in learned:
        update["lr_scale"] = {str(k): float(v) for k, v in learned["lr_scale"].items()}
    return cfg.model_copy(update=update) if update else cfg


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Per-row mean over the real (mask 1) entries: [B, K] -> [B]."""
    return (values * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _window_losses(model: AdaptableModel, theta: Adapter, start: Adapter, batch: WindowBatch, l2: float) -> Tensor:
    pred = model.predict(theta, batch.support_idx, batch.shared)
    losses = masked_mean((pred - batch.support_y) ** 2, batch.support_mask)
    if l2:
        for name, value in theta.items():
            losses = losses + l2 * (value - start[name]).pow(2).flatten(1).sum(1)
    return losses


def query_errors(model: AdaptableModel, adapter: Adapter, batch: WindowBatch) -> tuple[Tensor, Tensor]:
    """Query MSE and MAE per window: ([B], [B])."""
    with torch.no_grad():
        err = served(model, model.predict(adapter, batch.query_idx, batch.shared)) - batch.query_y
        return masked_mean(err**2, batch.query_mask), masked_mean(err.abs(), batch.query_mask)


def adapt_batched(model: AdaptableModel, batch: WindowBatch, cfg: AdaptConfig) -> AdaptResult:
    """S steps of SGD/Adam on all B windows at once."""
    start = {k: v.detach() for k, v in batch.start.items()}
    theta = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    names = list(theta)
    m = {k: torch.zeros_like(v) for k, v in start.items()}
    v2 = {k: torch.zeros_like(v) for k, v in start.items()}
    for step in range(1, cfg.steps + 1):
        losses = _window_losses(model, theta, start, batch, cfg.l2)
        grads = torch.autograd.grad(losses.sum(), [theta[k] for k in names])
        with torch.no_grad():
            for name, g in zip(names, grads, strict=True):
                p = theta[name]
                lr = step_size(cfg, name)
                if cfg.optimizer == "sgd":
                    p.sub_(lr * g)
                else:
                    m[name].mul_(BETA1).add_(g, alpha=1 - BETA1)
                    v2[name].mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
                    bc1 = 1 - BETA1**step
                    bc2_sqrt = math.sqrt(1 - BETA2**step)
                    denom = (v2[name].sqrt() / bc2_sqrt).add_(EPS)
                    p.addcdiv_(m[name], denom, value=-lr / bc1)
    adapted = {k: v.detach() for k, v in theta.items()}
    loss_before, mae_before = query_errors(model, start, batch)
    loss_after, mae_after = query_errors(model, adapted, batch)
    return AdaptResult(adapted, loss_before, loss_after, mae_before, mae_after)


def adapt_loop(model: AdaptableModel, batch: WindowBatch, cfg: AdaptConfig) -> AdaptResult:
    """Reference: one window at a time with torch.optim. Same maths as `adapt_batched`."""
    outs: list[Adapter] = []
    for b in range(len(batch)):
        n_s = int(batch.support_mask[b].sum())
        s_idx, s_y = batch.support_idx[b : b + 1, :n_s], batch.support_y[b : b + 1, :n_s]
        start = {k: v[b : b + 1].detach() for k, v in batch.start.items()}
        params: Adapter = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
        groups = [{"params": [p], "lr": step_size(cfg, k)} for k, p in params.items()]
        opt: torch.optim.Optimizer
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(groups)
        else:
            opt = torch.optim.Adam(groups, betas=(BETA1, BETA2), eps=EPS)
        for _ in range(cfg.steps):
            opt.zero_grad()
            loss = ((model.predict(params, s_idx, batch.shared) - s_y) ** 2).mean()
            for name, p in params.items():
                loss = loss + cfg.l2 * (p - start[name]).pow(2).sum()
            loss.backward()
            opt.step()
        outs.append({k: p.detach() for k, p in params.items()})
    adapted = {k: torch.cat([o[k] for o in outs]) for k in batch.start}
    loss_before, mae_before = query_errors(model, batch.start, batch)
    loss_after, mae_after = query_errors(model, adapted, batch)
    return AdaptResult(adapted, loss_before, loss_after, mae_before, mae_after)


#: Why an adapted version is not published (bounded set: labels metrics).
ROLLBACK_REASONS = ("non_finite", "norm_jump", "norm_bound", "not_better")


def gate(start: Adapter, result: AdaptResult, cfg: GateConfig) -> list[str]:
    """Per window: 'accepted', or the first rollback reason in `ROLLBACK_REASONS` order."""
    finite = torch.isfinite(result.loss_after) & torch.isfinite(result.loss_before)
    delta_sq = torch.zeros_like(result.loss_after)
    norm_sq = torch.zeros_like(result.loss_after)
    for name, new in result.adapter.items():
        flat_new = new.flatten(1)
        finite &= torch.isfinite(flat_new).all(1)
        delta_sq += (flat_new - start[name].flatten(1)).pow(2).sum(1)
        norm_sq += flat_new.pow(2).sum(1)
    better = result.loss_after < result.loss_before * (1.0 - cfg.min_improvement)
    if not cfg.enabled:
        better = torch.ones_like(better)
    reasons: list[str] = []
    for ok, dn, n, good in zip(
        finite.tolist(),
        delta_sq.sqrt().tolist(),
        norm_sq.sqrt().tolist(),
        better.tolist(),
        strict=True,
    ):
        if not ok:
            reasons.append("non_finite")
        elif dn > cfg.max_delta_norm:
            reasons.append("norm_jump")
        elif n > cfg.max_adapter_norm:
            reasons.append("norm_bound")
        elif not good:
            reasons.append("not_better")
        else:
            reasons.append("accepted")
    return reasons
