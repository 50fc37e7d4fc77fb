"""Batched few-shot adaptation vs the per-entity loop: windows adapted per second.

Both adapt the same windows of the same model with the same settings (K shots, S steps) and must give
the same adapters (max_abs_diff). The loop is what a straightforward implementation does: one
torch.optim optimiser per entity. Prints JSON: batched_windows_per_s, loop_windows_per_s, speedup.

    python benchmarks/bench_adapt.py --json bench-adapt.json [--windows 256] [--shots 8] [--steps 5]
"""

from __future__ import annotations

import torch
from _common import emit, interleaved, median, parser

from stream_adapt import runtime
from stream_adapt.config import AdaptConfig
from stream_adapt.learning.adapt import WindowBatch, adapt_batched, adapt_loop, pad_batch
from stream_adapt.learning.models import NeuralRecommender, RecommenderConfig, freeze


def make_batch(model: NeuralRecommender, windows: int, shots: int, query: int, n_items: int, seed: int) -> WindowBatch:
    g = torch.Generator().manual_seed(seed)
    entity_idx = torch.randint(0, model.config.n_users + 1, (windows,), generator=g)
    support = [
        (
            torch.randint(1, n_items + 1, (shots - query,), generator=g).tolist(),
            (1 + 4 * torch.rand(shots - query, generator=g)).tolist(),
        )
        for _ in range(windows)
    ]
    queries = [
        (
            torch.randint(1, n_items + 1, (query,), generator=g).tolist(),
            (1 + 4 * torch.rand(query, generator=g)).tolist(),
        )
        for _ in range(windows)
    ]
    return pad_batch(model.initial_adapter(entity_idx), support, queries, model.global_adapter())


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--windows", type=int, default=256)
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--query-shots", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--items", type=int, default=5_000)
    p.add_argument("--threads", type=int, default=1, help="torch threads for both contenders")
    args = p.parse_args()

    runtime.tune(args.threads)
    torch.manual_seed(0)
    cfg = RecommenderConfig(
        n_users=args.users, n_items=args.items, dim=args.dim, hidden=args.hidden, lora_rank=args.lora_rank
    )
    model = NeuralRecommender(cfg, [f"u{i}" for i in range(args.users)], [f"i{i}" for i in range(args.items)])
    freeze(model)
    batch = make_batch(model, args.windows, args.shots, args.query_shots, args.items, seed=1)
    acfg = AdaptConfig(steps=args.steps, optimizer=args.optimizer, lr=0.02, l2=0.01)

    a, b = adapt_batched(model, batch, acfg), adapt_loop(model, batch, acfg)
    max_diff = max(float((a.adapter[k] - b.adapter[k]).abs().max()) for k in a.adapter)

    def batched() -> int:
        adapt_batched(model, batch, acfg)
        return len(batch)

    def loop() -> int:
        adapt_loop(model, batch, acfg)
        return len(batch)

    rates = interleaved({"batched": batched, "loop": loop}, args.repeats)
    b_rate, l_rate = median(rates["batched"]), median(rates["loop"])
    emit(
        {
            "benchmark": "bench_adapt",
            "windows": args.windows,
            "shots": args.shots,
            "query_shots": args.query_shots,
            "steps": args.steps,
            "optimizer": args.optimizer,
            "dim": args.dim,
            "hidden": args.hidden,
            "lora_rank": args.lora_rank,
            "torch_threads": torch.get_num_threads(),
            "batched_windows_per_s": round(b_rate, 1),
            "loop_windows_per_s": round(l_rate, 1),
            "speedup": round(b_rate / l_rate, 1),
            "max_abs_diff": max_diff,
            "rates": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        },
        args.json,
    )


if __name__ == "__main__":
    main()
