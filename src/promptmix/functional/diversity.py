"""Diversity: the mean penalised pairwise cosine between a class's sub-prompts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from promptmix._validation import (
    as_subprompts,
    check_choice,
    check_positive,
    check_tensor,
    check_unit_interval,
)
from promptmix.functional._common import REDUCTIONS, Reduction, connected_zero
from promptmix.functional.similarity import pairwise_cosine

__all__ = ["diversity_loss"]


def diversity_loss(
    subprompt_features: Tensor,
    class_mask: Tensor | None = None,
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
    (The original mixture-of-prompts code's diversity term was a different penalty: a piecewise
    function of the cosine, with terms in $s$, $s^2$, $s^4$ and $s^8$ above thresholds,
    averaged over the batch's images rather than over classes.)

    Args:
        subprompt_features: `(num_classes, K, dim)` (`(num_classes, dim)`: `K = 1`, no pairs).
        class_mask: `(num_classes,)` bool, the classes to penalise (e.g. those in the batch);
            the others count as 0 and the mean is over the selected ones. A mask rather than
            indexing with the selected classes keeps the shapes fixed: no host sync on CUDA.
        power: exponent `p >= 1` applied to the penalised similarity.
        margin: `m` in `[0, 1)`, the similarity below which pairs are not penalised.
        reduction: `"mean"` or `"sum"` over classes, or `"none"` for `(num_classes,)`.

    Returns:
        A scalar, or `(num_classes,)` with `reduction="none"`. `K == 1` (no pairs), no
        classes or an empty mask give zeros that are still connected to the graph. NaN or inf
        in any sub-prompt gives NaN (a masked-out class included).

    Examples:
        >>> same = torch.ones(1, 3, 4)
        >>> diversity_loss(same)
        tensor(1.)
        >>> diversity_loss(torch.eye(3).unsqueeze(0))
        tensor(0.)
        >>> two = torch.stack([torch.ones(3, 4), torch.eye(3, 4)])  # collapsed, then diverse
        >>> diversity_loss(two, torch.tensor([False, True]))
        tensor(0.)
    """
    subprompt_features = as_subprompts("subprompt_features", subprompt_features)
    cosine = pairwise_cosine(subprompt_features)
    check_choice("reduction", reduction, REDUCTIONS)
    if check_positive("power", power) < 1:
        raise ValueError(f"power must be in [1, inf) but is {power}.")
    check_unit_interval("margin", margin)
    num_classes, k = subprompt_features.shape[:2]
    if class_mask is not None:
        check_tensor("class_mask", class_mask)
        if class_mask.dtype != torch.bool or class_mask.shape != (num_classes,):
            raise ValueError(
                f"class_mask must be a bool tensor of shape ({num_classes},) but has dtype "
                f"{class_mask.dtype} and shape {tuple(class_mask.shape)}."
            )
    if k < 2 or num_classes == 0:
        per_class = subprompt_features.sum(dim=(1, 2)) * 0
    else:
        rows, cols = torch.triu_indices(k, k, offset=1, device=cosine.device)
        pairs = cosine[:, rows, cols]
        per_class = F.relu(pairs.abs() - margin).pow(power).mean(dim=-1)
    if num_classes == 0:
        return per_class if reduction == "none" else connected_zero(subprompt_features)
    if class_mask is None:
        if reduction == "none":
            return per_class
        return per_class.mean() if reduction == "mean" else per_class.sum()
    # A product, not `where`: NaN in a masked-out class still shows.
    weights = class_mask.to(per_class.dtype)
    per_class = per_class * weights
    if reduction == "none":
        return per_class
    total = per_class.sum()
    return total / weights.sum().clamp_min(1) if reduction == "mean" else total

