"""Sub-prompt usage: a floor that keeps every sub-prompt alive, and reviving dead ones."""

from __future__ import annotations

import torch
from torch import Tensor

from promptmix._validation import (
    check_labels,
    check_positive,
    check_rank,
    check_simplex,
    check_subprompts,
    check_unit_interval,
)
from promptmix.functional._common import connected_zero
from promptmix.functional.entropy import class_mean_responsibilities


def usage_floor(
    responsibilities: Tensor,
    labels: Tensor | None = None,
    *,
    floor: float = 0.25,
    usage_prior: Tensor | None = None,
    prior_count: float = 0.0,
) -> Tensor:
    r"""Penalty on sub-prompts a class uses less than a floor; zero above it, so usage may differ.

    With $\bar u_c$ the mean responsibilities of class `c`'s images in the batch (blended with a
    running estimate $u_c$ worth `prior_count` images, as in `assignment_entropy`) and the floor
    $f = \text{floor} / K$, a share of the uniform usage:

    $$
    L = \frac{1}{|C_B|} \sum_{c \in C_B} \frac{1}{K} \sum_k
        \left(\frac{\max(0, f - \bar u_{ck})}{f}\right)^2
    $$

    A dead sub-prompt costs `1/K`, one at the floor or above costs nothing: unlike the marginal
    entropy, it does not push a class whose looks are 40/30/20/10 % towards 25 % each.

    Args:
        responsibilities: `(batch, K)` rows on the simplex, soft (with gradient) for the penalty
            to move the sub-prompts.
        labels: `(batch,)` integer class of each image; `None` treats the batch as one class.
        floor: `f * K` in `[0, 1]`: the floor as a share of the uniform usage `1/K`.
        usage_prior: `(num_classes, K)` running usage per class (simplex rows), or `None`.
        prior_count: weight `n_0 >= 0` of the prior, in images.

    Returns:
        A scalar in `[0, (K-1)/K]`; an empty batch, `K == 1` or `floor == 0` gives a
        graph-connected zero (so does a floor too small for the dtype).

    Examples:
        >>> gamma = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.8, 0.2], [0.7, 0.3]])
        >>> usage_floor(gamma, floor=0.25)  # usage (0.875, 0.125): at the floor 0.125
        tensor(0.)
        >>> usage_floor(torch.tensor([[1.0, 0.0]]), floor=0.5)  # a dead sub-prompt: 1/K
        tensor(0.5000)
    """
    check_rank("responsibilities", responsibilities, (2,), "(batch, K)")
    check_subprompts("responsibilities", responsibilities, -1)
    batch, k = responsibilities.shape
    check_unit_interval("floor", floor, closed_right=True)
    check_positive("prior_count", prior_count, allow_zero=True)
    num_classes = None
    if usage_prior is not None:
        check_rank("usage_prior", usage_prior, (2,), "(num_classes, K)")
        if usage_prior.shape[1] != k:
            raise ValueError(
                f"usage_prior must have shape (num_classes, {k}) to match responsibilities "
                f"but has shape {tuple(usage_prior.shape)}."
            )
        num_classes = usage_prior.shape[0]
    if labels is not None:
        check_labels("labels", labels, batch, num_classes)
    check_simplex("responsibilities", responsibilities)
    level = floor / k
    if batch == 0 or k == 1 or level < torch.finfo(responsibilities.dtype).tiny:
        return connected_zero(responsibilities)
    classes, means, counts = class_mean_responsibilities(responsibilities, labels)
    if usage_prior is not None and prior_count > 0:
        prior = usage_prior.detach().to(means.dtype)
        prior = prior[classes] if labels is not None else prior.mean(dim=0, keepdim=True)
        weight = (counts / (counts + prior_count)).unsqueeze(1)
        means = weight * means + (1 - weight) * prior
    return ((level - means).clamp_min(0) / level).pow(2).mean()


def revive_dead_subprompts(
    parameter: Tensor,
    usage: Tensor,
    *,
    min_share: float = 0.25,
    noise_std: float = 0.01,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Split the busiest sub-prompt of a class into any sub-prompt the class no longer uses.

    A sub-prompt is dead when its usage is below `min_share / K`. It takes a copy of the
    parameters of the class's busiest sub-prompt, and the two are pushed apart symmetrically,
    $\theta_{\text{busy}} \mp \epsilon$ and $\theta_{\text{dead}} = \theta_{\text{busy}} \pm
    \epsilon$ with $\epsilon$ Gaussian of std `noise_std` times the RMS of the busiest's entries,
    so each ends up with about half of the busiest's images. With several dead sub-prompts the
    busiest is split again, its usage halved at each split. The parameters can be anything
    indexed `(num_classes, K, ...)`: free features, `OffsetMixtureOfPrompts.offsets`,
    `MixtureOfPrompts.context` (class-specific).

    Args:
        parameter: `(num_classes, K, ...)` the learner's per-sub-prompt parameters.
        usage: `(num_classes, K)` usage per class (simplex rows; a NaN row, a class not seen,
            is left alone), e.g. `promptmix.diagnostics.subprompt_usage` of hard assignments.
        min_share: in `[0, 1]`, the usage below which a sub-prompt is dead, as a share of `1/K`.
        noise_std: relative size of the split, `>= 0`.
        generator: random generator of the split.

    Returns:
        `(new_parameter, revived)`: a new tensor (the input is not modified) and the
        `(num_classes, K)` boolean mask of the revived sub-prompts.

    Examples:
        >>> params = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        >>> new, revived = revive_dead_subprompts(params, torch.tensor([[1.0, 0.0]]), noise_std=0)
        >>> new, revived
        (tensor([[[1., 0.],
                 [1., 0.]]]), tensor([[False,  True]]))
    """
    if not isinstance(parameter, Tensor) or parameter.dim() < 2:
        raise ValueError(
            "parameter must be a tensor of shape (num_classes, K, ...) but is "
            f"{getattr(parameter, 'shape', type(parameter).__name__)}."
        )
    check_rank("usage", usage, (2,), "(num_classes, K)")
    if tuple(usage.shape) != tuple(parameter.shape[:2]):
        raise ValueError(
            f"usage must have shape {tuple(parameter.shape[:2])} (num_classes, K of parameter) "
            f"but has shape {tuple(usage.shape)}."
        )
    check_unit_interval("min_share", min_share, closed_right=True)
    check_positive("noise_std", noise_std, allow_zero=True)
    k = usage.shape[1]
    shares = usage.detach().float().cpu().clone()
    dead = shares < min_share / k  # NaN rows compare False: left alone
    new = parameter.detach().clone()
    revived = torch.zeros_like(dead)
    for label, index in dead.nonzero().tolist():
        alive = shares[label].clone()
        alive[dead[label] & ~revived[label]] = -1.0
        donor = int(alive.argmax())
        if alive[donor] <= 0:
            continue  # nothing in use to split
        row = new[label, donor]
        rms = row.float().pow(2).mean().sqrt()
        noise = torch.randn(row.shape, generator=generator, dtype=torch.float32) * noise_std
        epsilon = (noise * rms).to(row)
        new[label, index] = row + epsilon
        new[label, donor] = row - epsilon
        shares[label, donor] = shares[label, index] = alive[donor] / 2
        revived[label, index] = True
    return new, revived.to(usage.device)
