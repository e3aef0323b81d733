"""Pictures of a run (PNG, matplotlib's Agg backend): what each sub-prompt took, and how it went."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a training node

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import BoundaryNorm
from matplotlib.figure import Figure, SubFigure
from matplotlib.patches import Rectangle
from omegaconf import DictConfig

from cars import UsageError
from cars.data import FewShot, Sample, load_image
from cars.files import RunFolder, atomic_write, read_records


def check_classes(class_ids: Sequence[int], num_classes: int) -> None:
    """Refuse ``output.plot_classes`` that the dataset does not have, before anything runs."""
    missing = [c for c in class_ids if not 0 <= c < num_classes]
    if missing:
        raise UsageError(
            f"output.plot_classes: expected classes of this dataset (0 to {num_classes - 1}), "
            f"got {list(class_ids)}"
        )


def _save(figure: Figure, path: Path) -> Path:
    atomic_write(path, lambda file: figure.savefig(file, format="png", bbox_inches="tight"))
    plt.close(figure)
    return path


def _draw_gallery(
    figure: Figure | SubFigure,
    samples: Sequence[Sample],
    responsibilities: torch.Tensor,
    class_id: int,
    top_n: int,
    title: str,
) -> None:
    """One row per sub-prompt of ``class_id``: its images, most responsible first."""
    rows = [index for index, sample in enumerate(samples) if sample.label == class_id]
    gamma = responsibilities[rows].float().cpu()
    k = gamma.shape[1]
    owner = gamma.argmax(dim=1)
    axes = figure.subplots(k, top_n, squeeze=False)
    for sub in range(k):
        mine = (owner == sub).nonzero().flatten()
        order = mine[gamma[mine, sub].argsort(descending=True)][:top_n].tolist()
        for column in range(top_n):
            axis = axes[sub, column]
            axis.set_xticks([])
            axis.set_yticks([])
            if column < len(order):
                local = order[column]
                axis.imshow(load_image(samples[rows[local]].path))
                axis.set_title(f"γ={gamma[local, sub]:.2f}", fontsize=8)
            else:
                axis.axis("off")
        axes[sub, 0].set_ylabel(f"sub-prompt {sub}\n{len(order)} of {len(mine)} shown", fontsize=9)
        axes[sub, 0].axis("on")
    figure.suptitle(title, fontsize=10)


def subprompt_gallery(
    samples: Sequence[Sample],
    responsibilities: torch.Tensor,
    class_id: int,
    classname: str,
    top_n: int,
    path: Path,
) -> Path:
    """One row per sub-prompt: the class's images assigned to it, most responsible first.

    Each row says how many of the sub-prompt's images it shows ("4 of 7 shown").

    Args:
        samples: the training samples, in the order of ``responsibilities``' rows.
        responsibilities: ``(len(samples), K)``.
        class_id: the class to draw.
        classname: its name, for the title.
        top_n: images per row at most.
        path: the PNG to write.
    """
    k = responsibilities.shape[1]
    figure = plt.figure(figsize=(1.6 * top_n + 0.6, 1.7 * k + 0.5))
    title = f"{classname} (class {class_id}): images by assigned sub-prompt"
    _draw_gallery(figure, samples, responsibilities, class_id, top_n, title)
    return _save(figure, path)


def compare_galleries(
    runs: Sequence[tuple[str, Sequence[Sample], torch.Tensor]],
    *,
    class_ids: Sequence[int],
    classnames: Sequence[str],
    top_n: int,
    path: Path,
    title: str = "",
) -> Path:
    """Several runs' galleries side by side: one column per run, one row per class.

    Args:
        runs: ``(name, samples, responsibilities (len(samples), K))`` per run.
        class_ids: the classes to draw.
        classnames: all class names, for the titles.
        top_n: images per sub-prompt at most.
        path: the PNG to write.
        title: says why these classes are shown.
    """
    k = max(gamma.shape[1] for _, _, gamma in runs)
    figure = plt.figure(
        figsize=((1.5 * top_n + 0.8) * len(runs), (1.6 * k + 0.7) * len(class_ids)),
        layout="constrained",
    )
    panels = figure.subfigures(len(class_ids), len(runs), squeeze=False, wspace=0.04)
    for row, class_id in enumerate(class_ids):
        for column, (name, samples, gamma) in enumerate(runs):
            label = f"{name}: {classnames[class_id][:30]} (class {class_id})"
            _draw_gallery(panels[row, column], samples, gamma, class_id, top_n, label)
    if title:
        figure.suptitle(title, fontsize=10, wrap=True)
    return _save(figure, path)


def responsibility_histogram(responsibilities: torch.Tensor, path: Path) -> Path:
    """Histograms of all responsibilities and of each image's largest one.

    Collapse shows as a spike at 1 with everything else at 0 *and* one sub-prompt taking all
    images; a healthy mixture has confident images spread over sub-prompts.
    """
    gamma = responsibilities.float().cpu()
    k = gamma.shape[1]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.hist(gamma.flatten().numpy(), bins=40, range=(0, 1), color="tab:blue")
    left.axvline(1 / k, color="k", linestyle="--", label=f"uniform 1/K = {1 / k:.2f}")
    left.set(title="all responsibilities γ", xlabel="γ", ylabel="count")
    left.legend()
    right.hist(gamma.max(dim=1).values.numpy(), bins=40, range=(0, 1), color="tab:orange")
    right.set(title="largest γ per image", xlabel="max_k γ", ylabel="images")
    return _save(figure, path)


#: Colour boundaries of the cosine heatmaps: most of the colours go to 0.8-1.0, where collapse is.
COSINE_LEVELS = (-1.0, 0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)


def similarity_heatmaps(
    pairwise: torch.Tensor,
    class_ids: Sequence[int],
    classnames: Sequence[str],
    path: Path,
    *,
    threshold: float = 0.9,
) -> Path:
    """Pairwise cosine between sub-prompts: the chosen classes, then the mean over all classes.

    The colour scale spends most of its colours on 0.8-1.0, so 0.85 and 0.95 look different;
    the diagonal (always 1) is grey, and pairs above ``threshold`` (collapse) are framed in red.

    Args:
        pairwise: ``(num_classes, K, K)`` cosines.
        threshold: the collapse threshold on the cosine, marked on the colour bar.
    """
    panels = [(pairwise[c], f"{classnames[c][:24]}\n(class {c})") for c in class_ids]
    panels.append((pairwise.mean(dim=0), "mean over\nall classes"))
    k = pairwise.shape[-1]
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    norm = BoundaryNorm(COSINE_LEVELS, cmap.N)
    figure, axes = plt.subplots(
        1, len(panels), figsize=(2.9 * len(panels) + 1.2, 3.3), squeeze=False, layout="constrained"
    )
    for index, (axis, (matrix, title)) in enumerate(zip(axes[0], panels, strict=True)):
        values = matrix.float().cpu().numpy()
        diagonal = np.eye(k, dtype=bool)
        image = axis.imshow(np.ma.masked_array(values, diagonal), cmap=cmap, norm=norm)
        for row in range(k):
            for column in range(k):
                if row == column:
                    continue
                value = values[row, column]
                if k <= 8:  # small enough to print every cosine
                    light = norm(value) > cmap.N * 0.6  # viridis is light at the top
                    axis.text(
                        column,
                        row,
                        f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize=9,
                        color="black" if light else "white",
                    )
                if value > threshold:
                    axis.add_patch(
                        Rectangle(
                            (column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", lw=2
                        )
                    )
        axis.set_xticks(range(k))
        axis.set_yticks(range(k))
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("sub-prompt")
        if index == 0:
            axis.set_ylabel("sub-prompt")
    bar = figure.colorbar(image, ax=axes[0].tolist(), shrink=0.9, ticks=COSINE_LEVELS)
    bar.set_label("cosine (red frame: above the collapse threshold)")
    bar.ax.axhline(threshold, color="red", linewidth=2)
    return _save(figure, path)


def training_curves(
    records: Sequence[dict[str, Any]],
    path: Path,
    *,
    n_subprompts: int,
    cosine_threshold: float = 0.9,
    share_threshold: float = 0.9,
) -> Path:
    """Loss terms, temperature and learning rate per step; accuracy and diagnostics per epoch.

    The diagnostics panel shows the mean sub-prompt cosine and the dominant share with their
    collapse thresholds, and the effective number of sub-prompts against its ceiling K.
    """
    steps = [r for r in records if r["event"] == "step"]
    evals = [r for r in records if r["event"] in ("epoch", "eval") and "test_accuracy" in r]
    epochs = [r for r in records if r["event"] in ("eval", "epoch") and "mean_cosine" in r]
    figure, axes = plt.subplots(2, 2, figsize=(11, 7))
    x = [r["step"] for r in steps]
    terms = [key for key in steps[0] if key not in ("event", "epoch", "step", "lr", "tau")]
    for term in terms:  # the loss's scalars as the run logged them (the prior, regularizers)
        axes[0, 0].plot(x, [r.get(term) for r in steps], label=term)
    axes[0, 0].set(title="loss terms", xlabel="step")
    axes[0, 0].legend(fontsize=8)
    axes[0, 1].plot(x, [r["tau"] for r in steps], color="tab:purple", label="tau")
    axes[0, 1].set(title="E-step temperature and learning rate", xlabel="step", ylabel="tau")
    lr_axis = axes[0, 1].twinx()
    lr_axis.plot(x, [r["lr"] for r in steps], color="tab:gray", linestyle="--", label="lr")
    lr_axis.set_ylabel("lr")
    axes[1, 0].plot([r["epoch"] for r in evals], [r["test_accuracy"] for r in evals], marker="o")
    axes[1, 0].set(
        title="test top-1 accuracy (epoch 0: initial prompts)", xlabel="epoch", ylabel="%"
    )
    diagnostics = axes[1, 1]
    epoch_numbers = [r["epoch"] for r in epochs]
    diagnostics.plot(
        epoch_numbers,
        [r["mean_cosine"] for r in epochs],
        marker="o",
        label="mean sub-prompt cosine",
    )
    diagnostics.plot(
        epoch_numbers,
        [r["dominant_share"] for r in epochs],
        marker="^",
        color="tab:red",
        label="dominant share",
    )
    diagnostics.axhline(cosine_threshold, color="tab:blue", linestyle=":", linewidth=1)
    diagnostics.axhline(share_threshold, color="tab:red", linestyle="--", linewidth=1)
    same = cosine_threshold == share_threshold
    diagnostics.annotate(
        f"collapse threshold{'s' if same else ''} {share_threshold:g}"
        + ("" if same else f" (cosine {cosine_threshold:g})"),
        (0.02, share_threshold),
        xycoords=("axes fraction", "data"),
        textcoords="offset points",
        xytext=(0, 3),
        fontsize=8,
        color="tab:red",
    )
    diagnostics.set(
        title="collapse diagnostics", xlabel="epoch", ylabel="cosine / share", ylim=(0, 1.05)
    )
    effective_axis = diagnostics.twinx()
    effective_axis.plot(
        epoch_numbers,
        [r["effective_subprompts"] for r in epochs],
        marker="s",
        color="tab:green",
        label="effective sub-prompts",
    )
    effective_axis.axhline(n_subprompts, color="tab:green", linestyle="--", linewidth=1)
    effective_axis.annotate(
        f"K = {n_subprompts}",
        (0.98, n_subprompts),
        xycoords=("axes fraction", "data"),
        textcoords="offset points",
        xytext=(0, -11),
        ha="right",
        fontsize=8,
        color="tab:green",
    )
    effective_axis.set(ylabel="effective sub-prompts", ylim=(0.9, n_subprompts + 0.1))
    handles = diagnostics.get_legend_handles_labels()
    extra = effective_axis.get_legend_handles_labels()
    diagnostics.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="center left")
    figure.tight_layout()
    return _save(figure, path)


def draw_all(
    output: DictConfig,
    folder: RunFolder,
    data: FewShot,
    responsibilities: torch.Tensor,
    subprompts: torch.Tensor,
) -> list[Path]:
    """Every picture of a run into ``folder.plots``, from its final sub-prompts ``(C, K, dim)``
    and their responsibilities for the training images ``(N, K)``."""
    chosen = list(dict.fromkeys(output.plot_classes))
    unit = F.normalize(subprompts.float(), dim=-1)
    paths = [
        subprompt_gallery(
            data.train, responsibilities, c, data.classnames[c], output.plot_top_images,
            folder.plots / f"subprompts_class{c:03d}.png",
        )
        for c in chosen
    ]
    paths.append(responsibility_histogram(responsibilities, folder.plots / "responsibilities.png"))
    paths.append(
        similarity_heatmaps(
            unit @ unit.transpose(1, 2), chosen, data.classnames, folder.plots / "similarity.png",
            threshold=output.collapse_cosine_threshold,
        )
    )
    paths.append(
        training_curves(
            read_records(folder.metrics), folder.plots / "training_curves.png",
            n_subprompts=responsibilities.shape[1],
            cosine_threshold=output.collapse_cosine_threshold,
            share_threshold=output.collapse_share_threshold,
        )
    )
    return paths
