r"""Label noise: how much to trust each training label, from the classifier's own posterior.

Few-shot sets have wrong labels and stray images. Under the model that a share $\varepsilon$ of
the labels moved to another class drawn uniformly, the posterior that image $b$'s label $y_b$ is
right is

$$
w_b = \frac{(1 - \varepsilon)\, p_b}{(1 - \varepsilon)\, p_b + \varepsilon\,(1 - p_b) / (C - 1)},
\qquad p_b = \operatorname{softmax}(\ell_b)_{y_b},
$$

an E-step over "is this label right". An image its class explains keeps $w_b \approx 1$; an image
that fits another class far better than its own (a flipped label, an outlier) gets a weight near
zero, so it pulls neither the class's cross-entropy nor its sub-prompts hard.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from promptmix._validation import (
    check_labels,
    check_rank,
    check_unit_interval,
    clamp_labels,
    labels_out_of_range,
    nan_where,
    reads_host,
)

__all__ = ["label_confidence"]


def label_confidence(logits: Tensor, labels: Tensor, *, label_noise: float = 0.1) -> Tensor:
    r"""Posterior $w_b$ that each label is right when a share `label_noise` of labels is flipped.

    Computed in the log domain from `log_softmax` and `logsumexp` (no $1 - p$ cancellation), with
    no gradient: the weights are constants of the M-step, as responsibilities are.

    Args:
        logits: `(batch, num_classes)` class logits, e.g. from `MixtureOfPromptsLoss.logits`.
        labels: `(batch,)` integer classes in `[0, num_classes)`.
        label_noise: $\varepsilon$ in `[0, 1)`; 0 trusts every label ($w = 1$).

    Returns:
        `(batch,)` weights in `[0, 1]`, detached; NaN where a row of `logits` holds NaN (with
        any `label_noise`), and, off the CPU, where a label lies outside `[0, num_classes)`
        (on the CPU that raises).

    Examples:
        >>> logits = torch.tensor([[8.0, 0.0, 0.0], [0.0, 8.0, 0.0]])  # image 1 looks like class 1
        >>> label_confidence(logits, torch.tensor([0, 0])).round(decimals=4)
        tensor([1.0000, 0.0060])
        >>> label_confidence(logits, torch.tensor([0, 0]), label_noise=0.0)
        tensor([1., 1.])
    """
    check_rank("logits", logits, (2,), "(batch, num_classes)")
    batch, num_classes = logits.shape
    labels = check_labels("labels", labels, batch, num_classes)
    noise = check_unit_interval("label_noise", label_noise)
    # Off the CPU the label range is not read on the host: bad labels make their rows NaN.
    invalid = None if reads_host(labels) else labels_out_of_range(labels, num_classes)
    if invalid is not None:
        labels = clamp_labels(labels, num_classes)
    if noise == 0 or num_classes == 1:
        # Every label trusted; a NaN row stays visible all the same.
        weights = torch.ones(batch, dtype=logits.dtype, device=logits.device)
        weights = nan_where(torch.isnan(logits.detach()).any(dim=-1), weights)
        return weights if invalid is None else nan_where(invalid, weights)
    with torch.no_grad():
        log_p = torch.log_softmax(logits.float(), dim=-1)
        own = log_p.gather(1, labels.unsqueeze(1)).squeeze(1)
        others = log_p.scatter(1, labels.unsqueeze(1), -math.inf).logsumexp(dim=-1)
        right = math.log1p(-noise) + own
        wrong = math.log(noise / (num_classes - 1)) + others
        weights = torch.exp(right - torch.logaddexp(right, wrong))
    weights = weights.to(logits.dtype)
    return weights if invalid is None else nan_where(invalid, weights)
