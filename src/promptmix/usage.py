"""Sub-prompt usage: one running estimate, a floor under it, and reviving dead sub-prompts.

`UsageEstimate` is the one running usage estimate of the package. `MixtureOfPromptsLoss` owns it
(`usage_estimate=`), updates it once per training step from the step's soft responsibilities and
hands it, as `usage_prior`, to every part that declares that input (`AssignmentEntropy`,
`UsageFloor`); `SubpromptReviver` reads and resets the same estimate.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from promptmix import functional as PF
from promptmix._validation import (
    check_int,
    check_positive,
    check_tensor,
    check_unit_interval,
)
from promptmix.functional.usage import DEFAULT_PRIOR_COUNT

__all__ = ["SubpromptReviver", "UsageEstimate", "UsageFloor"]


class UsageEstimate(nn.Module):
    r"""A running estimate of how much each class uses each sub-prompt, without host syncs.

    $u_c \leftarrow m\, u_c + (1 - m)\, \bar\gamma_c$ for every class $c$ in the batch, with
    $\bar\gamma_c$ the class's mean responsibilities (`promptmix.functional.running_usage`). It
    starts uniform and is a buffer, saved with the model. The update is one `index_add` over
    the `num_classes` rows: no `torch.unique`, no device-to-host synchronisation. The buffer
    follows the device of the responsibilities (and widens to their dtype) on first use, so a
    loss built on the CPU works on CUDA input without `.to(device)`.

    Give it to the loss, `MixtureOfPromptsLoss(usage_estimate=UsageEstimate(...))`, which
    updates it in training mode and hands `usage` to the parts that take `usage_prior`; or call
    `update` yourself.

    Args:
        num_classes: number of classes `>= 1`.
        n_subprompts: `K >= 1`.
        momentum: $m$ in `[0, 1)`.

    Examples:
        >>> import torch
        >>> estimate = UsageEstimate(num_classes=2, n_subprompts=2, momentum=0.5)
        >>> estimate.update(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
        >>> estimate.usage
        tensor([[0.7500, 0.2500],
                [0.5000, 0.5000]])
    """

    usage: Tensor

    def __init__(self, *, num_classes: int, n_subprompts: int, momentum: float = 0.9):
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes, minimum=1)
        self.n_subprompts = check_int("n_subprompts", n_subprompts, minimum=1)
        self.momentum = check_unit_interval("momentum", momentum)
        self.register_buffer("usage", torch.full((num_classes, n_subprompts), 1.0 / n_subprompts))

    def _check(self, responsibilities: Tensor) -> None:
        check_tensor("responsibilities", responsibilities)
        k = responsibilities.shape[-1] if responsibilities.dim() == 2 else None
        if k != self.n_subprompts:
            raise ValueError(
                f"responsibilities must have shape (batch, {self.n_subprompts}) for this "
                f"UsageEstimate(n_subprompts={self.n_subprompts}) but has shape "
                f"{tuple(responsibilities.shape)}; build the estimate with the learner's K."
            )

    def _follow(self, reference: Tensor) -> None:
        """Move the buffer to `reference`'s device, widened to its dtype if that is wider."""
        dtype = torch.promote_types(self.usage.dtype, reference.dtype)
        if self.usage.device != reference.device or self.usage.dtype != dtype:
            self.usage = self.usage.to(device=reference.device, dtype=dtype)

    def _prior(self, responsibilities: Tensor) -> Tensor:
        """The estimate as a usage prior for `responsibilities` `(batch, K)`: checked against
        their K, on their device (the buffer itself, a constant)."""
        self._check(responsibilities)
        self._follow(responsibilities)
        return self.usage

    @torch.no_grad()
    def update(self, responsibilities: Tensor, labels: Tensor) -> None:
        """Fold one batch's responsibilities `(batch, K)` of classes `labels` into the estimate.

        Raises:
            ValueError: If the responsibilities have another K than `n_subprompts`, or a label
                lies outside `[0, num_classes)` (on the CPU; elsewhere its row becomes NaN).
        """
        self._check(responsibilities)
        self._follow(responsibilities)
        if len(responsibilities):
            # A new tensor, not an in-place update: what the parts of this step were handed
            # (and anything that keeps it) still holds the estimate they used.
            self.usage = PF.running_usage(
                self.usage, responsibilities, labels, momentum=self.momentum
            )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, n_subprompts={self.n_subprompts}, "
            f"momentum={self.momentum}"
        )


class UsageFloor(nn.Module):
    r"""Penalty on sub-prompts a class uses less than `floor / K`, as an extra regularizer.

    The module twin of `promptmix.functional.usage_floor`, for `MixtureOfPromptsLoss`'s
    `regularizers={"usage": (UsageFloor(), weight)}`: it takes the loss's soft responsibilities
    (the E-step the loss runs once per step, with their gradient even when the loss's targets
    are hard), the labels and, when the loss has a `usage_estimate`, the running usage as
    `usage_prior`, which makes the floor meaningful with few images of a class per batch.

    Args:
        floor: the floor as a share of the uniform usage `1/K`, in `[0, 1]`.
        prior_count: weight of the usage prior, in images.

    Shape:
        - responsibilities: `(batch, K)` rows on the simplex.
        - labels: `(batch,)`, or `None` (one class).
        - usage_prior: `(num_classes, K)` simplex rows, or `None`.
        - output: scalar in `[0, (K-1)/K]`.

    Examples:
        >>> import torch
        >>> from promptmix import MixtureOfPromptsLoss
        >>> floor = UsageFloor(floor=0.5)
        >>> floor(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))  # sub-prompt 1 dead: 1/K
        tensor(0.5000)
        >>> prompts = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one class, K = 2
        >>> images = torch.tensor([[1.0, 0.0], [1.0, 0.1]])  # both images on sub-prompt 0
        >>> loss_fn = MixtureOfPromptsLoss(regularizers={"usage": (UsageFloor(), 1.0)})
        >>> sorted(loss_fn(images, prompts, torch.zeros(2, dtype=torch.long)))[-1]
        'usage'
    """

    #: What `MixtureOfPromptsLoss` passes to `forward`, by name.
    inputs: tuple[str, ...] = ("responsibilities", "labels", "usage_prior")

    def __init__(self, *, floor: float = 0.25, prior_count: float = DEFAULT_PRIOR_COUNT):
        super().__init__()
        self.floor = check_unit_interval("floor", floor, closed_right=True)
        self.prior_count = check_positive("prior_count", prior_count, allow_zero=True)

    def forward(
        self,
        responsibilities: Tensor,
        labels: Tensor | None = None,
        usage_prior: Tensor | None = None,
    ) -> Tensor:
        """The penalty; see the class docstring for shapes."""
        return PF.usage_floor(
            responsibilities,
            labels,
            usage_prior,
            floor=self.floor,
            prior_count=self.prior_count,
        )

    def extra_repr(self) -> str:
        return f"floor={self.floor}, prior_count={self.prior_count}"


class SubpromptReviver:
    """Revives the sub-prompts a `UsageEstimate` says are dead, by splitting busy ones.

    The stateful twin of `promptmix.functional.revive_dead_subprompts`. It reads the running
    usage of `usage_estimate` (the loss's, updated every training step; or one you update
    yourself) and, when `revive_` is called every few hundred steps with the learner's
    per-sub-prompt parameter, turns every sub-prompt used less than `min_share / K` into a split
    of its class's busiest one, in place, and gives the two halves of each split half of the
    busiest's usage in the estimate (rows stay on the simplex). The optimiser's state for the
    parameter is left as it is (Adam's moments of a revived entry are those of the dead one).

    `revive_` reads the estimate on the host (a periodic operation, not part of a training step)
    and checks everything before it changes anything: a parameter of another shape, or an
    estimate holding NaN (NaN features reached the loss), raise and leave both untouched.

    Args:
        usage_estimate: the running usage to read, e.g. `loss_fn.usage_estimate`.
        min_share: usage below `min_share / K` is dead, in `[0, 1]`.
        split_std: relative size of the split, `>= 0`.

    Examples:
        >>> import torch
        >>> estimate = UsageEstimate(num_classes=1, n_subprompts=2, momentum=0.0)
        >>> estimate.update(torch.tensor([[1.0, 0.0], [0.9, 0.1]]), torch.tensor([0, 0]))
        >>> prompts = torch.nn.Parameter(torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]]))
        >>> SubpromptReviver(estimate).revive_(prompts).tolist()
        [[False, True]]
        >>> estimate.usage
        tensor([[0.5000, 0.5000]])
    """

    def __init__(
        self,
        usage_estimate: UsageEstimate,
        *,
        min_share: float = 0.25,
        split_std: float = 0.01,
    ):
        if not isinstance(usage_estimate, UsageEstimate):
            raise TypeError(
                "usage_estimate must be a UsageEstimate (e.g. the loss's usage_estimate) but is "
                f"{type(usage_estimate).__name__}."
            )
        self.usage_estimate = usage_estimate
        self.min_share = check_unit_interval("min_share", min_share, closed_right=True)
        self.split_std = check_positive("split_std", split_std, allow_zero=True)

    @torch.no_grad()
    def revive_(self, parameter: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Split busy sub-prompts into dead ones, in place; returns the revived mask `(C, K)`.

        Raises:
            ValueError: If `parameter` is not `(num_classes, K, ...)` of the estimate, or the
                estimate holds NaN or inf; nothing is changed then.
        """
        check_tensor("parameter", parameter)
        usage = self.usage_estimate.usage
        if parameter.dim() < 2 or tuple(parameter.shape[:2]) != tuple(usage.shape):
            raise ValueError(
                f"parameter must have shape ({usage.shape[0]}, {usage.shape[1]}, ...) to match "
                f"the usage estimate (num_classes, K) but has shape {tuple(parameter.shape)}."
            )
        bad = ~torch.isfinite(usage).all(dim=1)
        if bool(bad.any()):
            classes = bad.nonzero().flatten().tolist()
            raise ValueError(
                f"the usage estimate holds NaN or inf for class(es) {classes[:10]} (NaN features "
                "reached the loss); nothing was revived."
            )
        new, revived, new_usage = PF.revive_dead_subprompts(
            parameter,
            usage,
            min_share=self.min_share,
            split_std=self.split_std,
            generator=generator,
        )
        parameter.copy_(new)
        self.usage_estimate.usage = new_usage
        return revived

    def __repr__(self) -> str:
        return (
            f"SubpromptReviver(usage_estimate={self.usage_estimate!r}, "
            f"min_share={self.min_share}, split_std={self.split_std})"
        )
