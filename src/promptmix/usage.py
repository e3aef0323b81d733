"""`UsageFloor` and `SubpromptReviver`: keep every sub-prompt in use without forcing equal usage."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from promptmix import functional as PF
from promptmix._validation import check_int, check_positive, check_unit_interval

__all__ = ["SubpromptReviver", "UsageFloor"]


class UsageFloor(nn.Module):
    r"""Penalty on sub-prompts a class uses less than `floor / K`, as an extra regularizer.

    The module twin of `promptmix.functional.usage_floor`, for `MixtureOfPromptsLoss`'s
    `regularizers={"usage": (UsageFloor(), weight)}`: it takes the loss's `image_features`,
    `subprompt_features` and `labels`, computes soft responsibilities
    $\operatorname{softmax}_k(s \cos / \tau)$ at its own fixed `tau` and `scale` (so the penalty
    has a gradient even when the loss's E-step is hard), and penalises each class's mean usage
    below the floor. Give `num_classes` and `n_subprompts` to blend in a running usage estimate
    (a buffer, as in `AssignmentEntropy`), which makes the floor meaningful with few images of a
    class per batch.

    Args:
        floor: the floor as a share of the uniform usage `1/K`, in `[0, 1]`.
        tau: temperature of the responsibilities, `> 0`.
        scale: similarity scale `s > 0`.
        num_classes: number of classes, to keep a running usage estimate.
        n_subprompts: `K`, with `num_classes`.
        momentum: EMA momentum of the usage estimate, in `[0, 1)`.
        prior_count: weight of the usage estimate, in images.

    Shape:
        - image_features: `(batch, dim)`.
        - subprompt_features: `(num_classes, K, dim)`.
        - labels: `(batch,)`.
        - output: scalar in `[0, (K-1)/K]`.

    Examples:
        >>> import torch
        >>> from promptmix import MixtureOfPromptsLoss
        >>> floor = UsageFloor(floor=0.5)
        >>> prompts = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one class, K = 2
        >>> images = torch.tensor([[1.0, 0.0], [1.0, 0.1]])  # both images on sub-prompt 0
        >>> floor(images, prompts, torch.zeros(2, dtype=torch.long))
        tensor(0.5000)
        >>> loss_fn = MixtureOfPromptsLoss(regularizers={"usage": (UsageFloor(), 1.0)})
        >>> sorted(loss_fn(images, prompts, torch.zeros(2, dtype=torch.long)))[-1]
        'usage'
    """

    inputs = ("image_features", "subprompt_features", "labels")
    usage: Tensor | None

    def __init__(
        self,
        floor: float = 0.25,
        *,
        tau: float = 1.0,
        scale: float = 100.0,
        num_classes: int | None = None,
        n_subprompts: int | None = None,
        momentum: float = 0.9,
        prior_count: float = 4.0,
    ):
        super().__init__()
        self.floor = check_unit_interval("floor", floor, closed_right=True)
        self.tau = check_positive("tau", tau)
        self.scale = check_positive("scale", scale)
        self.momentum = check_unit_interval("momentum", momentum)
        self.prior_count = check_positive("prior_count", prior_count, allow_zero=True)
        if (num_classes is None) != (n_subprompts is None):
            raise ValueError(
                "num_classes and n_subprompts must be given together (to keep a running usage "
                f"estimate) but got num_classes={num_classes}, n_subprompts={n_subprompts}."
            )
        usage = None
        if num_classes is not None and n_subprompts is not None:
            check_int("num_classes", num_classes, minimum=1)
            check_int("n_subprompts", n_subprompts, minimum=1)
            usage = torch.full((num_classes, n_subprompts), 1.0 / n_subprompts)
        self.register_buffer("usage", usage)

    def forward(self, image_features: Tensor, subprompt_features: Tensor, labels: Tensor) -> Tensor:
        """The penalty; see the class docstring for shapes."""
        soft = PF.responsibilities(
            image_features, subprompt_features, labels, tau=self.tau, scale=self.scale
        )
        value = PF.usage_floor(
            soft,
            labels,
            floor=self.floor,
            usage_prior=self.usage,
            prior_count=self.prior_count if self.usage is not None else 0.0,
        )
        if self.usage is not None and self.training and len(soft):
            with torch.no_grad():
                classes, means, _ = PF.class_mean_responsibilities(soft.detach(), labels)
                current = self.usage[classes]
                self.usage[classes] = self.momentum * current + (1 - self.momentum) * means.to(
                    current
                )
        return value

    def extra_repr(self) -> str:
        return f"floor={self.floor}, tau={self.tau}, scale={self.scale}"


class SubpromptReviver(nn.Module):
    """Tracks each class's hard sub-prompt usage and revives dead sub-prompts by splitting.

    The module twin of `promptmix.functional.revive_dead_subprompts`. Call `observe` every step
    with the images, the sub-prompt features and the labels (it keeps an exponential moving
    average of each class's argmax usage, a buffer saved with the model), and `revive_` every few
    hundred steps with the learner's per-sub-prompt parameter: every sub-prompt used less than
    `min_share / K` becomes a split of its class's busiest one. The optimiser's state for the
    parameter is left as it is (Adam's moments of a revived entry are those of the dead one).

    Args:
        num_classes: number of classes.
        n_subprompts: `K`.
        min_share: usage below `min_share / K` is dead, in `[0, 1]`.
        momentum: EMA momentum of the usage, in `[0, 1)`.
        noise_std: relative size of the split.

    Examples:
        >>> import torch
        >>> reviver = SubpromptReviver(1, 2, momentum=0.0)
        >>> prompts = torch.nn.Parameter(torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]]))
        >>> images = torch.tensor([[1.0, 0.2], [1.0, -0.2]])
        >>> reviver.observe(images, prompts, torch.zeros(2, dtype=torch.long))
        >>> reviver.revive_(prompts).tolist()
        [[False, True]]
    """

    usage: Tensor

    def __init__(
        self,
        num_classes: int,
        n_subprompts: int,
        *,
        min_share: float = 0.25,
        momentum: float = 0.9,
        noise_std: float = 0.01,
    ):
        super().__init__()
        check_int("num_classes", num_classes, minimum=1)
        self.n_subprompts = check_int("n_subprompts", n_subprompts, minimum=1)
        self.min_share = check_unit_interval("min_share", min_share, closed_right=True)
        self.momentum = check_unit_interval("momentum", momentum)
        self.noise_std = check_positive("noise_std", noise_std, allow_zero=True)
        self.register_buffer("usage", torch.full((num_classes, n_subprompts), 1.0 / n_subprompts))

    @torch.no_grad()
    def observe(self, image_features: Tensor, subprompt_features: Tensor, labels: Tensor) -> None:
        """Update the usage estimate with the argmax sub-prompt of each image."""
        own = PF.own_class_similarities(image_features, subprompt_features.detach(), labels)
        hard = F.one_hot(own.argmax(dim=-1), self.n_subprompts).to(self.usage.dtype)
        classes, means, _ = PF.class_mean_responsibilities(hard, labels)
        current = self.usage[classes]
        self.usage[classes] = self.momentum * current + (1 - self.momentum) * means.to(current)

    @torch.no_grad()
    def revive_(self, parameter: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Split busy sub-prompts into dead ones, in place; returns the revived mask `(C, K)`."""
        new, revived = PF.revive_dead_subprompts(
            parameter,
            self.usage,
            min_share=self.min_share,
            noise_std=self.noise_std,
            generator=generator,
        )
        parameter.copy_(new)
        # A split shares its donor's usage until the next observations say otherwise.
        for label, index in revived.nonzero().tolist():
            self.usage[label, index] = 1.0 / self.n_subprompts
        return revived

    def extra_repr(self) -> str:
        return f"min_share={self.min_share}, momentum={self.momentum}, noise_std={self.noise_std}"
