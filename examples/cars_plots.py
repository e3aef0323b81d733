"""Pictures of a run (PNG, matplotlib's Agg backend): what each sub-prompt took, and how it went."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a training node

import matplotlib.pyplot as plt
import torch
from cars_data import Sample, load_image


def _save(figure: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def subprompt_gallery(
    samples: Sequence[Sample],
    responsibilities: torch.Tensor,
    class_id: int,
    classname: str,
    top_n: int,
    path: Path,
) -> Path:
    """One row per sub-prompt: the class's images assigned to it, most responsible first.

    Args:
        samples: the training samples, in the order of ``responsibilities``' rows.
        responsibilities: ``(len(samples), K)``.
        class_id: the class to draw.
        classname: its name, for the title.
        top_n: images per row at most.
        path: the PNG to write.
    """
    rows = [index for index, sample in enumerate(samples) if sample.label == class_id]
    gamma = responsibilities[rows].float().cpu()
    k = gamma.shape[1]
    owner = gamma.argmax(dim=1)
    figure, axes = plt.subplots(k, top_n, figsize=(1.6 * top_n, 1.7 * k), squeeze=False)
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
                axis.set_title(f"γ={gamma[local, sub]:.2f}", fontsize=7)
            else:
                axis.axis("off")
        axes[sub, 0].set_ylabel(f"sub-prompt {sub}\n{len(mine)} img", fontsize=8)
        axes[sub, 0].axis("on")
    figure.suptitle(f"{classname} (class {class_id}): images by assigned sub-prompt")
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


def similarity_heatmaps(
    pairwise: torch.Tensor, class_ids: Sequence[int], classnames: Sequence[str], path: Path
) -> Path:
    """Pairwise cosine between sub-prompts: the chosen classes, then the mean over all classes.

    Args:
        pairwise: ``(num_classes, K, K)`` cosines.
    """
    panels = [(pairwise[c], f"{classnames[c][:28]} ({c})") for c in class_ids]
    panels.append((pairwise.mean(dim=0), "mean over all classes"))
    k = pairwise.shape[-1]
    figure, axes = plt.subplots(
        1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False, layout="constrained"
    )
    for index, (axis, (matrix, title)) in enumerate(zip(axes[0], panels, strict=True)):
        values = matrix.float().cpu().numpy()
        image = axis.imshow(values, vmin=-1, vmax=1, cmap="coolwarm")
        if k <= 10:  # small enough to print every cosine
            for row in range(k):
                for column in range(k):
                    axis.text(
                        column,
                        row,
                        f"{values[row, column]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                    )
        axis.set_xticks(range(k))
        axis.set_yticks(range(k))
        axis.set_title(title, fontsize=8)
        axis.set_xlabel("sub-prompt")
        if index == 0:
            axis.set_ylabel("sub-prompt")
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="cosine")
    return _save(figure, path)


def training_curves(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Loss terms, temperature and learning rate per step; accuracy and diversity per epoch."""
    steps = [r for r in records if r["event"] == "step"]
    evals = [r for r in records if r["event"] in ("epoch", "eval") and "test_accuracy" in r]
    epochs = [r for r in records if r["event"] in ("eval", "epoch") and "mean_cosine" in r]
    figure, axes = plt.subplots(2, 2, figsize=(11, 7))
    x = [r["step"] for r in steps]
    for term in ("loss", "ce", "mixture", "diversity", "entropy"):
        axes[0, 0].plot(x, [r[term] for r in steps], label=term)
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
    axes[1, 1].plot(
        [r["epoch"] for r in epochs],
        [r["mean_cosine"] for r in epochs],
        marker="o",
        label="mean sub-prompt cosine",
    )
    axes[1, 1].set(title="collapse diagnostics", xlabel="epoch", ylabel="cosine")
    effective_axis = axes[1, 1].twinx()
    effective_axis.plot(
        [r["epoch"] for r in epochs],
        [r["effective_subprompts"] for r in epochs],
        marker="s",
        color="tab:green",
        label="effective sub-prompts",
    )
    effective_axis.set_ylabel("effective sub-prompts")
    handles = axes[1, 1].get_legend_handles_labels()
    extra = effective_axis.get_legend_handles_labels()
    axes[1, 1].legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def draw_all(
    *,
    samples: Sequence[Sample],
    responsibilities: torch.Tensor,
    pairwise: torch.Tensor,
    classnames: Sequence[str],
    class_ids: Sequence[int],
    top_n: int,
    records: Sequence[dict[str, Any]],
    folder: Path,
) -> list[Path]:
    """Every picture of a run, into ``folder``; returns their paths."""
    chosen = [c for c in dict.fromkeys(class_ids) if 0 <= c < len(classnames)]
    paths = [
        subprompt_gallery(
            samples,
            responsibilities,
            c,
            classnames[c],
            top_n,
            folder / f"subprompts_class{c:03d}.png",
        )
        for c in chosen
    ]
    paths.append(responsibility_histogram(responsibilities, folder / "responsibilities.png"))
    paths.append(similarity_heatmaps(pairwise, chosen, classnames, folder / "similarity.png"))
    paths.append(training_curves(records, folder / "training_curves.png"))
    return paths
