"""PNG figures for the result files (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def label_bar(ax: Any, bar: Any, text: str, fontsize: int = 8) -> None:
    """`text` centred above `bar`."""
    ax.annotate(
        text,
        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
        ha="center",
        va="bottom",
        fontsize=fontsize,
    )


def runtime_bars(rows: Sequence[Mapping[str, Any]], runtimes: Sequence[str], title: str, path: Path) -> None:
    """Grouped bars: img/s of each runtime for each (model, batch), with the ratio to the first runtime."""
    groups = list(dict.fromkeys((row["model"], row["batch"]) for row in rows))
    value = {(row["model"], row["batch"], row["runtime"]): row for row in rows}
    width = 0.8 / len(runtimes)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 5))
    for index, runtime in enumerate(runtimes):
        cells = [value.get((model, batch, runtime)) for model, batch in groups]
        xs = [g + (index - (len(runtimes) - 1) / 2) * width for g in range(len(groups))]
        heights = [cell["img_per_s"] if cell else 0 for cell in cells]
        bars = ax.bar(xs, heights, width, label=runtime)
        for bar, cell in zip(bars, cells, strict=True):
            if cell:
                label_bar(ax, bar, f"{cell['speedup_vs_eager']:.2f}x", fontsize=7)
    labels = [f"{model.replace('_patch', chr(10) + 'patch', 1)}\nbatch {batch}" for model, batch in groups]
    ax.set_xticks(range(len(groups)), labels, fontsize=8)
    ax.set_ylabel("images / s")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def attention_lines(rows: Sequence[Mapping[str, Any]], title: str, path: Path) -> None:
    """Latency against input side (log scale) per (model, runtime), and measured seconds per GFLOP."""
    fig, (latency, efficiency) = plt.subplots(1, 2, figsize=(13, 5))
    series = list(dict.fromkeys((row["model"], row["runtime"]) for row in rows))
    colors = {model: f"C{i}" for i, model in enumerate(dict.fromkeys(model for model, _ in series))}
    for model, runtime in series:
        points = sorted(
            (r for r in rows if r["model"] == model and r["runtime"] == runtime), key=lambda r: r["size"]
        )
        style = "-o" if runtime == "onnxruntime" else "--s"
        sizes = [p["size"] for p in points]
        label = f"{model} ({runtime})"
        latency.plot(sizes, [p["ms_p50"] for p in points], style, color=colors[model], label=label)
        efficiency.plot(
            sizes, [p["seconds_per_gflop"] * 1e3 for p in points], style, color=colors[model], label=label
        )
    latency.set_yscale("log")
    latency.set_xlabel("input side (pixels)")
    latency.set_ylabel("ms per image (p50, batch 1)")
    efficiency.set_xlabel("input side (pixels)")
    efficiency.set_ylabel("measured ms per estimated GFLOP")
    for ax in (latency, efficiency):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def phase_bars(
    rows: Sequence[Mapping[str, Any]],
    phases: Sequence[str],
    title: str,
    path: Path,
    xlabel: str = "seconds from `make serve`",
    unit: str = "s",
) -> None:
    """One horizontal bar per row (`row["run"]`), split into its phases, with the total at its end."""
    fig, ax = plt.subplots(figsize=(9, 1.8 + 0.6 * len(rows)))
    for index, row in enumerate(rows):
        left = 0.0
        for color, phase in enumerate(phases):
            ax.barh(index, row[phase], left=left, color=f"C{color}", label=phase if index == 0 else None)
            left += row[phase]
        total = f"{left:.0f} {unit}" if left >= 10 else f"{left:.2f} {unit}"
        ax.annotate(total, (left, index), xytext=(4, 0), textcoords="offset points", va="center")
    ax.set_yticks(range(len(rows)), [row["run"] for row in rows])
    ax.set_xlim(0, max(sum(row[phase] for phase in phases) for row in rows) * 1.12)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=len(phases), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def paired_bars(
    labels: Sequence[str],
    groups: Sequence[Sequence[float]],
    names: Sequence[str],
    ylabel: str,
    title: str,
    path: Path,
) -> None:
    """One bar per name for each label (e.g. serving vs explanation), each later bar's ratio to the
    first above it."""
    xs = list(range(len(labels)))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(7, 0.55 * len(labels) * len(names)), 4))
    for i, name in enumerate(names):
        offset = (i - (len(names) - 1) / 2) * width
        bars = ax.bar([x + offset for x in xs], [group[i] for group in groups], width, label=name)
        if i == 0:
            continue
        for bar, group in zip(bars, groups, strict=True):
            label_bar(ax, bar, f"{group[i] / group[0]:.2f}x")
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def explain_bars(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Paired bars per entry: serving vs explanation milliseconds, the ratio above the explanation."""
    paired_bars(
        [f"{r['model'].split('_patch')[0]}\n{r['bucket']}" for r in rows],
        [(r["serve_ms_p50"], r["explain_ms_p50"]) for r in rows],
        ("serve (classify)", "explain"),
        "ms per image (p50, batch 1)",
        "ONNX Runtime: explanation vs serving, same entry",
        path,
    )
