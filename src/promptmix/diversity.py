"""`DiversityLoss`: keeps a class's sub-prompts apart so the mixture cannot collapse into one."""

from __future__ import annotations

from torch import Tensor, nn

from promptmix import functional as PF
from promptmix._validation import check_choice, check_positive, check_unit_interval

__all__ = ["DiversityLoss"]


class DiversityLoss(nn.Module):
    r"""Mean (squared) pairwise cosine between each class's sub-prompt features.

    $$
    L = \frac{1}{C} \sum_c \frac{2}{K(K-1)} \sum_{i<j}
        \max\left(0, |\cos(t_{ci}, t_{cj})| - m\right)^p
    $$

    Returns the **unweighted** value; `MixtureOfPromptsLoss` applies the weight and passes the
    mask of the classes in the batch as `class_mask`. Identical sub-prompts give `(1 - m)^p`
    (1 by default), mutually orthogonal ones give 0. (The original mixture-of-prompts code's
    diversity term was another penalty: piecewise in the cosine $s$, with terms in $s$, $s^2$,
    $s^4$ and $s^8$ above thresholds, averaged over the batch's images.)

    Args:
        power: exponent `p >= 1` (2 penalises near-duplicates much more than mild overlap).
        margin: `m` in `[0, 1)`: pairs with `|cos| <= m` are not penalised, so sub-prompts
            may share what the class has in common.
        reduction: `"mean"` or `"sum"` over classes, or `"none"` for one value per class.

    Shape:
        - subprompt_features: `(num_classes, K, dim)`, normalised or not (`(num_classes, dim)`:
          `K = 1`, no pairs, 0).
        - class_mask: `(num_classes,)` bool, or `None` for all classes.
        - output: scalar, or `(num_classes,)` with `reduction="none"`.

    Examples:
        >>> import torch
        >>> loss = DiversityLoss()
        >>> loss(torch.eye(8)[0].expand(2, 4, 8))  # every sub-prompt identical
        tensor(1.)
        >>> loss(torch.eye(4).expand(2, 4, 4))  # mutually orthogonal
        tensor(0.)
    """

    #: What `MixtureOfPromptsLoss` passes to `forward`, by name.
    inputs: tuple[str, ...] = ("subprompt_features", "class_mask")

    def __init__(
        self, *, power: float = 2.0, margin: float = 0.0, reduction: PF.Reduction = "mean"
    ):
        super().__init__()
        self.power = check_positive("power", power)
        if self.power < 1:
            raise ValueError(f"power must be in [1, inf) but is {power}.")
        self.margin = check_unit_interval("margin", margin)
        self.reduction: PF.Reduction = check_choice(  # type: ignore[assignment]
            "reduction", reduction, PF.REDUCTIONS
        )

    def forward(self, subprompt_features: Tensor, class_mask: Tensor | None = None) -> Tensor:
        """Diversity loss of `subprompt_features` `(num_classes, K, dim)`.

        `class_mask` `(num_classes,)` bool selects the classes penalised (see
        `promptmix.functional.diversity_loss`).
        """
        return PF.diversity_loss(
            subprompt_features,
            class_mask,
            power=self.power,
            margin=self.margin,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"power={self.power}, margin={self.margin}, reduction={self.reduction!r}"
