"""Sub-prompt usage: its running estimate, the prior blend, a floor, and reviving dead sub-prompts.

A class's *usage* is its mean responsibility per sub-prompt, a row of the simplex. Everything
here that runs in a training step groups rows with fixed-size tables (`index_add` over the
classes, or over the batch), never `torch.unique`: no device-to-host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from promptmix._validation import (
    check_finite,
    check_labels,
    check_positive,
    check_rank,
    check_simplex,
    check_subprompts,
    check_unit_interval,
    clamp_labels,
    labels_out_of_range,
    nan_where,
    reads_host,
)
from promptmix.functional._common import _dense_groups, _group_sums, connected_zero

__all__ = [
    "revive_dead_subprompts",
    "running_usage",
    "usage_floor",
]

#: How many images a running usage estimate counts as in a class mean, unless told otherwise.
DEFAULT_PRIOR_COUNT = 4.0


def _check_usage_prior(usage_prior: Tensor, k: int, against: str) -> Tensor:
    """Return `usage_prior` if it is `(num_classes, k)` with rows on the simplex (see
    `check_simplex` for when values are checked: off the CPU, bad rows become NaN)."""
    check_rank("usage_prior", usage_prior, (2,), "(num_classes, K)")
    if usage_prior.shape[1] != k:
        raise ValueError(
            f"usage_prior must have shape (num_classes, {k}) to match {against} but has shape "
            f"{tuple(usage_prior.shape)}."
        )
    if usage_prior.shape[0] < 1:
        raise ValueError("usage_prior must have at least one class row but has shape (0, K).")
    return check_simplex("usage_prior", usage_prior)


def _checked_inputs(
    responsibilities: Tensor, labels: Tensor | None, usage_prior: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Validated `(responsibilities, labels, usage_prior)` of a usage-based term.

    Shapes and dtypes raise; values (simplex rows, labels within the prior's classes) raise on
    the CPU and make the affected rows NaN elsewhere (`docs/reliability.md`).
    """
    check_rank("responsibilities", responsibilities, (2,), "(batch, K)")
    check_subprompts("responsibilities", responsibilities, -1)
    batch, k = responsibilities.shape
    num_classes = None
    if usage_prior is not None:
        usage_prior = _check_usage_prior(usage_prior, k, "responsibilities")
        num_classes = usage_prior.shape[0]
    if labels is not None:
        labels = check_labels("labels", labels, batch, num_classes)
        if num_classes is not None and not reads_host(labels):
            invalid = labels_out_of_range(labels, num_classes)
            responsibilities = nan_where(invalid.unsqueeze(1), responsibilities)
            labels = clamp_labels(labels, num_classes)
    responsibilities = check_simplex("responsibilities", responsibilities)
    return responsibilities, labels, usage_prior


def _class_means(
    responsibilities: Tensor,
    labels: Tensor | None,
    usage_prior: Tensor | None,
    prior_count: float,
    per_row: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    r"""Per group of equal labels, with no host sync: `(present, usage, row_means)`.

    The one place where a class's batch usage is blended with its running estimate:
    `usage` `(G, K)` is $(\sum_{b \in c} \gamma_b + n_0 u_c) / (n_c + n_0)$ with
    $n_0$ = `prior_count` (the plain mean without a prior; $u_c$ is a constant). `present`
    `(G,)` marks the groups that hold rows (`G = batch`, or 1 without labels) and `row_means`
    `(G,)` is the per-group mean of `per_row` `(batch,)`.
    """
    batch = responsibilities.shape[0]
    groups = _dense_groups(labels, batch, responsibilities.device)
    num_groups = batch if labels is not None else 1
    counts = _group_sums(responsibilities.new_ones(batch), groups, num_groups)
    denominator = counts.clamp_min(1)
    means = _group_sums(responsibilities, groups, num_groups) / denominator.unsqueeze(1)
    if usage_prior is not None and prior_count > 0:
        rows = usage_prior.detach().to(means.dtype)
        if labels is None:
            prior = rows.mean(dim=0, keepdim=True)
        else:
            prior = _group_sums(rows[labels], groups, num_groups) / denominator.unsqueeze(1)
        weight = (counts / (counts + prior_count)).unsqueeze(1)
        means = weight * means + (1 - weight) * prior
    row_means = None
    if per_row is not None:
        row_means = _group_sums(per_row, groups, num_groups) / denominator
    return counts > 0, means, row_means


def _mean_over_present(values: Tensor, present: Tensor) -> Tensor:
    """Mean of `values` `(G,)` over the present groups."""
    weights = present.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1)


def running_usage(
    usage: Tensor, responsibilities: Tensor, labels: Tensor, *, momentum: float = 0.9
) -> Tensor:
    r"""The running usage estimate after one more batch: an EMA of each present class's usage.

    $$
    u_c \leftarrow m\, u_c + (1 - m)\, \frac{1}{n_c} \sum_{b \in c} \gamma_b
    \quad \text{for every class } c \text{ with } n_c > 0 \text{ images in the batch}
    $$

    Classes without an image keep their row. Fixed shapes throughout (an `index_add` over the
    `num_classes` rows of `usage`), so it never synchronises the device with the host. NaN
    responsibilities make their class's row NaN; a label outside `[0, num_classes)` raises on
    the CPU and makes the row it is clamped into NaN elsewhere.

    Args:
        usage: `(num_classes, K)` the current estimate (simplex rows).
        responsibilities: `(batch, K)` the batch's responsibilities (treated as constants).
        labels: `(batch,)` integer classes.
        momentum: $m$ in `[0, 1)`.

    Returns:
        `(num_classes, K)`, a new tensor in the dtype of `usage`.

    Examples:
        >>> usage = torch.full((2, 2), 0.5)
        >>> running_usage(usage, torch.tensor([[1.0, 0.0]]), torch.tensor([1]), momentum=0.5)
        tensor([[0.5000, 0.5000],
                [0.7500, 0.2500]])
    """
    check_rank("usage", usage, (2,), "(num_classes, K)")
    check_rank("responsibilities", responsibilities, (2,), "(batch, K)")
    num_classes, k = usage.shape
    if responsibilities.shape[1] != k:
        raise ValueError(
            f"responsibilities must have shape (batch, {k}) to match usage "
            f"{tuple(usage.shape)} but has shape {tuple(responsibilities.shape)}."
        )
    labels = check_labels("labels", labels, responsibilities.shape[0], num_classes)
    check_unit_interval("momentum", momentum)
    with torch.no_grad():
        rows = responsibilities.detach().to(usage.dtype)
        if not reads_host(labels):
            rows = nan_where(labels_out_of_range(labels, num_classes).unsqueeze(1), rows)
            labels = clamp_labels(labels, num_classes)
        sums = usage.new_zeros(usage.shape).index_add(0, labels, rows)
        counts = usage.new_zeros(num_classes).index_add(0, labels, usage.new_ones(len(labels)))
        means = sums / counts.clamp_min(1).unsqueeze(1)
        updated = momentum * usage + (1 - momentum) * means
        return torch.where((counts > 0).unsqueeze(1), updated, usage)


def usage_floor(
    responsibilities: Tensor,
    labels: Tensor | None = None,
    usage_prior: Tensor | None = None,
    *,
    floor: float = 0.25,
    prior_count: float = DEFAULT_PRIOR_COUNT,
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
    entropy, it does not push a class whose looks are 40/30/20/10 % towards 25 % each. No
    device-to-host synchronisation.

    Args:
        responsibilities: `(batch, K)` rows on the simplex, soft (with gradient) for the penalty
            to move the sub-prompts.
        labels: `(batch,)` integer class of each image; `None` treats the batch as one class.
        usage_prior: `(num_classes, K)` running usage per class (simplex rows), or `None`.
        floor: `f * K` in `[0, 1]`: the floor as a share of the uniform usage `1/K`.
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
    check_unit_interval("floor", floor, closed_right=True)
    check_positive("prior_count", prior_count, allow_zero=True)
    responsibilities, labels, usage_prior = _checked_inputs(responsibilities, labels, usage_prior)
    batch, k = responsibilities.shape
    level = floor / k
    if batch == 0 or k == 1 or level < torch.finfo(responsibilities.dtype).tiny:
        return connected_zero(responsibilities)
    present, means, _ = _class_means(responsibilities, labels, usage_prior, prior_count)
    per_class = ((level - means).clamp_min(0) / level).pow(2).mean(dim=-1)
    return _mean_over_present(per_class, present)


def revive_dead_subprompts(
    parameter: Tensor,
    usage: Tensor,
    *,
    min_share: float = 0.25,
    split_std: float = 0.01,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Split the busiest sub-prompt of a class into any sub-prompt the class no longer uses.

    A sub-prompt is dead when its usage is below `min_share / K`. It takes a copy of the
    parameters of the class's busiest sub-prompt, and the two are pushed apart symmetrically,
    $\theta_{\text{busy}} \mp \epsilon$ and $\theta_{\text{dead}} = \theta_{\text{busy}} \pm
    \epsilon$ with $\epsilon$ Gaussian of std `split_std` times the RMS of the busiest's entries,
    so each ends up with about half of the busiest's images. With several dead sub-prompts the
    busiest is split again, its usage halved at each split. The parameters can be anything
    indexed `(num_classes, K, ...)`: free features, `OffsetMixtureOfPrompts.offsets`,
    `MixtureOfPrompts.context` (class-specific). Reads `usage` on the host (a periodic
    operation, not part of a training step).

    Args:
        parameter: `(num_classes, K, ...)` the learner's per-sub-prompt parameters.
        usage: `(num_classes, K)` usage per class (simplex rows; a NaN row, a class not seen,
            is left alone), e.g. a `UsageEstimate`'s, or `promptmix.diagnostics.subprompt_usage`.
        min_share: in `[0, 1]`, the usage below which a sub-prompt is dead, as a share of `1/K`.
        split_std: relative size of the split, `>= 0`.
        generator: random generator of the split.

    Returns:
        `(new_parameter, revived, new_usage)`: a new tensor (the input is not modified), the
        `(num_classes, K)` boolean mask of the revived sub-prompts, and the usage with each
        split's share halved between its two halves (rows stay on the simplex).

    Examples:
        >>> params = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        >>> new, revived, usage = revive_dead_subprompts(
        ...     params, torch.tensor([[1.0, 0.0]]), split_std=0
        ... )
        >>> new, revived, usage
        (tensor([[[1., 0.],
                 [1., 0.]]]), tensor([[False,  True]]), tensor([[0.5000, 0.5000]]))
    """
    if not isinstance(parameter, Tensor) or parameter.dim() < 2:
        raise ValueError(
            "parameter must be a tensor of shape (num_classes, K, ...) but is "
            f"{getattr(parameter, 'shape', type(parameter).__name__)}."
        )
    if not parameter.is_floating_point():
        raise TypeError(
            f"parameter must be a floating-point tensor but has dtype {parameter.dtype}."
        )
    check_rank("usage", usage, (2,), "(num_classes, K)")
    if tuple(usage.shape) != tuple(parameter.shape[:2]):
        raise ValueError(
            f"usage must have shape {tuple(parameter.shape[:2])} (num_classes, K of parameter) "
            f"but has shape {tuple(usage.shape)}."
        )
    check_unit_interval("min_share", min_share, closed_right=True)
    check_positive("split_std", split_std, allow_zero=True)
    check_finite("parameter", parameter)
    k = usage.shape[1]
    shares = usage.detach().double().cpu().clone()
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
        noise = torch.randn(row.shape, generator=generator, dtype=torch.float32) * split_std
        epsilon = (noise * rms).to(row)
        new[label, index] = row + epsilon
        new[label, donor] = row - epsilon
        # The dead one's own (tiny) share goes to the split too, so the row keeps its sum.
        half = (alive[donor] + shares[label, index]) / 2
        shares[label, donor] = shares[label, index] = half
        revived[label, index] = True
    new_usage = shares.to(device=usage.device, dtype=usage.dtype)
    return new, revived.to(usage.device), new_usage
