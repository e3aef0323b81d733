"""Diversity: the mean penalised pairwise cosine between a class's sub-prompts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from promptmix._validation import check_choice
from promptmix.functional._common import REDUCTIONS, Reduction, connected_zero
from promptmix.functional.similarity import pairwise_cosine


def diversity_loss(
    subprompt_features: Tensor,
    *,
    power: float = 2.0,
    margin: float = 0.0,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Mean penalised pairwise cosine between each class's sub-prompts.

    $$
    L = \frac{1}{C} \sum_c \frac{2}{K(K-1)} \sum_{i<j}
        \max\left(0, |\cos(t_{ci}, t_{cj})| - m\right)^p
    $$

    With the defaults (`p = 2`, `m = 0`) this is the mean squared cosine: identical sub-prompts
    give 1, mutually orthogonal ones give 0. Similarities with `|cos| <= margin` cost nothing.

    Args:
        subprompt_features: `(num_classes, K, dim)`.
        power: exponent `p >= 1` applied to the penalised similarity.
        margin: `m` in `[0, 1)`, the similarity below which pairs are not penalised.
        reduction: `"mean"` or `"sum"` over classes, or `"none"` for `(num_classes,)`.

    Returns:
        A scalar, or `(num_classes,)` with `reduction="none"`. `K == 1` (no pairs) or no
        classes give zeros that are still connected to the graph.

    Examples:
        >>> same = torch.ones(1, 3, 4)
        >>> diversity_loss(same)
        tensor(1.)
        >>> diversity_loss(torch.eye(3).unsqueeze(0))
        tensor(0.)
    """
    cosine = pairwise_cosine(subprompt_features)
    check_choice("reduction", reduction, REDUCTIONS)
    num_classes, k = subprompt_features.shape[:2]
    if k < 2 or num_classes == 0:
        per_class = subprompt_features.sum(dim=(1, 2)) * 0
    else:
        rows, cols = torch.triu_indices(k, k, offset=1, device=cosine.device)
        pairs = cosine[:, rows, cols]
        per_class = F.relu(pairs.abs() - margin).pow(power).mean(dim=-1)
    if reduction == "none":
        return per_class
    if num_classes == 0:
        return connected_zero(subprompt_features)
    return per_class.mean() if reduction == "mean" else per_class.sum()

