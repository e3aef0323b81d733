"""The benchmark suite's report: the targets, the tables and the plots in `docs/suite/`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import suite
from fine_worlds import FineSpec
from suite_worlds import split_counts

Row = tuple[str, str, str, int, dict]
Stats = dict[str, tuple[float, float]]


def summarise(rows: Sequence[Row]) -> dict[tuple[str, str, str], Stats]:
    """Mean and standard deviation over seeds of every metric, per (world, learner, contender)."""
    grouped: dict[tuple[str, str, str], list[dict]] = {}
    for world, learner, name, _, metrics in rows:
        grouped.setdefault((world, learner, name), []).append(metrics)
    stats = {}
    for key, values in grouped.items():
        stats[key] = {}
        for metric in suite.METRICS:
            numbers = [v[metric] for v in values if not math.isnan(v[metric])]
            stats[key][metric] = (
                (float(np.mean(numbers)), float(np.std(numbers))) if numbers else (math.nan, 0.0)
            )
    return stats


def cell(stats: Stats | None, metric: str = "accuracy", spread: bool = True) -> str:
    if stats is None or math.isnan(stats[metric][0]):
        return "–"
    mean, std = stats[metric]
    if metric == "accuracy":
        return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if spread else "")
    return f"{mean:.2f}"


def looks_per_class(spec: FineSpec | object) -> tuple[int, int, int]:
    """(number of looks, K, training images of the rarest look where it is learned).

    Looks mostly common to all classes (`shared_looks >= 0.5`) are learned from every class's
    images at once, so their rarest look counts over all classes; others count in one class.
    """
    fewest = min(split_counts(spec.shots, spec.frequencies()))  # type: ignore[attr-defined]
    if getattr(spec, "shared_looks", 0.0) >= 0.5:
        fewest *= spec.num_classes  # type: ignore[attr-defined]
    return spec.n_looks, spec.n_subprompts, fewest  # type: ignore[attr-defined]


def targets(
    stats: Mapping[tuple[str, str, str], Stats], worlds: Sequence[str], specs: Mapping
) -> list[str]:
    """One line per world: the recipe against the best single-prompt reference, and its NMI."""
    lines = [
        "| world | recommended | best single prompt | gap | ≥ −0.5 | ≥ +1 (16+ shots) "
        "| NMI ≥ 0.85 |\n",
        "|---|---|---|---|---|---|---|\n",
    ]
    for world in worlds:
        recipe = stats.get((world, "offset", suite.RECIPE.name))
        if recipe is None:
            continue
        singles = [
            (name, stats[world, "offset", name]["accuracy"][0])
            for name in suite.SINGLE
            if (world, "offset", name) in stats
        ]
        best_name, best = max(singles, key=lambda item: item[1])
        gap = 100 * (recipe["accuracy"][0] - best)
        spec = specs[world]
        looks, k, fewest = looks_per_class(spec)
        first = "pass" if gap >= -0.5 else "FAIL"
        second = ("pass" if gap >= 1.0 else "FAIL") if spec.shots >= 16 else "n/a"
        nmi = recipe["nmi"][0]
        third = (
            ("pass" if nmi >= 0.85 else "FAIL") + f" ({nmi:.2f})"
            if k == looks and fewest >= 8
            else f"n/a ({nmi:.2f})"
        )
        lines.append(
            f"| {world} | {cell(recipe)} | {best_name} {100 * best:.1f} | {gap:+.1f} | "
            f"{first} | {second} | {third} |\n"
        )
    return lines


def results_table(
    stats: Mapping[tuple[str, str, str], Stats],
    worlds: Sequence[str],
    learner: str,
    contenders: Sequence[str],
) -> list[str]:
    present = [
        c
        for c in contenders
        if any((w, learner, c) in stats or (w, "offset", c) in stats for w in worlds)
    ]
    lines = [
        "| world | " + " | ".join(present) + " | NMI (recommended) |\n",
        "|---" * (len(present) + 2) + "|\n",
    ]
    for world in worlds:
        if not any((world, learner, c) in stats for c in present):
            continue
        cells = []
        for name in present:
            entry = stats.get((world, learner, name))
            if entry is None and learner != "offset" and name in (suite.ZERO_SHOT, suite.TRUE):
                entry = stats.get((world, "offset", name))
            cells.append(cell(entry))
        recipe = stats.get((world, learner, suite.RECIPE.name))
        lines.append(f"| {world} | " + " | ".join(cells) + f" | {cell(recipe, 'nmi')} |\n")
    return lines


def lever_table(stats: Mapping[tuple[str, str, str], Stats], worlds: Sequence[str]) -> list[str]:
    names = [c.name for c in suite.lever_contenders()]
    present = [w for w in worlds if (w, "lever", names[0]) in stats]
    if not present:
        return []
    lines = [
        "| lever (one change from the recommended recipe) | "
        + " | ".join(f"{w}: acc % (Δ)" for w in present)
        + " |\n",
        "|---" * (len(present) + 1) + "|\n",
        "| recommended | "
        + " | ".join(cell(stats[w, "offset", suite.RECIPE.name]) for w in present)
        + " |\n",
    ]
    for name in names:
        cells = []
        for world in present:
            entry = stats[world, "lever", name]
            delta = 100 * (
                entry["accuracy"][0] - stats[world, "offset", suite.RECIPE.name]["accuracy"][0]
            )
            cells.append(f"{cell(entry)} ({delta:+.1f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |\n")
    return lines


def save(figure: plt.Figure, path: Path) -> Path:
    """Write `figure` to `path` without a timestamp or software tag (stable bytes), close it."""
    figure.tight_layout()
    figure.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(figure)
    return path


def plot_shots(path: Path, stats: Mapping[tuple[str, str, str], Stats]) -> Path | None:
    """Accuracy against shots in the fine-grained world, one line per contender."""
    shots = [
        (1, "fine 1 shot"),
        (2, "fine 2 shots"),
        (4, "fine 4 shots"),
        (8, "fine 8 shots"),
        (16, "fine 16 shots"),
    ]
    shots = [(n, w) for n, w in shots if (w, "offset", suite.RECIPE.name) in stats]
    if len(shots) < 2:
        return None
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for index, name in enumerate(suite.CONTENDERS):
        means = [
            stats.get((w, "offset", name), {}).get("accuracy", (math.nan, 0))[0] for _, w in shots
        ]
        if all(math.isnan(m) for m in means):
            continue
        style = (
            dict(linewidth=3, color="black")
            if name == suite.RECIPE.name
            else dict(color=plt.get_cmap("tab10")(index))
        )
        axis.plot([n for n, _ in shots], [100 * m for m in means], marker="o", label=name, **style)
    axis.set_xscale("log", base=2)
    axis.set_xticks([n for n, _ in shots], [str(n) for n, _ in shots])
    axis.set_xlabel("shots per class")
    axis.set_ylabel("held-out accuracy %")
    axis.set_title("fine-grained world (128 classes, 4 shared looks), mean of 3 seeds")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    return save(figure, path)


def plot_levers(
    path: Path, stats: Mapping[tuple[str, str, str], Stats], worlds: Sequence[str]
) -> Path | None:
    """The change in accuracy of each lever against the recommended recipe, one marker per world."""
    names = [c.name for c in suite.lever_contenders()]
    present = [w for w in worlds if (w, "lever", names[0]) in stats]
    if not present:
        return None
    figure, axis = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
    markers = "osD^v"
    for index, world in enumerate(present):
        base = stats[world, "offset", suite.RECIPE.name]["accuracy"][0]
        deltas = [100 * (stats[world, "lever", n]["accuracy"][0] - base) for n in names]
        axis.scatter(
            deltas,
            np.arange(len(names)) + 0.12 * (index - len(present) / 2),
            marker=markers[index % 5],
            label=world,
            s=36,
        )
    axis.axvline(0, color="black", linewidth=1)
    axis.set_yticks(np.arange(len(names)), names)
    axis.invert_yaxis()
    axis.set_xlabel("accuracy change against the recommended recipe (points, symmetric log scale)")
    axis.set_xscale("symlog", linthresh=2)
    ticks = [-40, -20, -10, -5, -2, -1, 0, 1, 2]
    axis.set_xticks(ticks, [f"{t:+d}" if t else "0" for t in ticks])
    axis.grid(axis="x", alpha=0.3)
    axis.legend(fontsize=8, loc="lower left")
    return save(figure, path)


def write(
    out: Path,
    rows: Sequence[Row],
    worlds: Sequence[str],
    seeds: Sequence[int],
    training: object,
    command: str,
    specs: Mapping,
    machine: Mapping[str, str] | None = None,
) -> list[Path]:
    stats = summarise(rows)
    fine = [w for w in worlds if isinstance(specs[w], FineSpec)]
    per_class = [w for w in worlds if w not in fine]
    lines = [
        f"<!-- Generated by `{command}`; do not edit by hand. -->\n\n",
        f"Mean ± standard deviation over seeds {list(seeds)}. Every trained contender runs the "
        f"docs' own loop: Adam (lr {training.lr:g}; CoOp's chosen among "  # type: ignore[attr-defined]
        f"{', '.join(f'{x:g}' for x in training.lr_choices)} on a held-out quarter of the shots), "  # type: ignore[attr-defined]
        f"batch {training.batch_size}, {training.steps} steps (`MixtureOfPrompts`: "  # type: ignore[attr-defined]
        f"{training.mixture_steps}), logit scale 100. Accuracy % from the loss's own `logits()` "  # type: ignore[attr-defined]
        "on held-out images; NMI: each held-out image's best sub-prompt against its true look, "
        "per class, averaged.\n\n",
        "### Targets\n\nThe recommended recipe (`OffsetMixtureOfPrompts` and "
        "`MixtureOfPromptsLoss` defaults, `initialize_from_kmeans`, `prior=prompts.prior_loss()`) "
        "against the best single-prompt reference (zero-shot, one prompt, one prompt + anchor) of "
        "each world.\n\n",
        *targets(stats, worlds, specs),
        "\n### Fine-grained worlds, `OffsetMixtureOfPrompts`\n\n",
        *results_table(stats, fine, "offset", suite.CONTENDERS),
    ]
    if per_class:
        lines += [
            "\n### Worlds whose looks are their classes' own (16 classes), "
            "`OffsetMixtureOfPrompts`\n\n",
            *results_table(stats, per_class, "offset", suite.CONTENDERS),
        ]
    mixture = [w for w in worlds if any(key[:2] == (w, "mixture") for key in stats)]
    if mixture:
        names = [
            suite.ZERO_SHOT,
            suite.ONE_PROMPT.name,
            suite.KGCOOP.name,
            suite.RECIPE.name,
            *(c.name for c in suite.MIXTURE_EXTRA),
        ]
        lines += [
            "\n### `MixtureOfPrompts` through a tiny pre-trained text tower\n\n",
            *results_table(stats, mixture, "mixture", names),
        ]
    levers = lever_table(stats, worlds)
    if levers:
        lines += ["\n### Levers\n\n", *levers]
    if machine:
        lines += [
            f"\nMeasured by `{command}` on {machine['device']}; {machine['versions']}; "
            f"wall time {machine['wall']}.\n"
        ]
    path = out / "results.md"
    path.write_text("".join(lines))
    paths = [path]
    for plotted in (
        plot_shots(out / "shots.png", stats),
        plot_levers(out / "levers.png", stats, worlds),
    ):
        if plotted is not None:
            paths.append(plotted)
    return paths
