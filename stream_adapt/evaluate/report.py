"""The evaluation report: `report.json` (every number), `report.md` (mean ± std over seeds) and PNG plots.

Plots need matplotlib, an optional dependency (`pip install 'stream-adapt[eval]'`): without it the
JSON and Markdown are still written and the report says why there are no plots, so an evaluation on
a minimal install never fails at the very end.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Report names of the methods, in the order tables and plots show them.
METHOD_LABELS: dict[str, str] = {
    "global_mean": "global mean",
    "item_bias": "item bias",
    "user_item_bias": "user + item bias (shrunk)",
    "river_biasedmf": "River BiasedMF",
    "river_biasedmf_full_stream": "River BiasedMF, whole stream from zero (reproduction)",
    "no_adaptation": "base model, no adaptation",
    "stream_adapt_ungated": "stream-adapt, gate off",
    "stream_adapt": "stream-adapt (gated)",
}
BASELINE_METHODS = ("global_mean", "item_bias", "user_item_bias", "river_biasedmf", "no_adaptation")
JSON_FILE = "report.json"
MD_FILE = "report.md"


@dataclass(frozen=True)
class ResultRow:
    """One method on one query set with one seed."""

    method: str
    shots: int | None  # K of the cold-start protocol; None where the support is not a fixed K
    seed: int
    mae: float
    rmse: float
    ndcg3: float | None


@dataclass
class Evaluation:
    """Everything one `stream-adapt evaluate` run measured."""

    protocol: str
    results: list[ResultRow]
    config: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    series: dict[str, Any] | None = None  # prequential: error over time, drift detections
    notes: list[str] = field(default_factory=list)
    runtime_s: float = 0.0


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: Sequence[ResultRow]) -> list[dict[str, Any]]:
    """Mean and std over seeds per (method, shots), in table order."""
    groups: dict[tuple[str, int | None], list[ResultRow]] = {}
    for r in rows:
        groups.setdefault((r.method, r.shots), []).append(r)
    order = list(METHOD_LABELS)
    out = []
    for (method, shots), rs in sorted(
        groups.items(),
        key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else len(order), kv[0][1] or 0),
    ):
        entry: dict[str, Any] = {"method": method, "shots": shots, "seeds": sorted(r.seed for r in rs)}
        for metric in ("mae", "rmse", "ndcg3"):
            vals = [v for r in rs if (v := getattr(r, metric)) is not None and math.isfinite(v)]
            mean, std = _mean_std(vals) if vals else (None, None)
            entry[metric] = mean
            entry[f"{metric}_std"] = std
        out.append(entry)
    return out


def to_json(ev: Evaluation) -> dict[str, Any]:
    return {
        "protocol": ev.protocol,
        "results": [asdict(r) for r in ev.results],
        "summary": summarize(ev.results),
        "checks": ev.checks,
        "config": ev.config,
        "details": ev.details,
        "series": ev.series,
        "notes": ev.notes,
        "runtime_s": round(ev.runtime_s, 1),
    }


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.4f} ± {std or 0.0:.4f}"


def render_markdown(ev: Evaluation, plots: Sequence[str] = ()) -> str:
    """The human report: one table per protocol (cold-start: one column per K), the goal checks, notes."""
    summary = summarize(ev.results)
    seeds = sorted({r.seed for r in ev.results})
    lines = [f"# stream-adapt evaluate: {ev.protocol}", ""]
    lines.append(f"Seeds {', '.join(map(str, seeds))}; mean ± std over seeds. Runtime {ev.runtime_s:.0f} s.")
    lines.append("")
    shots = sorted({s["shots"] for s in summary if s["shots"] is not None})
    if shots:
        for metric, title in (("mae", "MAE (per user, then mean)"), ("rmse", "RMSE"), ("ndcg3", "nDCG@3")):
            lines += [f"### {title} by support shots K", ""]
            lines.append("| method | " + " | ".join(f"K={k}" for k in shots) + " |")
            lines.append("|---|" + "---|" * len(shots))
            for method in dict.fromkeys(s["method"] for s in summary):
                cells = []
                for k in shots:
                    s = next((x for x in summary if x["method"] == method and x["shots"] == k), None)
                    cells.append(_fmt(s[metric], s[f"{metric}_std"]) if s else "")
                lines.append(f"| {METHOD_LABELS.get(method, method)} | " + " | ".join(cells) + " |")
            lines.append("")
    else:
        mae_title = "MAE (per event)" if ev.protocol == "prequential" else "MAE (per user, then mean)"
        lines += [f"| method | {mae_title} | RMSE | nDCG@3 |", "|---|---|---|---|"]
        for s in summary:
            label = METHOD_LABELS.get(s["method"], s["method"])
            cells = [_fmt(s["mae"], s["mae_std"]), _fmt(s["rmse"], s["rmse_std"]), _fmt(s["ndcg3"], s["ndcg3_std"])]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    gate = ev.details.get("gate")
    if gate:
        lines += [
            "### What the gate did (gated runs, all seeds together)",
            "",
            "| K | window (shots / gate query) | windows accepted | rolled back | too short | users adapted |",
            "|---|---|---|---|---|---|",
        ]
        for k in dict.fromkeys(g["shots"] for g in gate):
            gs = [g for g in gate if g["shots"] == k]
            w = gs[0]["window"]
            cells = [sum(g[c] for g in gs) for c in ("accepted", "rolled_back", "expired", "users_adapted")]
            label = "all but the query" if k is None else str(k)
            lines.append(f"| {label} | {w['shots']} / {w['query_shots']} | " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    if ev.checks:
        lines += ["## Goals", ""]
        for c in ev.checks:
            mark = "met" if c["passed"] else "NOT met"
            lines.append(f"- **{mark}**: {c['goal']} ({c['detail']})")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    if ev.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in ev.notes] + [""]
    return "\n".join(lines)


def write_report(ev: Evaluation, directory: str | Path, plots_wanted: bool = True) -> list[Path]:
    """Write report.json, the plots (if wanted and matplotlib is there) and report.md; return the paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    plots: list[Path] = []
    if not plots_wanted:
        pass
    elif importlib.util.find_spec("matplotlib") is None:
        ev.notes.append("matplotlib is not installed (pip install 'stream-adapt[eval]'): no PNG plots written.")
    else:
        plots = write_plots(ev, out)
    (out / JSON_FILE).write_text(json.dumps(to_json(ev), indent=2, allow_nan=False) + "\n")
    (out / MD_FILE).write_text(render_markdown(ev, [p.name for p in plots]))
    return [out / JSON_FILE, out / MD_FILE, *plots]


def write_plots(ev: Evaluation, out: Path) -> list[Path]:
    """The protocol's plots as PNG files in `out` (matplotlib with the non-interactive Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(ev.results)
    methods = [m for m in dict.fromkeys(s["method"] for s in summary)]
    written: list[Path] = []
    if any(s["shots"] is not None for s in summary):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        # A method far above all others (the global mean) would flatten every other curve: leave it out, say so.
        worst = {m: max(s["mae"] for s in summary if s["method"] == m) for m in methods}
        best = {m: min(s["mae"] for s in summary if s["method"] == m) for m in methods}
        off = [m for m in methods if len(methods) > 2 and best[m] > 1.05 * max(w for k, w in worst.items() if k != m)]
        for method in (m for m in methods if m not in off):
            pts = sorted((s["shots"], s["mae"], s["mae_std"]) for s in summary if s["method"] == method)
            ax.errorbar(
                [p[0] for p in pts],
                [p[1] for p in pts],
                yerr=[p[2] for p in pts],
                marker="o",
                capsize=3,
                label=METHOD_LABELS.get(method, method),
                linewidth=2.5 if method == "stream_adapt" else 1.2,
            )
        ax.set_xlabel("support shots K per cold user")
        ax.set_ylabel("MAE on the query ratings (per user, then mean)")
        ax.set_title(f"{ev.protocol}: error vs shots (mean ± std over seeds)")
        if off:
            left_out = ", ".join(f"{METHOD_LABELS.get(m, m)} ({best[m]:.3f})" for m in off)
            ax.text(0.01, 0.01, f"off the scale: {left_out}", transform=ax.transAxes, fontsize=8, alpha=0.7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = out / "error_vs_shots.png"
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    elif ev.protocol != "prequential":
        fig, ax = plt.subplots(figsize=(7, 4))
        labels = [METHOD_LABELS.get(s["method"], s["method"]) for s in summary]
        colors = ["tab:orange" if s["method"].startswith("stream_adapt") else "tab:blue" for s in summary]
        ax.barh(labels, [s["mae"] for s in summary], xerr=[s["mae_std"] for s in summary], capsize=3, color=colors)
        lo = min(s["mae"] for s in summary)
        ax.set_xlim(lo * 0.9, max(s["mae"] for s in summary) * 1.02)
        ax.invert_yaxis()
        ax.set_xlabel("MAE on the query ratings (per user, then mean; mean ± std over seeds)")
        ax.set_title(f"{ev.protocol}: MAE by method")
        ax.grid(axis="x", alpha=0.3)
        path = out / "mae_by_method.png"
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    if ev.series:
        written.append(_plot_series(ev.series, out, plt))
    return written


def _plot_series(series: dict[str, Any], out: Path, plt: Any) -> Path:
    """Prequential MAE per batch of the stream, with the drift detections of the gated run marked."""
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    x = series["events"]
    for method, ys in series["mae"].items():
        ax.plot(x, ys, label=METHOD_LABELS.get(method, method), linewidth=2.0 if method == "stream_adapt" else 1.0)
    for i, gx in enumerate(series["global_drifts"]):
        ax.axvline(gx, color="red", alpha=0.4, linestyle="--", label="global drift detected" if i == 0 else None)
    ax.set_ylabel(f"MAE per {series['bin_events']} events")
    ax.set_title(f"prequential error over the stream (seed {series['seed']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax2.bar(x, series["entity_drifts"], width=series["bin_events"] * 0.8, color="gray")
    ax2.set_ylabel("user drifts")
    ax2.set_xlabel("events of the stream (after the pretraining part)")
    ax2.grid(alpha=0.3)
    path = out / "prequential_over_time.png"
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
