"""Entropy of sub-prompt assignments: per sample, per-class marginal, or mutual information."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from promptmix._validation import check_choice, check_labels, check_positive, check_rank
from promptmix.functional._common import ENTROPY_MODES, EntropyMode, _group_sums, connected_zero
from promptmix.functional.usage import (
    DEFAULT_PRIOR_COUNT,
    _checked_inputs,
    _class_means,
    _mean_over_present,
)

__all__ = ["assignment_entropy", "class_mean_responsibilities", "entropy"]


def entropy(probabilities: Tensor, *, dim: int = -1) -> Tensor:
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

    For reports and diagnostics: the number of classes present is data-dependent, so on CUDA
    this reads it on the host (`torch.unique`). The training step uses no such function.

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
    check_rank("responsibilities", responsibilities, (2,), "(batch, K)")
    if labels is None:
        labels = torch.zeros(
            len(responsibilities), dtype=torch.long, device=responsibilities.device
        )
    else:
        labels = check_labels("labels", labels, len(responsibilities), None)
    classes, groups = torch.unique(labels, return_inverse=True)
    sums = _group_sums(responsibilities, groups, len(classes))
    counts = _group_sums(responsibilities.new_ones(len(labels)), groups, len(classes))
    return classes, sums / counts.unsqueeze(1), counts


def assignment_entropy(
    responsibilities: Tensor,
    labels: Tensor | None = None,
    usage_prior: Tensor | None = None,
    *,
    mode: EntropyMode = "marginal",
    normalize: bool = False,
    prior_count: float = DEFAULT_PRIOR_COUNT,
) -> Tensor:
    r"""Entropy of sub-prompt assignments, in nats; a regulariser *maximises* it.

    - `"marginal"` (default): for each class `c` in the batch, $H(\bar\gamma_c)$ of the
      class's mean assignment, averaged over classes: spreads *usage* without making each image
      uncertain.
    - `"sample"`: $\frac{1}{B}\sum_b H(\gamma_b)$, every image spread over sub-prompts (the
      original mixture-of-prompts code's entropy term).
    - `"mutual_information"`: per class, $H(\bar\gamma_c) - \frac{1}{n_c}\sum_{b \in c}
      H(\gamma_b)$, averaged over classes: spread usage, confident images. Without a usage prior
      it is a mutual information, so it lies in `[0, log K]`.

    A class with few images in a batch has a noisy mean (with one image the marginal entropy *is*
    the sample entropy). `usage_prior` fixes that: the class mean becomes
    $(\sum_{b \in c} \gamma_b + n_0 u_c) / (n_c + n_0)$ with a running usage estimate
    $u_c$ (treated as a constant) worth `prior_count` = $n_0$ images. The gradient
    then still pushes the batch's images toward the sub-prompts the class under-uses. The
    `"sample"` mode ignores the prior. No device-to-host synchronisation.

    Args:
        responsibilities: `(batch, K)` rows on the probability simplex.
        labels: `(batch,)` integer class of each image; `None` treats the batch as one class.
        usage_prior: `(num_classes, K)` running usage per class (simplex rows), or `None`.
        mode: `"marginal"`, `"sample"` or `"mutual_information"`.
        normalize: divide by `log K` so the value lies in `[0, 1]`.
        prior_count: weight `n_0 >= 0` of the prior, in images.

    Returns:
        A scalar. An empty batch or `K == 1` gives a graph-connected zero.

    Examples:
        >>> uniform = torch.full((4, 2), 0.5)
        >>> assignment_entropy(uniform, normalize=True)
        tensor(1.)
        >>> one_hot = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> assignment_entropy(one_hot), assignment_entropy(one_hot, mode="sample")
        (tensor(0.6931), tensor(0.))
    """
    check_choice("mode", mode, ENTROPY_MODES)
    check_positive("prior_count", prior_count, allow_zero=True)
    responsibilities, labels, usage_prior = _checked_inputs(responsibilities, labels, usage_prior)
    batch, k = responsibilities.shape
    if batch == 0 or k == 1:
        return connected_zero(responsibilities)

    if mode == "sample":
        value = entropy(responsibilities).mean()
    else:
        sample = entropy(responsibilities) if mode == "mutual_information" else None
        present, class_means, sample_means = _class_means(
            responsibilities, labels, usage_prior, prior_count, sample
        )
        per_class = entropy(class_means)
        if sample_means is not None:
            # Per class, I(image; sub-prompt) = H(mean gamma) - mean H(gamma_b) >= 0 (Jensen);
            # the sample entropies are averaged within each class, as the marginal ones are.
            per_class = per_class - sample_means
        value = _mean_over_present(per_class, present)
    return value / math.log(k) if normalize else value
