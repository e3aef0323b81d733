"""Consistency with the frozen zero-shot classifier: distillation of its logits."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from promptmix._validation import check_choice, check_positive, check_rank
from promptmix.functional._common import connected_zero

KLReduction = Literal["batchmean", "mean", "sum", "none"]
KL_REDUCTIONS = ("batchmean", "mean", "sum", "none")


def zero_shot_consistency(
    logits: Tensor,
    zero_shot_logits: Tensor,
    *,
    temperature: float = 1.0,
    reduction: KLReduction = "batchmean",
) -> Tensor:
    r"""Distillation of the frozen zero-shot logits into the learned ones (PromptSRC, ProGrad).

    $$
    L = \frac{T^2}{B} \sum_{b=1}^{B} \mathrm{KL}\left(
        \mathrm{softmax}(z_b / T) \,\middle\|\, \mathrm{softmax}(\ell_b / T) \right)
    $$

    with learned logits $\ell$ and zero-shot logits $z$ (treated as constant targets). The
    $T^2$ keeps the gradient's scale independent of the temperature (Hinton et al.). Equal
    logits give 0; the value is never negative.

    The reductions are those of `torch.nn.functional.kl_div`:

    - `"batchmean"` (default): sum over classes, mean over the batch. ProGrad
      (`trainers/prograd.py`, `T = 1`) reports the cross-entropy
      $-\sum_c p^z_c \log p^\ell_c$, which is this plus the constant entropy of $p^z$: the same
      gradient.
    - `"mean"`: divided by `batch * num_classes`, PromptSRC's `L_SCL_logits`
      (`trainers/promptsrc.py`: `kl_div(..., reduction="sum") / logits.numel()`, `T = 1`).
    - `"sum"`, or `"none"` for one value per sample.

    Computed in (at least) float32 with `log_softmax`, so float16/bfloat16 logits of CLIP's
    scale (100) give finite values and gradients; the result has the dtype of `logits`.

    Args:
        logits: `(batch, num_classes)` learned logits, e.g. the loss's class logits.
        zero_shot_logits: `(batch, num_classes)` logits of the frozen hand-crafted classifier.
        temperature: the distillation temperature $T > 0$ (not the E-step's `tau`).
        reduction: `"batchmean"`, `"mean"`, `"sum"` or `"none"`.

    Returns:
        A scalar, or `(batch,)` with `reduction="none"`. An empty batch gives a zero that is
        still connected to the graph.

    Examples:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> zero_shot_consistency(logits, logits)
        tensor(0.)
        >>> zero_shot_consistency(logits, logits.flip(-1), reduction="none")
        tensor([1.5232, 0.4621])
    """
    check_rank("logits", logits, (2,), "(batch, num_classes)")
    check_rank("zero_shot_logits", zero_shot_logits, (2,), "(batch, num_classes)")
    if zero_shot_logits.shape != logits.shape:
        raise ValueError(
            f"zero_shot_logits must have the shape of logits {tuple(logits.shape)} but has shape "
            f"{tuple(zero_shot_logits.shape)}."
        )
    check_positive("temperature", temperature)
    check_choice("reduction", reduction, KL_REDUCTIONS)
    # float16/bfloat16 are computed in float32; float64 stays float64.
    compute = torch.promote_types(logits.dtype, torch.float32)
    student = torch.log_softmax(logits.to(compute) / temperature, dim=-1)
    teacher = torch.log_softmax(zero_shot_logits.detach().to(compute) / temperature, dim=-1)
    probabilities = teacher.exp()
    # 0 * log 0 = 0: a class the teacher gives no mass costs nothing, even at -inf logits.
    pointwise = torch.where(
        probabilities > 0, probabilities * (teacher - student), torch.zeros_like(student)
    )
    per_sample = (temperature**2) * pointwise.sum(dim=-1)
    if reduction == "none":
        return per_sample.to(logits.dtype)
    if per_sample.numel() == 0:
        return connected_zero(logits)
    total = per_sample.sum()
    if reduction == "batchmean":
        total = total / logits.shape[0]
    elif reduction == "mean":
        total = total / logits.numel()
    return total.to(logits.dtype)
