"""Shared names of the functional API: mode lists, defaults, a graph-connected zero, `_unit`."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from promptmix._validation import SUBPROMPT_SHAPE

__all__ = [
    "AGGREGATIONS",
    "ASSIGNMENT_MODES",
    "DEFAULT_LOGIT_SCALE",
    "DEFAULT_TAU",
    "ENTROPY_MODES",
    "REDUCTIONS",
    "SCHEDULE_KINDS",
    "SUBPROMPT_SHAPE",
    "Aggregation",
    "AssignmentMode",
    "EntropyMode",
    "Reduction",
    "ScheduleKind",
    "connected_zero",
    "reduce",
]

Reduction = Literal["mean", "sum", "none"]
EntropyMode = Literal["sample", "marginal", "mutual_information"]
AssignmentMode = Literal["soft", "hard", "sinkhorn"]
Aggregation = Literal["logsumexp", "max", "mean", "responsibility"]
ScheduleKind = Literal["linear", "cosine", "exponential"]

REDUCTIONS = ("mean", "sum", "none")
ENTROPY_MODES = ("sample", "marginal", "mutual_information")
ASSIGNMENT_MODES = ("soft", "hard", "sinkhorn")
AGGREGATIONS = ("logsumexp", "max", "mean", "responsibility")
SCHEDULE_KINDS = ("linear", "cosine", "exponential")

#: The E-step temperature wherever one is not given: the end of the recommended schedule
#: (`TemperatureSchedule()`, 1 -> 0.3) and the loss's fixed `tau`.
DEFAULT_TAU = 0.3
#: The cosine-to-logit factor wherever one is not given: CLIP's trained `logit_scale.exp()`.
DEFAULT_LOGIT_SCALE = 100.0


def reduce(values: Tensor, reduction: Reduction) -> Tensor:
    """`values` as they are (`"none"`), or their mean or sum: the one reduction vocabulary."""
    if reduction == "none":
        return values
    return values.mean() if reduction == "mean" else values.sum()


def connected_zero(*tensors: Tensor) -> Tensor:
    """A scalar zero that is part of the graph of `tensors`, so `backward()` never fails.

    It is `sum((t * 0).sum())`, so it is NaN when any of `tensors` holds NaN or inf: a term
    switched off or empty never turns bad input into a finite loss.

    Examples:
        >>> x = torch.ones(2, 3, requires_grad=True)
        >>> zero = connected_zero(x)
        >>> zero.backward(); zero.item(), x.grad.abs().sum().item()
        (0.0, 0.0)
    """
    return sum((t * 0).sum() for t in tensors)  # type: ignore[return-value]


def _dense_groups(labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
    """`(batch,)` group of each row in `[0, batch)`: rows with equal labels share a group.

    Sorting rather than `torch.unique`, whose output size lives on the host (a device-to-host
    synchronisation on CUDA): groups index a table of `batch` rows, of which the first
    `number of distinct labels` are used and the rest stay empty.
    """
    if labels is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    sorted_labels, order = labels.sort(stable=True)
    starts = torch.ones_like(sorted_labels)
    starts[1:] = (sorted_labels[1:] != sorted_labels[:-1]).to(starts.dtype)
    ids = starts.cumsum(0) - 1
    return torch.empty_like(ids).scatter_(0, order, ids)


def _group_sums(values: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """`(num_groups, ...)`: the sum of `values` `(batch, ...)` over the rows of each group."""
    table = values.new_zeros((num_groups, *values.shape[1:]))
    return table.index_add(0, groups, values)


def _unit(features: Tensor) -> Tensor:
    """L2-normalise the last dimension; a zero vector maps to zero, with zero gradient.

    "Zero" includes vectors shorter than `1 / sqrt(finfo(dtype).max)` (5e-20 in float32,
    4e-3 in float16), whose gradient `1 / |x|` would overflow.

    A vector holding NaN or inf maps to NaN, so bad input stays visible downstream; a large
    finite vector is scaled by its largest entry before its norm is taken, so it cannot overflow.

    Not `F.normalize`: its `eps = 1e-12` rounds to 0 in float16 (a zero vector gives
    `0 / 0 = NaN`), and any `eps` gives a zero vector the gradient `1 / eps`, which
    overflows float16 and is ~1e12 in float32. A zero vector has no direction to move along.
    """
    # Divide by the largest entry first, so the norm of a large finite vector (1e20 in float32)
    # cannot overflow to inf and turn the vector into zero. `x / |x|` does not depend on that
    # factor, so it is detached: its gradient would only add terms that cancel.
    peak = features.detach().abs().amax(dim=-1, keepdim=True)
    has_peak = peak != 0
    scaled = features / torch.where(has_peak, peak, torch.ones_like(peak))
    norm = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)
    # The gradient of `x / |x|` is of size `1 / |x|`: a vector shorter than `1 / sqrt(max)` of
    # its dtype has no direction whose gradient the dtype can hold, and counts as zero. Written
    # as `~(... < ...)` so that NaN (which compares False) takes the division branch and stays.
    shortest = torch.finfo(features.dtype).max ** -0.5
    nonzero = ~(peak * norm < shortest)
    unit = scaled / torch.where(nonzero, norm, torch.ones_like(norm))
    return torch.where(nonzero, unit, torch.zeros_like(unit))
