"""Renders the Grafana dashboard's panels from a live Prometheus into one PNG (no Grafana needed).

Each panel's expressions run through Prometheus's HTTP API exactly as Grafana would send them (the
dashboard variables filled in), over the last `--minutes`, and are drawn at their grid positions: stat
panels as their last value, time-series panels as lines. It is how the README's picture was made:

    stream-adapt demo --seconds 120 --metrics-port 9464 &     # a member serving metrics
    prometheus --config.file=...                               # scraping 127.0.0.1:9464 every second
    python deploy/grafana/render_dashboard.py --prometheus http://127.0.0.1:9090 --out dashboard.png

Needs matplotlib (the `eval` extra).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parent / "dashboards" / "stream-adapt.json"
UNITS = {"s": "s", "ops": "/s", "percentunit": "", "bytes": "B", "short": ""}


def fill(expr: str, variables: dict[str, str]) -> str:
    for name, value in variables.items():
        expr = expr.replace(f"${name}", value)
    return expr


def legend(template: str, labels: dict[str, str]) -> str:
    if template in ("", "__auto"):
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def api(base: str, path: str, **params: Any) -> Any:
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        reply = json.loads(response.read())
    if reply["status"] != "success":
        raise RuntimeError(f"{path} {params}: {reply}")
    return reply["data"]


def fmt(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return "n/a"
    if unit == "percentunit":
        return f"{100 * value:.0f}%"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if abs(value) < 1 else f"{value:.1f} s"
    if abs(value) >= 10_000:
        return f"{value / 1000:.0f}k{UNITS.get(unit, '')}"
    return f"{value:.3g}{UNITS.get(unit, '')}"


def render(
    prometheus: str, out: Path, minutes: float, step: float, variables: dict[str, str], end: float | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    board = json.loads(DASHBOARD.read_text())
    panels = board["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels) + 1  # + a header line
    unit_w, unit_h = 0.75, 0.42
    fig = plt.figure(figsize=(24 * unit_w, rows * unit_h), facecolor="#111217")
    end = end or time.time()
    start = end - 60 * minutes
    # room inside each grid cell for the title (top) and the tick labels (left, bottom), in figure units
    pad_left, pad_bottom, pad_top = 0.5 / (24 * unit_w), 0.35 / (rows * unit_h), 0.3 / (rows * unit_h)
    for panel in panels:
        g = panel["gridPos"]
        # figure coordinates: x from the left, y from the bottom, with a small gutter
        x0, y0, w, h = g["x"] / 24, 1 - (g["y"] + 1 + g["h"]) / rows, g["w"] / 24, g["h"] / rows
        box = [x0 + pad_left, y0 + pad_bottom, w - pad_left - 0.004, h - pad_bottom - pad_top]
        if panel["type"] == "stat":
            box = [x0 + 0.003, y0 + 0.003, w - 0.006, h - pad_top - 0.003]
        if panel["type"] == "row":
            fig.text(x0 + 0.003, y0 + h / 3, panel["title"], color="#d8d9da", fontsize=13, weight="bold")
            continue
        ax = fig.add_axes(box, facecolor="#181b1f")
        ax.set_title(panel["title"], color="#d8d9da", fontsize=9, loc="left")
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        ax.tick_params(colors="#8e8e8e", labelsize=7)
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        if panel["type"] == "stat":
            _stat(ax, prometheus, panel, unit, variables, end)
        else:
            _timeseries(ax, prometheus, panel, unit, variables, start, end, step)
    fig.text(0.005, 0.998, f"{board['title']}: {time.strftime('%Y-%m-%d %H:%M', time.localtime(end))}, last "
             f"{minutes:g} min", color="#8e8e8e", fontsize=8, va="top")  # fmt: skip
    fig.savefig(out, dpi=80, facecolor=fig.get_facecolor())
    from PIL import Image  # comes with matplotlib

    with Image.open(out) as image:  # a 256-colour palette: a third of the bytes, no visible change
        image.convert("RGB").quantize(256).save(out, optimize=True)
    print(f"wrote {out}")


def _stat(ax: Any, prometheus: str, panel: dict[str, Any], unit: str, variables: dict[str, str], end: float) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    texts = []
    for target in panel["targets"]:
        data = api(prometheus, "query", query=fill(target["expr"], variables), time=end)
        values = [float(s["value"][1]) for s in data["result"]] if data["resultType"] == "vector" else []
        texts.append(fmt(values[0], unit) if values else "No data")
    ax.text(0.5, 0.42, " / ".join(texts), color="#73bf69", fontsize=20, ha="center", va="center", weight="bold")


def _timeseries(
    ax: Any,
    prometheus: str,
    panel: dict[str, Any],
    unit: str,
    variables: dict[str, str],
    start: float,
    end: float,
    step: float,
) -> None:
    lines = 0
    for target in panel["targets"]:
        data = api(prometheus, "query_range", query=fill(target["expr"], variables), start=start, end=end, step=step)
        for series in data["result"]:
            xs = [(float(t) - end) / 60 for t, _ in series["values"]]
            ys = [float(v) for _, v in series["values"]]
            ys = [y * 100 if unit == "percentunit" else y for y in ys]
            ax.plot(xs, ys, linewidth=1.2, label=legend(target.get("legendFormat", ""), series["metric"]))
            lines += 1
    if not lines:
        ax.text(0.5, 0.5, "No data", color="#8e8e8e", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=6, loc="upper left", facecolor="#181b1f", labelcolor="#d8d9da", framealpha=0.6, ncol=3)
    ax.set_xlabel("minutes ago" if lines else "", color="#8e8e8e", fontsize=7)
    ax.set_ylabel({"percentunit": "%", "ops": "per s", "s": "s", "bytes": "bytes"}.get(unit, ""), color="#8e8e8e",
                  fontsize=7)  # fmt: skip
    ax.grid(color="#2c3235", linewidth=0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prometheus", default="http://127.0.0.1:9090")
    p.add_argument("--out", type=Path, default=Path("dashboard.png"))
    p.add_argument("--minutes", type=float, default=5.0, help="time range shown")
    p.add_argument("--step", type=float, default=2.0, help="seconds between points")
    p.add_argument("--rate-interval", default="30s", help="what $__rate_interval stands for")
    p.add_argument("--instance", default=".*", help="the $instance variable (a regex)")
    p.add_argument("--topic", default=".*", help="the $topic variable (a regex)")
    p.add_argument("--end", type=float, help="end of the range, epoch seconds (default: now)")
    args = p.parse_args()
    variables = {"instance": args.instance, "topic": args.topic, "__rate_interval": args.rate_interval}
    # "$__rate_interval" first: "$instance" is not a prefix of it, but be explicit about the order anyway
    variables = dict(sorted(variables.items(), key=lambda kv: -len(kv[0])))
    render(args.prometheus, args.out, args.minutes, args.step, variables, args.end)


if __name__ == "__main__":
    main()
