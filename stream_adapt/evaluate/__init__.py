"""Offline evaluation of stream-adapt against baselines on the same splits (`stream-adapt evaluate`).

- `protocols`: prequential, cold-start and MeLU splits of an event log (seeded, disjoint);
- `baselines`: global mean, item bias, user + item bias, River `BiasedMF`;
- `metrics`: per-user MAE, RMSE, nDCG@3;
- `harness`: runs each protocol through the production pipeline (file source, `Runner`, `Pipeline`);
- `report`: report.json, report.md and PNG plots.

The learning core is used only through its public API (`pretrain`, `Pipeline`, `AdaptableModel`), so
a change of pretraining or model internals is evaluated by re-running the same command.
"""

from stream_adapt.evaluate.harness import PROTOCOLS, EvalSettings, evaluate
from stream_adapt.evaluate.report import Evaluation, ResultRow, write_report

__all__ = ["PROTOCOLS", "EvalSettings", "Evaluation", "ResultRow", "evaluate", "write_report"]
