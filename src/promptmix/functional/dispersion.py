"""DAPT's dispersion: spread the classes' text features, pull images to class prototypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor

from promptmix._validation import (
    as_subprompts,
    check_int,
    check_label_range,
    check_labels,
    check_positive,
    check_rank,
    clamp_labels,
    labels_out_of_range,
    nan_where,
    reads_host,
)
from promptmix.functional._common import _unit, connected_zero

__all__ = ["class_prototypes", "dispersion_loss", "image_prototype_loss"]


def dispersion_loss(subprompt_features: Tensor, *, bandwidth: float = 2.0) -> Tensor:
    r"""Gaussian potential between the text features of *different* classes (DAPT).

    $$
    L = \frac{1}{|P|} \sum_{(ck,\, c'k') \in P}
        \exp\left(-t \, \lVert \hat t_{ck} - \hat t_{c'k'} \rVert_2^2\right),
    \qquad P = \{\text{pairs of sub-prompts with } c < c'\}
    $$

    Minimising it pushes the classes apart on the unit sphere: close features cost up to 1,
    anti-parallel ones ($\lVert \cdot \rVert^2 = 4$) cost $e^{-4t}$, the least of all, so they
    count as far apart (unlike `diversity_loss`, which penalises $|\cos|$ and acts *within*
    a class). With `K == 1` this is DAPT's text term (`trainers/dapt.py`:
    `pdist(text, p=2).pow(2).mul(-t).exp().mean()`, `t = TXT_RBF_T = 2`, weight
    `TXT_BETA = 0.1`). Pairs of one class's own sub-prompts are left out.

    Args:
        subprompt_features: `(num_classes, K, dim)` or `(num_classes, dim)`, normalised or not.
        bandwidth: $t > 0$, the potential's inverse width.

    Returns:
        A scalar in $[e^{-4t}, 1]$. Fewer than two classes give a zero that is still
        connected to the graph.

    Examples:
        >>> dispersion_loss(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), bandwidth=1.0)
        tensor(0.0183)
        >>> dispersion_loss(torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
        tensor(1.)
    """
    prompts = as_subprompts("subprompt_features", subprompt_features)
    check_positive("bandwidth", bandwidth)
    num_classes, k, _ = prompts.shape
    if num_classes < 2:
        return connected_zero(subprompt_features)
    flat = rearrange(_unit(prompts), "c k d -> (c k) d")
    squared_norms = flat.pow(2).sum(dim=-1)
    squared = (
        squared_norms[:, None] + squared_norms[None, :] - 2 * einsum(flat, flat, "i d, j d -> i j")
    )
    # A weight on every pair rather than indexing with the mask of pairs between classes:
    # fixed shapes, so no device-to-host synchronisation; the count of such pairs is known.
    classes = torch.arange(num_classes, device=flat.device).unsqueeze(1).expand(-1, k).flatten()
    rows, cols = torch.triu_indices(len(classes), len(classes), offset=1, device=flat.device)
    between = (classes[rows] != classes[cols]).to(flat.dtype)
    potentials = torch.exp(-bandwidth * squared[rows, cols].clamp_min(0))
    return (potentials * between).sum() / (k * k * num_classes * (num_classes - 1) // 2)


def class_prototypes(image_features: Tensor, labels: Tensor, *, num_classes: int) -> Tensor:
    r"""The mean of each class's L2-normalised image features (DAPT's prototypes).

    $$ p_c = \frac{1}{|\{b : y_b = c\}|} \sum_{b : y_b = c} \hat x_b $$

    Args:
        image_features: `(batch, dim)` features of the frozen image encoder.
        labels: `(batch,)` integer classes in `[0, num_classes)`.
        num_classes: $C$; a class without images gets a zero prototype.

    Returns:
        `(num_classes, dim)` prototypes, not renormalised (as DAPT's). Reads the host (a
        set-up function): labels outside `[0, num_classes)` raise on every device.

    Examples:
        >>> images = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
        >>> class_prototypes(images, torch.tensor([0, 1, 1]), num_classes=3)
        tensor([[1., 0.],
                [0., 1.],
                [0., 0.]])
    """
    check_rank("image_features", image_features, (2,), "(batch, dim)")
    check_int("num_classes", num_classes, minimum=1)
    labels = check_labels("labels", labels, image_features.shape[0], None)
    check_label_range("labels", labels, num_classes)
    units = _unit(image_features)
    sums = units.new_zeros(num_classes, units.shape[-1]).index_add_(0, labels, units)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1)
    return sums / counts[:, None].to(sums.dtype)


def image_prototype_loss(image_features: Tensor, labels: Tensor, prototypes: Tensor) -> Tensor:
    r"""Mean squared error of normalised image features to their class's prototype (DAPT).

    $$ L = \frac{1}{B D} \sum_{b=1}^{B} \lVert \hat x_b - p_{y_b} \rVert_2^2 $$

    DAPT's visual term (`trainers/dapt.py`: `F.mse_loss(image_features, prototype[label])`,
    weight `VIS_BETA`, from 0.01 to 100 by dataset, see `ImagePrototypeLoss`) with prototypes from
    `class_prototypes` of the frozen encoder's few-shot features. It moves something only where
    the image features are learned (visual prompts); with a frozen image tower it is a constant.

    Args:
        image_features: `(batch, dim)` (learned) image features, normalised here.
        labels: `(batch,)` integer classes.
        prototypes: `(num_classes, dim)`, used as given.

    Returns:
        A scalar; an empty batch gives a zero that is still connected to the graph.

    Examples:
        >>> prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> image_prototype_loss(torch.tensor([[3.0, 0.0]]), torch.tensor([1]), prototypes)
        tensor(1.)
    """
    check_rank("image_features", image_features, (2,), "(batch, dim)")
    check_rank("prototypes", prototypes, (2,), "(num_classes, dim)")
    if prototypes.shape[-1] != image_features.shape[-1]:
        raise ValueError(
            f"prototypes must have dim {image_features.shape[-1]} like image_features but has "
            f"shape {tuple(prototypes.shape)}."
        )
    num_classes = prototypes.shape[0]
    labels = check_labels("labels", labels, image_features.shape[0], num_classes)
    if image_features.shape[0] == 0:
        return connected_zero(image_features, prototypes)
    units = _unit(image_features)
    invalid = None if reads_host(labels) else labels_out_of_range(labels, num_classes)
    if invalid is not None:
        labels = clamp_labels(labels, num_classes)
    targets = prototypes[labels].to(units.dtype)
    if invalid is not None:
        targets = nan_where(invalid.unsqueeze(1), targets)
    return F.mse_loss(units, targets)
