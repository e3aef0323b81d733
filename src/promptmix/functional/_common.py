"""Shared names of the functional API: mode lists, a graph-connected zero, `_unit`."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

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

SUBPROMPT_SHAPE = "(num_classes, K, dim)"


def connected_zero(*tensors: Tensor) -> Tensor:
    """A scalar zero that is part of the graph of `tensors`, so `backward()` never fails.

    Examples:
        >>> x = torch.ones(2, 3, requires_grad=True)
        >>> zero = connected_zero(x)
        >>> zero.backward(); zero.item(), x.grad.abs().sum().item()
        (0.0, 0.0)
    """
    return sum((t * 0).sum() for t in tensors)  # type: ignore[return-value]


def _unit(features: Tensor) -> Tensor:
    """L2-normalise the last dimension; a zero vector maps to zero, with zero gradient.

    Not `F.normalize`: its `eps = 1e-12` rounds to 0 in float16 (a zero vector gives
    `0 / 0 = NaN`), and any `eps` gives a zero vector the gradient `1 / eps`, which
    overflows float16 and is ~1e12 in float32. A zero vector has no direction to move along.
    """
    norm = torch.linalg.vector_norm(features, dim=-1, keepdim=True)
    nonzero = norm > 0
    unit = features / torch.where(nonzero, norm, torch.ones_like(norm))
    return torch.where(nonzero, unit, torch.zeros_like(unit))

