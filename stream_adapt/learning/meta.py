"""Meta-learn where a new entity starts and how far each step moves it (MAML on the adapter alone).

After the base is pretrained and frozen, each training user with enough history becomes a task: its
first T windows of K events, in time order, replayed exactly as the service would: every event of a
window is first scored with the adapter learned so far (test-then-train), then the window's support
shots move the adapter by the same S SGD steps the pipeline runs. The task's loss is the mean of those
prequential errors, i.e. the service's own objective, and it is minimised with respect to the shared
cold-start adapter theta0 and the per-tensor step sizes, vectorised over B tasks. Only the small
adapter moves (an embedding and a bias), so the meta-gradient is exact through all T x S unrolled steps
(`create_graph=True`); first-order approximations (Reptile, FOMAML) are for large adapters.

(A one-window objective, tried first, learned step sizes 3x larger that lowered its own loss and made
the stream worse: in service a user is adapted window after window, so each step must be smaller.)

The result: theta0 is written into the entity tables' cold-start row (index 0) and the learned step
sizes into the model's config (`extra["adapt"]`), which the pipeline uses unless `pipeline.adapt.lr` is
set (cf. MeLU, KDD 2019; MAMO).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from stream_adapt.events import FeedbackEvent
from stream_adapt.learning.adapt import masked_mean
from stream_adapt.learning.models import NeuralRecommender


@dataclass(frozen=True)
class MetaConfig:
    shots: int = 8  # K: support (K - Q) + query (Q) per task, as a window in service
    query_shots: int = 2
    steps: int = 5  # inner SGD steps: the pipeline's adapt.steps
    l2: float = 0.01  # the pipeline's pull toward the starting adapter
    windows: int = 4  # T: consecutive windows per task (users with fewer are not tasks)
    meta_batch: int = 256
    iterations: int = 300
    meta_lr: float = 0.01
    init_lr: float = 0.02  # starting inner step size (the hand-tuned default)
    init_lr_scale: dict[str, float] = field(default_factory=lambda: {"bias": 3.0})
    seed: int = 0


@dataclass
class MetaReport:
    tasks: int
    iterations: int
    mse_before: float  # prequential, over all tasks: hand-tuned init and steps
    mse_after: float  # learned init and steps
    lr: float
    lr_scale: dict[str, float]
    seconds: float


def _tasks(
    model: NeuralRecommender, events: Sequence[FeedbackEvent], cfg: MetaConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(counterpart idx [N, T, K], values [N, T, K]): each entity's first T windows in time order."""
    by_entity: dict[str, list[FeedbackEvent]] = defaultdict(list)
    for e in sorted(events, key=lambda e: e.timestamp):
        by_entity[e.user_id if model.entity_kind == "user" else e.item_id].append(e)
    n = cfg.windows * cfg.shots
    idx, ys = [], []
    for evs in by_entity.values():
        if len(evs) < n:
            continue
        first = evs[:n]
        cps = [e.item_id if model.entity_kind == "user" else e.user_id for e in first]
        idx.append(model.counterpart_index(cps).view(cfg.windows, cfg.shots))
        ys.append(torch.tensor([e.value for e in first]).view(cfg.windows, cfg.shots))
    if not idx:
        raise ValueError(f"no entity has {n} events ({cfg.windows} windows of {cfg.shots}): cannot meta-learn")
    return torch.stack(idx), torch.stack(ys)


def _prequential_loss(
    model: NeuralRecommender,
    theta0: dict[str, torch.Tensor],
    log_lr: dict[str, torch.Tensor],
    batch: tuple[torch.Tensor, torch.Tensor],
    cfg: MetaConfig,
    create_graph: bool,
) -> torch.Tensor:
    """Mean squared prequential error of B tasks replayed window by window from theta0."""
    idx, ys = batch
    b = len(idx)
    shared = model.global_adapter()
    n_s = cfg.shots - cfg.query_shots
    theta = {k: v.expand(b, *v.shape) for k, v in theta0.items()}
    total = torch.zeros(())
    for t in range(cfg.windows):
        w_idx, w_y = idx[:, t], ys[:, t]
        total = total + ((model.predict(theta, w_idx, shared) - w_y) ** 2).mean()  # scored before learning
        start = theta
        ones = torch.ones(b, n_s)
        for _ in range(cfg.steps):
            losses = masked_mean((model.predict(theta, w_idx[:, :n_s], shared) - w_y[:, :n_s]) ** 2, ones)
            if cfg.l2:
                for k, v in theta.items():
                    losses = losses + cfg.l2 * (v - start[k]).pow(2).flatten(1).sum(1)
            names = list(theta)
            grads = torch.autograd.grad(losses.sum(), [theta[k] for k in names], create_graph=create_graph)
            theta = {k: theta[k] - log_lr[k].exp() * g for k, g in zip(names, grads, strict=True)}
    return total / cfg.windows


def meta_learn_init(
    model: NeuralRecommender,
    events: Sequence[FeedbackEvent],
    cfg: MetaConfig = MetaConfig(),
    progress: Callable[[str], None] | None = None,
) -> MetaReport:
    """Learn the cold-start adapter and per-tensor step sizes; write them into `model` (frozen base)."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    tasks = _tasks(model, events, cfg)
    n_tasks = len(tasks[0])
    init = model.initial_adapter(torch.zeros(1, dtype=torch.long))
    theta0 = {k: v[0].clone().requires_grad_(True) for k, v in init.items() if k in ("emb", "bias")}
    log_lr = {
        k: torch.tensor(math.log(cfg.init_lr * cfg.init_lr_scale.get(k, 1.0)), requires_grad=True) for k in theta0
    }

    def evaluate() -> float:
        total = 0.0
        for s in range(0, n_tasks, 4096):
            chunk = (tasks[0][s : s + 4096], tasks[1][s : s + 4096])
            with torch.enable_grad():
                loss = _prequential_loss(model, theta0, log_lr, chunk, cfg, create_graph=False)
            total += float(loss.detach()) * len(chunk[0])
        return total / n_tasks

    before = evaluate()
    opt = torch.optim.Adam([*theta0.values(), *log_lr.values()], lr=cfg.meta_lr)
    for it in range(1, cfg.iterations + 1):
        pick = torch.randint(0, n_tasks, (min(cfg.meta_batch, n_tasks),), generator=gen)
        loss = _prequential_loss(model, theta0, log_lr, (tasks[0][pick], tasks[1][pick]), cfg, create_graph=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress and (it % 50 == 0 or it == cfg.iterations):
            lrs = ", ".join(f"{k} {v.exp().item():.4f}" for k, v in log_lr.items())
            progress(f"meta {it:>4}/{cfg.iterations}  prequential mse {loss.item():.4f}  step sizes {lrs}")
    after = evaluate()
    emb, bias = model._entity_tables()
    with torch.no_grad():
        emb.weight[0] = theta0["emb"].detach()
        bias.weight[0] = theta0["bias"].detach()
    base_lr = log_lr["emb"].exp().item() if "emb" in log_lr else cfg.init_lr
    scale = {k: v.exp().item() / base_lr for k, v in log_lr.items() if k != "emb"}
    model.config.extra["adapt"] = {"lr": base_lr, "lr_scale": scale, "steps": cfg.steps, "shots": cfg.shots}
    return MetaReport(n_tasks, cfg.iterations, before, after, base_lr, scale, time.perf_counter() - t0)
