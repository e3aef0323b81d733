"""Collapse diagnostics: is the mixture still a mixture?

Mode collapse shows in two numbers per class: the sub-prompts' mean pairwise cosine (collapsed
mixtures sit at 0.94-0.96) and the share of assignments the dominant sub-prompt takes (~99%).
These functions compute them, plus the effective number of sub-prompts in use, and
`detect_collapse` turns them into a verdict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from promptmix import functional as PF
from promptmix._validation import check_int, check_labels, check_rank, check_unit_interval


@torch.no_grad()
def mean_pairwise_cosine(subprompt_features: Tensor) -> Tensor:
    """Mean cosine over pairs `i < j` of each class's sub-prompts.

    Args:
        subprompt_features: `(num_classes, K, dim)`.

    Returns:
        `(num_classes,)`; `K == 1` gives 1 (a single sub-prompt is fully "collapsed").

    Examples:
        >>> mean_pairwise_cosine(torch.eye(3).unsqueeze(0))
        tensor([0.])
    """
    cosine = PF.pairwise_cosine(subprompt_features)
    k = cosine.shape[-1]
    if k < 2:
        return cosine.new_ones(cosine.shape[0])
    rows, cols = torch.triu_indices(k, k, offset=1, device=cosine.device)
    return cosine[:, rows, cols].mean(dim=-1)


@torch.no_grad()
def subprompt_usage(responsibilities: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Share of each class's assignments that each sub-prompt receives.

    Args:
        responsibilities: `(batch, K)` rows on the simplex (soft or hard).
        labels: `(batch,)` integer classes.
        num_classes: total number of classes.

    Returns:
        `(num_classes, K)` rows on the simplex; a class with no image gets a row of NaN, so it
        cannot pass for a balanced one (use `torch.nanmean` to average).

    Examples:
        >>> gamma = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> subprompt_usage(gamma, torch.tensor([0, 0, 1]), num_classes=3)
        tensor([[1., 0.],
                [0., 1.],
                [nan, nan]])
    """
    check_rank("responsibilities", responsibilities, (2,), "(batch, K)")
    check_int("num_classes", num_classes, minimum=1)
    check_labels("labels", labels, responsibilities.shape[0], num_classes)
    classes, means, _ = PF.class_mean_responsibilities(responsibilities.float(), labels)
    usage = means.new_full((num_classes, responsibilities.shape[1]), float("nan"))
    usage[classes] = means
    return usage


def dominant_share(usage: Tensor) -> Tensor:
    """Share of the most used sub-prompt per class: `1/K` is balanced, 1 is collapsed.

    Args:
        usage: `(num_classes, K)` from `subprompt_usage`.

    Returns:
        `(num_classes,)`.

    Examples:
        >>> dominant_share(torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
        tensor([0.7500, 0.5000])
    """
    check_rank("usage", usage, (2,), "(num_classes, K)")
    return usage.amax(dim=-1)


def effective_subprompts(usage: Tensor) -> Tensor:
    r"""Effective number of sub-prompts in use, $\exp H(u_c)$, from 1 (collapsed) to K.

    Args:
        usage: `(num_classes, K)` from `subprompt_usage`.

    Returns:
        `(num_classes,)`.

    Examples:
        >>> effective_subprompts(torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]))
        tensor([2., 1.])
    """
    check_rank("usage", usage, (2,), "(num_classes, K)")
    return PF.entropy(usage).exp()


@dataclass
class CollapseReport:
    """The verdict of `detect_collapse`, with the numbers behind it (means over classes)."""

    collapsed: bool
    mean_cosine: float
    dominant_share: float | None
    effective_subprompts: float | None
    collapsed_classes: list[int] = field(default_factory=list)
    message: str = ""

    def as_dict(self) -> dict[str, object]:
        """A plain dict, ready for a JSON log."""
        return asdict(self)


@torch.no_grad()
def detect_collapse(
    subprompt_features: Tensor,
    responsibilities: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    cosine_threshold: float = 0.9,
    share_threshold: float = 0.9,
) -> CollapseReport:
    """Flag mode collapse: sub-prompts too alike, or one sub-prompt taking the assignments.

    A class is collapsed when its mean pairwise sub-prompt cosine is above `cosine_threshold` or,
    given assignments, its dominant sub-prompt takes more than `share_threshold` of them.

    Args:
        subprompt_features: `(num_classes, K, dim)`.
        responsibilities: `(batch, K)` assignments, or `None` to judge features only.
        labels: `(batch,)` classes of `responsibilities`' rows (required with them).
        cosine_threshold: in `[0, 1]`.
        share_threshold: in `[0, 1]`.

    Returns:
        A `CollapseReport`.

    Examples:
        >>> report = detect_collapse(torch.ones(4, 3, 8))
        >>> report.collapsed, report.collapsed_classes
        (True, [0, 1, 2, 3])
    """
    check_unit_interval("cosine_threshold", cosine_threshold, closed_right=True)
    check_unit_interval("share_threshold", share_threshold, closed_right=True)
    cosine = mean_pairwise_cosine(subprompt_features)
    flagged = cosine > cosine_threshold
    share = effective = None
    if responsibilities is not None:
        if labels is None:
            raise ValueError("labels must be given with responsibilities but is None.")
        usage = subprompt_usage(responsibilities, labels, subprompt_features.shape[0])
        shares = dominant_share(usage)
        flagged |= shares.nan_to_num(0.0) > share_threshold
        share = torch.nanmean(shares).item()
        effective = torch.nanmean(effective_subprompts(usage)).item()
    classes = flagged.nonzero().flatten().tolist()
    mean_cosine = cosine.mean().item()
    message = (
        f"mean sub-prompt cosine {mean_cosine:.3f}"
        + (
            f", dominant share {share:.3f}, effective sub-prompts {effective:.2f}"
            if share is not None
            else ""
        )
        + (
            f": collapse in {len(classes)}/{len(cosine)} classes (cosine > {cosine_threshold}"
            f" or dominant share > {share_threshold})"
            if classes
            else ": no collapse"
        )
    )
    return CollapseReport(bool(classes), mean_cosine, share, effective, classes, message)
