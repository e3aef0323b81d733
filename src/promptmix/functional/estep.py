"""The E-step: responsibilities of a class's sub-prompts for its images, soft, hard or balanced."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from promptmix._validation import (
    check_choice,
    check_int,
    check_labels,
    check_positive,
    check_rank,
    check_subprompts,
)
from promptmix.functional._common import ASSIGNMENT_MODES, AssignmentMode
from promptmix.functional.similarity import own_class_similarities


def sinkhorn(scores: Tensor, groups: Tensor | None = None, *, iterations: int = 3) -> Tensor:
    """Balanced (equipartitioned) assignment of each group's rows over the K columns.

    Sinkhorn-Knopp as in SwAV: starting from `softmax(scores)`, alternately make every column of
    a group sum to the same mass and every row sum to 1. The result has rows on the simplex and,
    within each group, sub-prompt usage close to uniform. A group of one row ends uniform: balance
    needs several images per class in a batch (class-balanced sampling). No gradient flows.

    Args:
        scores: `(batch, K)` logits, e.g. `scale * cosine / tau`.
        groups: `(batch,)` integer group of each row (the class), or `None` for one group.
        iterations: number of column/row normalisation rounds, `>= 1`.

    Returns:
        `(batch, K)` responsibilities.

    Examples:
        >>> scores = torch.tensor([[5.0, 0.0], [4.0, 0.0], [3.0, 0.0], [2.0, 0.0]])
        >>> sinkhorn(scores, iterations=20).sum(dim=0).round()
        tensor([2., 2.])
    """
    check_rank("scores", scores, (2,), "(batch, K)")
    check_int("iterations", iterations, minimum=1)
    if groups is None:
        groups = torch.zeros(len(scores), dtype=torch.long, device=scores.device)
    else:
        check_labels("groups", groups, len(scores), None)
    with torch.no_grad():
        q = torch.softmax(scores.float(), dim=-1)
        _, inverse = torch.unique(groups, return_inverse=True)
        tiny = torch.finfo(q.dtype).tiny
        for _ in range(iterations):
            column_mass = q.new_zeros(int(inverse.max()) + 1 if len(q) else 0, q.shape[1])
            column_mass = column_mass.index_add(0, inverse, q)[inverse]
            q = q / column_mass.clamp_min(tiny)
            q = q / q.sum(dim=-1, keepdim=True).clamp_min(tiny)
    return q.to(scores.dtype)


def responsibilities_from_similarities(
    similarities: Tensor,
    labels: Tensor | None = None,
    *,
    tau: float = 1.0,
    scale: float = 100.0,
    mode: AssignmentMode = "soft",
    sinkhorn_iterations: int = 3,
) -> Tensor:
    """E-step from precomputed own-class similarities; see `responsibilities`.

    Args:
        similarities: `(batch, K)` cosine of each image to its class's sub-prompts.
        labels: `(batch,)` the class of each image (groups for `"sinkhorn"`), or `None`.
        tau: temperature `> 0`.
        scale: similarity scale `> 0`.
        mode: `"soft"`, `"hard"` or `"sinkhorn"`.
        sinkhorn_iterations: rounds for `"sinkhorn"`.

    Returns:
        `(batch, K)` rows on the simplex.
    """
    check_rank("similarities", similarities, (2,), "(batch, K)")
    check_subprompts("similarities", similarities, -1)
    check_positive("tau", tau)
    check_positive("scale", scale)
    check_choice("mode", mode, ASSIGNMENT_MODES)
    scores = similarities * (scale / tau)
    if mode == "soft":
        return torch.softmax(scores, dim=-1)
    if mode == "hard":
        one_hot = F.one_hot(scores.argmax(dim=-1), num_classes=scores.shape[-1])
        return one_hot.to(similarities.dtype)
    return sinkhorn(scores, labels, iterations=sinkhorn_iterations)


def responsibilities(
    image_features: Tensor,
    subprompt_features: Tensor,
    labels: Tensor | None = None,
    *,
    tau: float = 1.0,
    scale: float = 100.0,
    mode: AssignmentMode = "soft",
    sinkhorn_iterations: int = 3,
) -> Tensor:
    r"""E-step: how much each sub-prompt of an image's class is responsible for the image.

    $$
    \gamma_{bk} = \operatorname{softmax}_k\left(s \cos(x_b, t_{y_b k}) / \tau\right)
    $$

    The similarity scale `s` defaults to 100, CLIP's learned logit scale, so `tau = 1` assigns
    exactly as CLIP's own classifier would score the sub-prompts; `tau < 1` sharpens, `tau > 1`
    softens. CLIP cosines between sub-prompts of one class differ by a few hundredths, so at
    `tau = 0.05` (logit gaps of ~20-100) assignments are effectively hard, at `0.3` still soft.

    - `"soft"`: the softmax above; it **carries gradient**, so an entropy regulariser on it moves
      the sub-prompts.
    - `"hard"`: one-hot argmax of the soft responsibilities (no gradient).
    - `"sinkhorn"`: balanced assignment of each class's images over its sub-prompts
      (`sinkhorn`, no gradient).

    Args:
        image_features: `(batch, dim)`.
        subprompt_features: `(num_classes, K, dim)` indexed by `labels`, or `(batch, K, dim)`
            already gathered per image when `labels` is `None`.
        labels: `(batch,)` integer class of each image, or `None`.
        tau: temperature `> 0`.
        scale: similarity scale `s > 0`.
        mode: `"soft"`, `"hard"` or `"sinkhorn"`.
        sinkhorn_iterations: rounds for `"sinkhorn"`, `>= 1`.

    Returns:
        `(batch, K)` non-negative rows summing to 1.

    Examples:
        >>> images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> prompts = torch.eye(2).unsqueeze(0)  # one class, K=2 orthogonal sub-prompts
        >>> responsibilities(images, prompts, torch.tensor([0, 0]), tau=1.0, scale=1.0)
        tensor([[0.7311, 0.2689],
                [0.2689, 0.7311]])
        >>> responsibilities(images, prompts, torch.tensor([0, 0]), mode="hard")
        tensor([[1., 0.],
                [0., 1.]])
    """
    similarities = own_class_similarities(image_features, subprompt_features, labels)
    return responsibilities_from_similarities(
        similarities,
        labels,
        tau=tau,
        scale=scale,
        mode=mode,
        sinkhorn_iterations=sinkhorn_iterations,
    )

