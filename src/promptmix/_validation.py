"""Argument checks shared by the functional API and the modules.

Every check raises a `ValueError` or `TypeError` whose message names the argument, what was
expected and what was given, so a wrong call fails at the call site instead of as a NaN later.

**Non-finite input** (the policy of `docs/reliability.md`): a function either raises one of these
named errors or returns a non-finite result, never a finite one. Checks of *values* (label range,
simplex rows, a tensor `logit_scale`) read the tensor on the host, which is free for CPU tensors
and a device-to-host synchronisation anywhere else; so they raise only where `reads_host` allows,
and elsewhere the same condition turns the affected rows (or the result) into NaN on the device.
Checks of shapes and dtypes are always free and always raise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "HOST_CHECKS",
    "SUBPROMPT_SHAPE",
    "as_subprompts",
    "check_choice",
    "check_finite",
    "check_floating",
    "check_int",
    "check_label_range",
    "check_labels",
    "check_logit_scale",
    "check_positive",
    "check_rank",
    "check_score_range",
    "check_simplex",
    "check_subprompts",
    "check_tensor",
    "check_unit_interval",
    "clamp_labels",
    "labels_out_of_range",
    "nan_where",
    "reads_host",
    "simplex_tolerance",
]

#: The shape of sub-prompt features everywhere: `(C, K, D)`, or `(C, D)` for one prompt per class.
SUBPROMPT_SHAPE = "(num_classes, K, dim) or (num_classes, dim)"

#: Whether value checks may read tensors on the host at all. Tests set it to `False` to take the
#: path a GPU takes (device-side NaN propagation) on CPU tensors.
HOST_CHECKS = True


def reads_host(tensor: Tensor) -> bool:
    """Whether a value check may read `tensor` on the host: only CPU tensors, where it is free."""
    return HOST_CHECKS and tensor.device.type == "cpu"


def nan_where(invalid: Tensor, value: Tensor) -> Tensor:
    """`value` with NaN wherever `invalid` (broadcast) holds: a device-side check, no sync."""
    return torch.where(invalid, torch.full_like(value, float("nan")), value)


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


def as_subprompts(name: str, value: object, shape: str = SUBPROMPT_SHAPE) -> Tensor:
    """`value` as a floating-point `(rows, K, dim)` tensor with `K >= 1`: `(rows, dim)` is `K = 1`.

    The one place where the package's shape convention for sub-prompt features is applied.
    """
    tensor = check_rank(name, value, (2, 3), shape)
    tensor = tensor.unsqueeze(1) if tensor.dim() == 2 else tensor
    check_subprompts(name, tensor, 1)
    return tensor


def check_finite(name: str, tensor: Tensor) -> Tensor:
    """Return `tensor` if every entry is finite, else raise `ValueError` (reads the host).

    Only for functions that read their inputs on the host anyway (set-up and reports: k-means,
    initialisation, reviving, diagnostics); a training step propagates NaN instead.
    """
    if not bool(torch.isfinite(tensor.detach()).all()):
        raise ValueError(f"{name} must be finite but holds NaN or inf.")
    return tensor


def check_labels(name: str, labels: object, batch: int, num_classes: int | None) -> Tensor:
    """Return `labels` as `torch.long` class indices if it is an integer tensor of shape `(batch,)`.

    Every integer dtype (`uint8`, `int8`, `int16`, `int32`, `int64`, ...) is converted to `long`,
    so a `uint8` tensor is never taken for a boolean mask. The range `[0, num_classes)` is checked
    only where `reads_host` allows; elsewhere see `labels_out_of_range`.
    """
    if isinstance(labels, (list, tuple)):
        raise TypeError(
            f"{name} must be an integer torch.Tensor but is a {type(labels).__name__}; "
            "convert it with torch.as_tensor."
        )
    tensor = check_tensor(name, labels)
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"{name} must be an integer tensor but has dtype {tensor.dtype}.")
    if tensor.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) but has shape {tuple(tensor.shape)}.")
    if tensor.numel() and reads_host(tensor):
        low, high = int(tensor.min()), int(tensor.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            upper = "inf)" if num_classes is None else f"{num_classes - 1}]"
            raise ValueError(f"{name} must lie in [0, {upper} but ranges over [{low}, {high}].")
    return tensor.long()


def check_label_range(name: str, labels: Tensor, num_classes: int, what: str = "") -> None:
    """Raise if `labels` leave `[0, num_classes)`, reading them on the host on every device.

    For set-up functions and reports, which read their inputs on the host anyway; `what` says
    what the classes are, in the message.
    """
    if labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"{name} must lie in [0, {num_classes - 1}]{what} but ranges over [{low}, {high}]."
            )


def labels_out_of_range(labels: Tensor, num_classes: int | None) -> Tensor:
    """`(batch,)` bool: which labels lie outside `[0, num_classes)`, computed on the device."""
    if num_classes is None:
        return labels < 0
    return (labels < 0) | (labels >= num_classes)


def clamp_labels(labels: Tensor, num_classes: int) -> Tensor:
    """Labels clamped into `[0, num_classes)` so indexing cannot fail or wrap around.

    Used only with `labels_out_of_range`, which makes the rows of such labels NaN.
    """
    return labels.clamp(0, max(num_classes - 1, 0))


def simplex_tolerance(probabilities: Tensor) -> float:
    """Tolerance of the simplex check: grows with the dtype's rounding error."""
    return max(1e-3, 2 * probabilities.shape[-1] * torch.finfo(probabilities.dtype).eps)


def check_simplex(
    name: str, probabilities: Tensor, *, non_finite: str = "propagate", on_host: bool = False
) -> Tensor:
    """Return `probabilities` if every finite row lies on the probability simplex.

    The tolerance grows with the dtype's rounding error, so float16/bfloat16 softmax rows pass.
    Where `reads_host` allows (or `on_host=True`, for functions that read the host anyway, such
    as the diagnostics), a finite row off the simplex raises `ValueError`; elsewhere the
    returned tensor has NaN in such rows (a device-side check, no sync): use the result. Rows
    holding NaN or inf are returned as they are (`non_finite="propagate"`: the result will be
    non-finite, e.g. from NaN features upstream) or raise (`non_finite="raise"`).
    """
    if probabilities.numel() == 0:
        return probabilities
    atol = simplex_tolerance(probabilities)
    values = probabilities.detach().float()
    if non_finite == "raise" and not torch.isfinite(values).all():
        raise ValueError(f"{name} must be finite but contains NaN or inf.")
    if not (on_host or reads_host(probabilities)):
        invalid = (values < -atol).any(dim=-1) | ((values.sum(dim=-1) - 1).abs() > atol)
        return nan_where(invalid.unsqueeze(-1), probabilities)
    finite_rows = torch.isfinite(values).all(dim=-1)
    values = values[finite_rows]
    if values.numel() == 0:
        return probabilities
    if (values < -atol).any():
        raise ValueError(f"{name} must be non-negative but has minimum {values.min().item():.4g}.")
    row_sums = values.sum(dim=-1)
    worst = (row_sums - 1).abs().max().item()
    if worst > atol:
        raise ValueError(
            f"{name} rows must sum to 1 (within {atol}) but one row sums to "
            f"{row_sums.flatten()[(row_sums - 1).abs().flatten().argmax()].item():.4g}."
        )
    return probabilities


def check_logit_scale(value: object) -> float | Tensor:
    """Return `logit_scale` if it is a finite number `> 0` or a one-element tensor holding one.

    A tensor (e.g. CLIP's `logit_scale.exp()`, 0-dim) must have one element (`()` or `(1,)`);
    it is returned 0-dim. Its value is checked where `reads_host` allows; elsewhere a
    non-positive or non-finite value becomes NaN on the device, so the logits are NaN.
    """
    if not isinstance(value, Tensor):
        return check_positive("logit_scale", value)
    if value.numel() != 1 or value.dim() > 1:
        raise ValueError(
            "logit_scale must be a number or a tensor of shape () or (1,) but has shape "
            f"{tuple(value.shape)}."
        )
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"logit_scale must be a real tensor but has dtype {value.dtype}.")
    scale = value.reshape(())
    if reads_host(scale):
        number = float(scale.detach())
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"logit_scale must be in (0, inf) but is {number}.")
        return scale
    return nan_where(~(torch.isfinite(scale) & (scale > 0)), scale)


def check_score_range(tau: float, scale: float) -> float:
    """Return `scale / tau` if the scores `logit_scale * cos / tau` fit in float32.

    The E-step computes its scores in float32 (or float64) whatever the input dtype, so a
    small `tau` cannot overflow float16; a `tau` so small that even float32 overflows is a
    `tau` problem, and the error says so.
    """
    ratio = scale / tau
    limit = torch.finfo(torch.float32).max
    if not math.isfinite(ratio) or ratio > limit:
        raise ValueError(
            f"tau must be >= logit_scale / {limit:.3g} = {scale / limit:.3g} (the scores "
            f"logit_scale * cos / tau must fit in float32) but is {tau} with logit_scale {scale}."
        )
    return ratio


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
