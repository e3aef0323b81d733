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
from promptmix._validation import (
    as_subprompts,
    check_int,
    check_labels,
    check_rank,
    check_simplex,
    check_unit_interval,
)

__all__ = [
    "CollapseReport",
    "detect_collapse",
    "dominant_share",
    "effective_subprompts",
    "mean_pairwise_cosine",
    "subprompt_usage",
]

#: How many collapsed classes the message of `detect_collapse` names before "and N more".
MESSAGE_CLASSES = 10


@torch.no_grad()
def mean_pairwise_cosine(subprompt_features: Tensor) -> Tensor:
    r"""Mean absolute cosine $|\cos|$ over pairs `i < j` of each class's sub-prompts.

    The absolute value, as in `DiversityLoss`: anti-parallel sub-prompts (cosine -1) score
    the same class logits up to sign and are duplicates, not diverse. (Before version 0.2 this
    was the signed cosine, which scored them -1, "maximally diverse".)

    Args:
        subprompt_features: `(num_classes, K, dim)` (`(num_classes, dim)`: `K = 1`).

    Returns:
        `(num_classes,)` in `[0, 1]`; `K == 1` gives 1 (a single sub-prompt is fully
        "collapsed"); NaN for a class whose features hold NaN or inf.

    Examples:
        >>> mean_pairwise_cosine(torch.eye(3).unsqueeze(0))
        tensor([0.])
        >>> mean_pairwise_cosine(torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]]))
        tensor([1.])
    """
    cosine = PF.pairwise_cosine(subprompt_features)
    k = cosine.shape[-1]
    if k < 2:
        return cosine.new_ones(cosine.shape[0]) + cosine.sum(dim=(1, 2)) * 0
    rows, cols = torch.triu_indices(k, k, offset=1, device=cosine.device)
    return cosine[:, rows, cols].abs().mean(dim=-1)


@torch.no_grad()
def subprompt_usage(responsibilities: Tensor, labels: Tensor, *, num_classes: int) -> Tensor:
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


@dataclass(kw_only=True)
class CollapseReport:
    """The verdict of `detect_collapse`, with the numbers behind it (means over classes)."""

    collapsed: bool
    mean_cosine: float
    dominant_share: float | None
    effective_subprompts: float | None
    collapsed_classes: list[int] = field(default_factory=list)
    message: str = ""
    #: For each collapsed class, the criteria that tripped, e.g. `["mean |cos| 0.97 > 0.9"]`.
    reasons: dict[int, list[str]] = field(default_factory=dict)

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
    r"""Flag mode collapse: sub-prompts too alike, or one sub-prompt taking the assignments.

    A class is collapsed when its mean pairwise sub-prompt $|\cos|$ is above `cosine_threshold`
    or, given assignments, its dominant sub-prompt takes more than `share_threshold` of them.
    The message names, per collapsed class, the criterion that tripped.

    Invalid input raises `ValueError` rather than passing for a healthy mixture: features with
    NaN or inf, responsibilities with another K, rows off the simplex (or non-finite), or an
    empty batch of responsibilities.

    Args:
        subprompt_features: `(num_classes, K, dim)` (`(num_classes, dim)`: `K = 1`).
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
        >>> report.reasons[0]
        ['mean |cos| 1.000 > 0.9']
    """
    check_unit_interval("cosine_threshold", cosine_threshold, closed_right=True)
    check_unit_interval("share_threshold", share_threshold, closed_right=True)
    subprompt_features = as_subprompts("subprompt_features", subprompt_features)
    num_classes, k = subprompt_features.shape[:2]
    if num_classes == 0 or k == 0:
        raise ValueError(
            "subprompt_features must hold at least one class and one sub-prompt but has shape "
            f"{tuple(subprompt_features.shape)}."
        )
    _check_finite("subprompt_features", subprompt_features)
    cosine = mean_pairwise_cosine(subprompt_features).float()
    flagged = cosine > cosine_threshold
    reasons: dict[int, list[str]] = {
        int(c): [f"mean |cos| {cosine[c].item():.3f} > {cosine_threshold}"]
        for c in flagged.nonzero().flatten().tolist()
    }
    share = effective = None
    if responsibilities is not None:
        if labels is None:
            raise ValueError("labels must be given with responsibilities but is None.")
        check_rank("responsibilities", responsibilities, (2,), "(batch, K)")
        if responsibilities.shape[1] != k:
            raise ValueError(
                f"responsibilities must have shape (batch, {k}) to match the K = {k} "
                f"sub-prompts of subprompt_features but has shape "
                f"{tuple(responsibilities.shape)}."
            )
        if responsibilities.shape[0] == 0:
            raise ValueError(
                "responsibilities must hold at least one row to judge usage but has shape "
                f"{tuple(responsibilities.shape)}; pass None to judge the features only."
            )
        responsibilities = _check_simplex_on_host(responsibilities)
        usage = subprompt_usage(responsibilities, labels, num_classes=num_classes)
        shares = dominant_share(usage)
        for c in (shares.nan_to_num(0.0) > share_threshold).nonzero().flatten().tolist():
            reasons.setdefault(int(c), []).append(
                f"dominant share {shares[c].item():.3f} > {share_threshold}"
            )
        share = torch.nanmean(shares).item()
        effective = torch.nanmean(effective_subprompts(usage)).item()
    classes = sorted(reasons)
    mean_cosine = cosine.mean().item()
    summary = f"mean sub-prompt cosine (absolute) {mean_cosine:.3f}" + (
        f", dominant share {share:.3f}, effective sub-prompts {effective:.2f}"
        if share is not None
        else ""
    )
    if classes:
        named = "; ".join(
            f"class {c}: {' and '.join(reasons[c])}" for c in classes[:MESSAGE_CLASSES]
        )
        more = len(classes) - MESSAGE_CLASSES
        message = (
            f"{summary}: collapse in {len(classes)}/{num_classes} classes ({named}"
            + (f"; and {more} more" if more > 0 else "")
            + ")"
        )
    else:
        message = f"{summary}: no collapse"
    return CollapseReport(
        collapsed=bool(classes),
        mean_cosine=mean_cosine,
        dominant_share=share,
        effective_subprompts=effective,
        collapsed_classes=classes,
        message=message,
        reasons={c: reasons[c] for c in classes},
    )


def _check_finite(name: str, tensor: Tensor) -> None:
    """Raise `ValueError` naming the classes (first dimension) that hold NaN or inf."""
    bad = (~torch.isfinite(tensor)).flatten(1).any(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"{name} must be finite but holds NaN or inf in class(es) {rows[:MESSAGE_CLASSES]}"
            + (" ..." if len(rows) > MESSAGE_CLASSES else "")
            + ": a NaN is invalid input, not a healthy mixture."
        )


def _check_simplex_on_host(responsibilities: Tensor) -> Tensor:
    """Diagnostics read values on the host anyway, so the simplex check raises on any device."""
    return check_simplex("responsibilities", responsibilities, non_finite="raise", on_host=True)
