"""Plots of the benchmark suite (`benchmarks/suite.py`), written as PNG files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

Stats = dict[str, tuple[float, float]]
PANELS = (("accuracy", "held-out accuracy ↑"), ("nmi", "NMI with the true looks ↑"))


def contenders_by_world(
    path: Path,
    results: dict[tuple[str, str, str], Stats],
    worlds: Sequence[str],
    learner: str,
    contenders: Sequence[str],
    title: str,
) -> Path:
    """Grouped bars: one group per world, one bar per contender, accuracy and NMI panels."""
    figure, axes = plt.subplots(len(PANELS), 1, figsize=(12, 6.5), sharex=True)
    width = 0.8 / len(contenders)
    positions = np.arange(len(worlds))
    colours = plt.get_cmap("tab10")
    for axis, (metric, label) in zip(axes, PANELS, strict=True):
        lowest = 1.0
        for index, name in enumerate(contenders):
            means, stds = [], []
            for world in worlds:
                mean, std = results.get((world, learner, name), {}).get(metric, (np.nan, 0.0))
                means.append(mean)
                stds.append(std)
            if np.all(np.isnan(means)):
                continue
            lowest = min(lowest, np.nanmin(means))
            axis.bar(
                positions + (index - (len(contenders) - 1) / 2) * width,
                means,
                width,
                yerr=stds,
                label=name,
                color=colours(index),
                capsize=2,
            )
        axis.set_ylabel(label)
        axis.set_ylim(max(0.0, np.floor(10 * lowest - 0.5) / 10) if metric == "accuracy" else 0, 1)
        axis.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(positions, worlds, rotation=15)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, ncol=len(labels), fontsize=8, loc="upper center")
    figure.suptitle(title, y=0.94)
    figure.tight_layout(rect=(0, 0, 1, 0.92))
    figure.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(figure)
    return path


def levers(
    path: Path, rows: Sequence[tuple[str, str, Stats]], worlds: Sequence[str], title: str
) -> Path:
    """Horizontal bars of accuracy per lever recipe, one panel per world."""
    figure, axes = plt.subplots(
        1, len(worlds), figsize=(6 * len(worlds), 0.35 * len(rows) / len(worlds) + 1.5)
    )
    axes = np.atleast_1d(axes)
    for axis, world in zip(axes, worlds, strict=True):
        entries = [(name, stats) for w, name, stats in rows if w == world]
        names = [name for name, _ in entries]
        means = [100 * stats["accuracy"][0] for _, stats in entries]
        axis.barh(np.arange(len(entries)), means, color="tab:blue")
        axis.set_yticks(np.arange(len(entries)), names, fontsize=8)
        axis.invert_yaxis()
        axis.set_xlim(max(0.0, min(means) - 3), 100)
        axis.set_xlabel("held-out accuracy %")
        axis.set_title(world)
        axis.grid(axis="x", alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(figure)
    return path
