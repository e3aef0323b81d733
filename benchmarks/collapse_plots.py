"""Plots of the collapse benchmark (``benchmarks/collapse.py``), written as PNG files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

PANELS = (
    ("nmi", "NMI with true modes ↑"),
    ("dominant", "dominant share ↓"),
    ("cosine", "mean sub-prompt cosine"),
    ("accuracy", "held-out accuracy ↑"),
)
CURVE_PANELS = (
    ("dominant", "dominant share"),
    ("nmi", "NMI with true modes"),
    ("cosine", "mean sub-prompt cosine"),
    ("image_cos", "image to best sub-prompt cosine"),
)
CURVE_CONFIGS = (
    "before (design note)",
    "design-note fix",
    "entropy marginal",
    "assignment sinkhorn",
    "recommended",
)


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(figure)
    return path


def _limits(metric: str, values: Sequence[float]) -> tuple[float, float]:
    """``(0, 1)``, except accuracy, which starts just below its smallest value to show gaps."""
    if metric != "accuracy":
        return 0.0, 1.0
    return max(0.0, np.floor(10 * min(values) - 0.5) / 10), 1.0


def plot_metrics(out: Path, main: dict[str, list[tuple[Any, dict]]], balanced: float) -> Path:
    """Grouped bars: each configuration, both parameterisations, mean ± std over seeds."""
    names = [config.name for config, _ in next(iter(main.values()))]
    figure, axes = plt.subplots(1, len(PANELS), figsize=(15, 4.6), sharey=True)
    positions = np.arange(len(names))
    height = 0.8 / len(main)
    for axis, (metric, title) in zip(axes, PANELS, strict=True):
        for index, (parameterisation, rows) in enumerate(main.items()):
            means = [stats[metric][0] for _, stats in rows]
            stds = [stats[metric][1] for _, stats in rows]
            axis.barh(
                positions + (index - (len(main) - 1) / 2) * height,
                means,
                height,
                xerr=stds,
                label=parameterisation,
                capsize=2,
            )
        if metric == "dominant":
            axis.axvline(balanced, color="grey", linestyle=":", label="balanced (1/K)")
        axis.set_title(title)
        axis.set_xlim(*_limits(metric, [s[metric][0] for rows in main.values() for _, s in rows]))
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(positions, names)
    axes[0].invert_yaxis()
    axes[1].legend(loc="lower right", fontsize=8)
    return _save(figure, out / "metrics.png")


def plot_training(out: Path, curves: dict[str, list[list[tuple[int, dict]]]]) -> Path:
    """Dominant share, NMI, sub-prompt and image cosines while training (free, mean of seeds)."""
    figure, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(17, 3.8))
    for name in CURVE_CONFIGS:
        if name not in curves:
            continue
        runs = curves[name]
        steps = [step for step, _ in runs[0]]
        for axis, (metric, _) in zip(axes, CURVE_PANELS, strict=True):
            values = np.mean([[m[metric] for _, m in run] for run in runs], axis=0)
            axis.plot(steps, values, label=name)
    for axis, (_, title) in zip(axes, CURVE_PANELS, strict=True):
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(figure, out / "training.png")


def plot_usage(
    out: Path, assignments: dict[str, tuple[Any, Any]], n_subprompts: int, n_modes: int
) -> Path:
    """Which sub-prompt claims the held-out images of each true mode, for three classes."""
    names = [
        n for n in ("before (design note)", "design-note fix", "recommended") if n in assignments
    ]
    classes = (0, 1, 2)
    figure, axes = plt.subplots(
        len(names), len(classes), figsize=(2.6 * len(classes), 2.4 * len(names)), squeeze=False
    )
    for row, name in enumerate(names):
        assigned, test = assignments[name]
        for column, label in enumerate(classes):
            mask = test.labels == label
            counts = np.zeros((n_modes, n_subprompts))
            np.add.at(counts, (test.modes[mask].numpy(), assigned[mask].numpy()), 1)
            axis = axes[row, column]
            axis.imshow(counts, cmap="Blues", vmin=0)
            axis.set_xticks(range(n_subprompts))
            axis.set_yticks(range(n_modes))
            if row == len(names) - 1:
                axis.set_xlabel("sub-prompt")
            if column == 0:
                axis.set_ylabel(f"{name}\ntrue mode", fontsize=8)
            if row == 0:
                axis.set_title(f"class {label}")
    return _save(figure, out / "usage.png")


def plot_sweep(out: Path, sweep: Sequence[tuple[Any, dict]]) -> Path:
    """NMI, dominant share and accuracy of every sweep configuration."""
    names = [config.name for config, _ in sweep]
    positions = np.arange(len(names))
    figure, axes = plt.subplots(1, 3, figsize=(13, 0.32 * len(names) + 1.5), sharey=True)
    for axis, (metric, title) in zip(axes, (PANELS[0], PANELS[1], PANELS[3]), strict=True):
        means = [stats[metric][0] for _, stats in sweep]
        stds = [stats[metric][1] for _, stats in sweep]
        axis.barh(positions, means, xerr=stds, capsize=2, color="tab:green")
        axis.set_title(title)
        axis.set_xlim(*_limits(metric, means))
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(positions, names)
    axes[0].invert_yaxis()
    return _save(figure, out / "sweep.png")


def plot_all(
    out: Path,
    size: Any,
    main: dict[str, list[tuple[Any, dict]]],
    curves: dict[str, list[list[tuple[int, dict]]]],
    assignments: dict[str, tuple[Any, Any]],
    sweep: Sequence[tuple[Any, dict]],
) -> list[Path]:
    paths = [
        plot_metrics(out, main, 1 / size.n_subprompts),
        plot_training(out, curves),
        plot_usage(out, assignments, size.n_subprompts, size.n_modes),
    ]
    if sweep:
        paths.append(plot_sweep(out, sweep))
    return paths
