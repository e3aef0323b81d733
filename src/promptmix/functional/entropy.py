"""Entropy of sub-prompt assignments: per sample, per-class marginal, or mutual information."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from promptmix._validation import (
    check_choice,
    check_labels,
    check_positive,
    check_rank,
    check_simplex,
    check_subprompts,
)
from promptmix.functional._common import ENTROPY_MODES, EntropyMode, connected_zero


def entropy(probabilities: Tensor, dim: int = -1) -> Tensor:
    r"""Shannon entropy in nats, $H(p) = -\sum_k p_k \log p_k$, safe at `p_k = 0`.

    The logarithm is taken of `p` clamped to the dtype's smallest normal number, so zero
    probabilities contribute exactly 0 with a finite gradient (`p log p` would give NaN).

    Args:
        probabilities: `(..., K)` distributions along `dim`.
        dim: the dimension that holds the distribution.

    Returns:
        `(...)`: the entropy of each distribution, between 0 and `log K`.

    Examples:
        >>> entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
        tensor([0.6931, 0.0000])
    """
    tiny = torch.finfo(probabilities.dtype).tiny
    # `0.0 - x` rather than `-x`: a certain distribution reads 0., not -0.
    return 0.0 - (probabilities * probabilities.clamp_min(tiny).log()).sum(dim=dim)


def class_mean_responsibilities(
    responsibilities: Tensor, labels: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean responsibility of each class present in the batch.

    Args:
        responsibilities: `(batch, K)`.
        labels: `(batch,)` integer classes, or `None` for a single class `0`.

    Returns:
        `(classes, means, counts)`: the sorted classes present `(num_present,)`, their mean
        assignments `(num_present, K)` and their numbers of images `(num_present,)`.

    Examples:
        >>> gamma = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
        >>> classes, means, counts = class_mean_responsibilities(gamma, torch.tensor([3, 3, 1]))
        >>> classes, means, counts
        (tensor([1, 3]), tensor([[1.0000, 0.0000],
                [0.5000, 0.5000]]), tensor([1., 2.]))
    """
    if labels is None:
        labels = torch.zeros(
            len(responsibilities), dtype=torch.long, device=responsibilities.device
        )
    classes, groups = torch.unique(labels, return_inverse=True)
    sums = responsibilities.new_zeros(len(classes), responsibilities.shape[1])
    sums = sums.index_add(0, groups, responsibilities)
    counts = torch.bincount(groups, minlength=len(classes)).to(responsibilities.dtype)
    return classes, sums / counts.unsqueeze(1), counts


def _blended_class_means(
    responsibilities: Tensor,
    labels: Tensor | None,
    usage_prior: Tensor | None,
    prior_count: float,
) -> Tensor:
    """Per class in the batch, `(sum_b gamma_b + n0 * u_c) / (n_c + n0)`: `(num_present, K)`."""
    classes, means, counts = class_mean_responsibilities(responsibilities, labels)
    if usage_prior is None or prior_count == 0:
        return means
    prior = usage_prior.detach().to(means.dtype)
    prior = prior[classes] if labels is not None else prior.mean(dim=0, keepdim=True)
    weight = (counts / (counts + prior_count)).unsqueeze(1)
    return weight * means + (1 - weight) * prior


def assignment_entropy(
    responsibilities: Tensor,
    labels: Tensor | None = None,
    *,
    mode: EntropyMode = "sample",
    normalize: bool = False,
    usage_prior: Tensor | None = None,
    prior_count: float = 0.0,
) -> Tensor:
    r"""Entropy of sub-prompt assignments, in nats; a regulariser *maximises* it.

    - `"sample"`: $\frac{1}{B}\sum_b H(\gamma_b)$, every image spread over sub-prompts.
    - `"marginal"`: for each class `c` in the batch, $H(\bar\gamma_c)$ of the class's mean
      assignment, averaged over classes: spreads *usage* without making each image uncertain.
    - `"mutual_information"`: per class, $H(\bar\gamma_c) - \frac{1}{n_c}\sum_{b \in c}
      H(\gamma_b)$, averaged over classes: spread usage, confident images. Without a usage prior
      it is a mutual information, so it lies in `[0, log K]`.

    A class with few images in a batch has a noisy mean (with one image the marginal entropy *is*
    the sample entropy). `usage_prior` fixes that: the class mean becomes
    $(\sum_{b \in c} \gamma_b + n_0 u_c) / (n_c + n_0)$ with a running usage estimate
    $u_c$ (treated as a constant) worth `prior_count` = $n_0$ images. The gradient
    then still pushes the batch's images toward the sub-prompts the class under-uses.

    Args:
        responsibilities: `(batch, K)` rows on the probability simplex.
        labels: `(batch,)` integer class of each image; `None` treats the batch as one class.
        mode: `"sample"`, `"marginal"` or `"mutual_information"`.
        normalize: divide by `log K` so the value lies in `[0, 1]`.
        usage_prior: `(num_classes, K)` running usage per class (simplex rows), or `None`.
        prior_count: weight `n_0 >= 0` of the prior, in images.

    Returns:
        A scalar. An empty batch or `K == 1` gives a graph-connected zero.

    Examples:
        >>> uniform = torch.full((4, 2), 0.5)
        >>> assignment_entropy(uniform, normalize=True)
        tensor(1.)
        >>> one_hot = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> assignment_entropy(one_hot), assignment_entropy(one_hot, mode="marginal")
        (tensor(0.), tensor(0.6931))
    """
    check_rank("responsibilities", responsibilities, (2,), "(batch, K)")
    check_subprompts("responsibilities", responsibilities, -1)
    check_choice("mode", mode, ENTROPY_MODES)
    batch, k = responsibilities.shape
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
    check_positive("prior_count", prior_count, allow_zero=True)
    check_simplex("responsibilities", responsibilities)
    if batch == 0 or k == 1:
        return connected_zero(responsibilities)

    value = responsibilities.new_zeros(())
    if mode in ("marginal", "mutual_information"):
        class_means = _blended_class_means(responsibilities, labels, usage_prior, prior_count)
        value = value + entropy(class_means).mean()
    if mode == "sample":
        value = value + entropy(responsibilities).mean()
    if mode == "mutual_information":
        # Per class, I(image; sub-prompt) = H(mean gamma) - mean H(gamma_b) >= 0 (Jensen); the
        # sample entropies are averaged within each class, as the marginal ones are.
        sample = entropy(responsibilities).unsqueeze(1)
        value = value - class_mean_responsibilities(sample, labels)[1].mean()
    return value / math.log(k) if normalize else value

