"""Consistency with the frozen zero-shot classifier: distillation of its logits."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from promptmix._validation import check_choice, check_positive, check_rank
from promptmix.functional._common import REDUCTIONS, Reduction, connected_zero, reduce

__all__ = ["zero_shot_consistency"]

#: `T` must keep `T^2` (and `1 / T^2`) a normal float32, or finite logits could give NaN.
_TEMPERATURE_RANGE = (
    math.sqrt(torch.finfo(torch.float32).tiny),
    math.sqrt(torch.finfo(torch.float32).max),
)


def _check_temperature(temperature: object) -> float:
    """Return the distillation `temperature` if it is a number with `T^2` a normal float32."""
    value = check_positive("temperature", temperature)
    low, high = _TEMPERATURE_RANGE
    if not low <= value <= high:
        raise ValueError(
            f"temperature must be in [{low:.3g}, {high:.3g}] (T^2 must be a normal float32, or "
            f"finite logits give NaN) but is {temperature}."
        )
    return value


def zero_shot_consistency(
    logits: Tensor,
    zero_shot_logits: Tensor,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    average_over_classes: bool = False,
) -> Tensor:
    r"""Distillation of the frozen zero-shot logits into the learned ones (PromptSRC, ProGrad).

    $$
    L = \frac{T^2}{B} \sum_{b=1}^{B} \mathrm{KL}\left(
        \mathrm{softmax}(z_b / T) \,\middle\|\, \mathrm{softmax}(\ell_b / T) \right)
    $$

    with learned logits $\ell$ and zero-shot logits $z$ (treated as constant targets). The
    $T^2$ keeps the gradient's scale independent of the temperature (Hinton et al.). Equal
    logits give 0; the value is `>= 0` up to float rounding (about 1e-7 in float32). NaN in
    either logits gives NaN (a NaN teacher is not read as "no mass").

    Each sample's KL is summed over classes (divided by `num_classes` with
    `average_over_classes=True`); `reduction` takes the package's vocabulary over the samples:

    - `"mean"` (default): the mean over the batch (`kl_div`'s `"batchmean"`). ProGrad
      (`trainers/prograd.py`, `T = 1`) reports the cross-entropy
      $-\sum_c p^z_c \log p^\ell_c$, which is this plus the constant entropy of $p^z$: the same
      gradient.
    - `"mean"` with `average_over_classes=True`: divided by `batch * num_classes`, PromptSRC's
      `L_SCL_logits` (`trainers/promptsrc.py`: `kl_div(..., reduction="sum") / logits.numel()`,
      `T = 1`).
    - `"sum"`, or `"none"` for one value per sample.

    Computed in (at least) float32 with `log_softmax`, so float16/bfloat16 logits of CLIP's
    scale (100) give finite values and gradients; the result has the dtype of `logits`.

    Args:
        logits: `(batch, num_classes)` learned logits, e.g. the loss's class logits.
        zero_shot_logits: `(batch, num_classes)` logits of the frozen hand-crafted classifier.
        temperature: the distillation temperature $T > 0$ (not the E-step's `tau`), with $T^2$
            a normal float32 (about `[1.1e-19, 1.8e19]`).
        reduction: `"mean"`, `"sum"` or `"none"` over the samples.
        average_over_classes: divide each sample's KL by `num_classes` (PromptSRC).

    Returns:
        A scalar, or `(batch,)` with `reduction="none"`. An empty batch gives a zero that is
        still connected to the graph.

    Examples:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> zero_shot_consistency(logits, logits)
        tensor(0.)
        >>> zero_shot_consistency(logits, logits.flip(-1), reduction="none")
        tensor([1.5232, 0.4621])
        >>> zero_shot_consistency(logits, torch.full_like(logits, float("nan")))
        tensor(nan)
    """
    check_rank("logits", logits, (2,), "(batch, num_classes)")
    check_rank("zero_shot_logits", zero_shot_logits, (2,), "(batch, num_classes)")
    if zero_shot_logits.shape != logits.shape:
        raise ValueError(
            f"zero_shot_logits must have the shape of logits {tuple(logits.shape)} but has shape "
            f"{tuple(zero_shot_logits.shape)}."
        )
    _check_temperature(temperature)
    check_choice("reduction", reduction, REDUCTIONS)
    # float16/bfloat16 are computed in float32; float64 stays float64.
    compute = torch.promote_types(logits.dtype, torch.float32)
    student = torch.log_softmax(logits.to(compute) / temperature, dim=-1)
    teacher = torch.log_softmax(zero_shot_logits.detach().to(compute) / temperature, dim=-1)
    probabilities = teacher.exp()
    # 0 * log 0 = 0: a class the teacher gives no mass costs nothing, even at -inf logits. A
    # NaN probability is not 0, so a NaN teacher stays NaN.
    pointwise = torch.where(
        probabilities == 0, torch.zeros_like(student), probabilities * (teacher - student)
    )
    per_sample = (temperature**2) * pointwise.sum(dim=-1)
    if average_over_classes:
        per_sample = per_sample / max(logits.shape[-1], 1)
    if reduction != "none" and per_sample.numel() == 0:
        return connected_zero(logits, zero_shot_logits)
    return reduce(per_sample, reduction).to(logits.dtype)
