#!/usr/bin/env python3
"""Plots of a bench/compare.py run (matplotlib, Agg): run in bench/.venv-peers.

    bench/.venv-peers/bin/python bench/peers/plot.py results.json docs/img

Writes comparison-latency.png (p50 and p99 against the publish rate, one line per system)
and comparison-summary.png (RSS per connection, connections/s, deliveries/s, heartbeat CPU).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ORDER = ["gateway", "gateway-w2", "nchan-memory", "nchan-redis", "starlette"]
COLORS = {
    "gateway": "#1f77b4",
    "gateway-w2": "#17becf",
    "nchan-memory": "#2ca02c",
    "nchan-redis": "#98df8a",
    "starlette": "#d62728",
}


def _ok(v: Any) -> bool:
    return isinstance(v, int | float) and not math.isnan(v) and v > 0


def latency_plot(res: dict[str, Any], out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=100, sharey=True)
    for ax, key, title in ((axes[0], "p50", "p50"), (axes[1], "p99", "p99")):
        for name in ORDER:
            r = res["systems"].get(name)
            if not r:
                continue
            pts = [
                (lr["target_rate"], lr["latency_ms"].get(key))
                for lr in r.get("latency", [])
                if "latency_ms" in lr and _ok(lr["latency_ms"].get(key))
            ]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            color = COLORS.get(name)
            ax.plot(xs, ys, marker="o", label=r.get("label", name), color=color)
            sat = (r.get("flood") or {}).get("delivered_per_s") or 0
            over = [(x, y) for x, y in pts if sat and x > sat]
            if over:  # past the system's saturation rate: hollow markers
                ox, oy = zip(*over, strict=True)
                ax.plot(ox, oy, "o", markersize=10, markerfacecolor="none", color=color)
        ax.set_xscale("log")
        ax.set_yscale("log")
        rates = res.get("rates") or []
        if rates:
            ax.set_xticks(rates, [f"{r / 1000:g}k" for r in rates])
            ax.minorticks_off()
        ax.set_xlabel("publish rate (events/s, random players); ring: past saturation")
        ax.set_title(f"{title} publish→receive")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms")
    axes[1].legend(fontsize=8)
    n = res.get("connections", 0)
    fig.suptitle(f"Latency against rate, {n:,} connections, server on one core", fontsize=11)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def summary_plot(res: dict[str, Any], out: Path) -> None:
    systems = [k for k in ORDER if k in res["systems"]]
    labels = [res["systems"][k].get("label", k).replace(" --workers ", " -w") for k in systems]
    colors = [COLORS.get(k, "#777777") for k in systems]

    def get(path: list[str], scale: float = 1.0) -> list[float]:
        vals = []
        for k in systems:
            v: Any = res["systems"][k]
            for p in path:
                v = v.get(p, {}) if isinstance(v, dict) else {}
            vals.append(v * scale if _ok(v) else 0.0)
        return vals

    n = res.get("connections", 0)
    panels = [
        (f"RSS per idle connection at {n:,} (KiB)", get(["rss_n", "per_conn_bytes"], 1 / 1024)),
        ("connect storm (connections/s)", get(["connect", "rate_per_s"])),
        ("saturation (deliveries/s received)", get(["flood", "delivered_per_s"])),
        ("server CPU, idle, 1 s keep-alive (%)", get(["idle1", "cpu", "gateway"])),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), dpi=100)
    for ax, (title, vals) in zip(axes.flat, panels, strict=True):
        bars = ax.bar(range(len(vals)), vals, color=colors)
        ax.set_xticks(range(len(vals)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        for b, v in zip(bars, vals, strict=True):
            if v:
                text = f"{v:,.0f}" if v >= 100 else f"{v:.2f}" if v < 10 else f"{v:.1f}"
                ax.annotate(
                    text,
                    (b.get_x() + b.get_width() / 2, v),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
    fig.suptitle("sse-gateway, nchan and sse-starlette: one run, server on one core", fontsize=11)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    res = json.loads(Path(argv[1]).read_text())
    out = Path(argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for name, fn in (
        ("comparison-latency.png", latency_plot),
        ("comparison-summary.png", summary_plot),
    ):
        path = out / name
        fn(res, path)
        print(f"plot: {path} ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
