"""Argument checks shared by the functional API and the modules.

Every check raises a `ValueError` or `TypeError` whose message names the argument, what was
expected and what was given, so a wrong call fails at the call site instead of as a NaN later.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def check_tensor(name: str, value: object) -> Tensor:
    """Return `value` if it is a tensor, raise `TypeError` otherwise."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor but is {type(value).__name__}.")
    return value


def check_floating(name: str, value: object) -> Tensor:
    """Return `value` if it is a floating-point tensor."""
    tensor = check_tensor(name, value)
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor but has dtype {tensor.dtype}.")
    return tensor


def check_rank(name: str, value: object, ranks: Sequence[int], shape: str) -> Tensor:
    """Return `value` if it is a floating-point tensor of one of `ranks` dimensions.

    `shape` describes the expected layout for the message, e.g. `"(num_classes, K, dim)"`.
    """
    tensor = check_floating(name, value)
    if tensor.dim() not in ranks:
        raise ValueError(f"{name} must have shape {shape} but has shape {tuple(tensor.shape)}.")
    return tensor


def check_subprompts(name: str, tensor: Tensor, dim: int) -> None:
    """Raise `ValueError` unless `tensor` has `K >= 1` sub-prompts along `dim`."""
    if tensor.shape[dim] < 1:
        raise ValueError(
            f"{name} must have K >= 1 sub-prompts along dimension {dim} but has shape "
            f"{tuple(tensor.shape)}."
        )


def check_labels(name: str, labels: object, batch: int, num_classes: int | None) -> Tensor:
    """Return `labels` if it is an integer tensor of shape `(batch,)` with values in range."""
    tensor = check_tensor(name, labels)
    if tensor.dtype in (torch.bool,) or tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"{name} must be an integer tensor but has dtype {tensor.dtype}.")
    if tensor.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) but has shape {tuple(tensor.shape)}.")
    if tensor.numel() and num_classes is not None:
        low, high = int(tensor.min()), int(tensor.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"{name} must lie in [0, {num_classes - 1}] but ranges over [{low}, {high}]."
            )
    return tensor


def check_simplex(name: str, probabilities: Tensor) -> None:
    """Raise `ValueError` unless every row of `probabilities` is on the probability simplex.

    The tolerance grows with the dtype's rounding error, so float16/bfloat16 softmax rows pass.
    """
    if probabilities.numel() == 0:
        return
    atol = max(1e-3, 2 * probabilities.shape[-1] * torch.finfo(probabilities.dtype).eps)
    values = probabilities.detach().float()
    if not torch.isfinite(values).all():
        raise ValueError(f"{name} must be finite but contains NaN or inf.")
    if (values < -atol).any():
        raise ValueError(f"{name} must be non-negative but has minimum {values.min().item():.4g}.")
    row_sums = values.sum(dim=-1)
    worst = (row_sums - 1).abs().max().item()
    if worst > atol:
        raise ValueError(
            f"{name} rows must sum to 1 (within {atol}) but one row sums to "
            f"{row_sums.flatten()[(row_sums - 1).abs().flatten().argmax()].item():.4g}."
        )


def check_positive(name: str, value: object, *, allow_zero: bool = False) -> float:
    """Return `value` as a float if it is a finite real number `> 0` (or `>= 0`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number but is {type(value).__name__}.")
    number = float(value)
    bound_ok = number >= 0 if allow_zero else number > 0
    if not math.isfinite(number) or not bound_ok:
        interval = "[0, inf)" if allow_zero else "(0, inf)"
        raise ValueError(f"{name} must be in {interval} but is {value}.")
    return number


def check_int(name: str, value: object, *, minimum: int) -> int:
    """Return `value` if it is an `int` `>= minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int but is {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum} but is {value}.")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return `value` if it is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))} but is {value!r}.")
    return str(value)


def check_unit_interval(name: str, value: object, *, closed_right: bool = False) -> float:
    """Return `value` if it is a real number in `[0, 1)` (or `[0, 1]`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number but is {type(value).__name__}.")
    number = float(value)
    ok = 0 <= number <= 1 if closed_right else 0 <= number < 1
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{']' if closed_right else ')'} but is {value}.")
    return number
