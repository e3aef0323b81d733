"""Anchors: the distance of learned text features to frozen hand-crafted prompt features."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from promptmix._validation import as_subprompts, check_choice
from promptmix.functional._common import REDUCTIONS, Reduction, _unit, connected_zero, reduce

__all__ = ["ANCHOR_DISTANCES", "AnchorDistance", "anchor_distances", "prompt_anchor_loss"]

AnchorDistance = Literal["cosine", "l2", "l1"]
ANCHOR_DISTANCES = ("cosine", "l2", "l1")


def _paired_features(
    subprompt_features: Tensor, anchor_features: Tensor, anchor_name: str = "anchor_features"
) -> tuple[Tensor, Tensor]:
    """Validated `(C, K, D)` prompts and `(C, 1 or K, D)` anchors that broadcast against them."""
    prompts = as_subprompts("subprompt_features", subprompt_features)
    anchors = as_subprompts(anchor_name, anchor_features)
    num_classes, k, dim = prompts.shape
    matches = anchors.shape[0] == num_classes and anchors.shape[-1] == dim
    if not matches or anchors.shape[1] not in (1, k):
        raise ValueError(
            f"{anchor_name} must have shape ({num_classes}, {dim}) or ({num_classes}, {k}, {dim}) "
            f"to match subprompt_features {tuple(subprompt_features.shape)}, but has shape "
            f"{tuple(anchor_features.shape)}."
        )
    return prompts, anchors


def anchor_distances(
    subprompt_features: Tensor, anchor_features: Tensor, *, distance: AnchorDistance = "cosine"
) -> Tensor:
    r"""The distance of every sub-prompt to its class's anchor, after L2 normalisation.

    With $\hat t = t / \lVert t \rVert$ and $\hat a = a / \lVert a \rVert$:

    - `"cosine"`: $1 - \langle \hat t, \hat a \rangle$ (KgCoOp's code): identical 0, orthogonal 1.
    - `"l2"`: $\lVert \hat t - \hat a \rVert_2^2 = 2 (1 - \cos)$ (KgCoOp's paper).
    - `"l1"`: $\frac{1}{D} \lVert \hat t - \hat a \rVert_1$ (PromptSRC's `F.l1_loss`).

    Args:
        subprompt_features: `(num_classes, K, dim)`, or `(num_classes, dim)` for one prompt per
            class.
        anchor_features: `(num_classes, dim)` (one anchor per class, shared by its K sub-prompts)
            or `(num_classes, K, dim)` (one per sub-prompt).
        distance: `"cosine"`, `"l2"` or `"l1"`.

    Returns:
        `(num_classes, K)` distances (`K = 1` for 2-D `subprompt_features`).

    Examples:
        >>> import torch
        >>> prompts = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
        >>> anchor_distances(prompts, torch.tensor([[3.0, 0.0]]))
        tensor([[0., 1.]])
    """
    check_choice("distance", distance, ANCHOR_DISTANCES)
    prompts, anchors = _paired_features(subprompt_features, anchor_features)
    prompts, anchors = _unit(prompts), _unit(anchors)
    if distance == "cosine":
        return 1 - (prompts * anchors).sum(dim=-1)
    difference = prompts - anchors
    if distance == "l2":
        return difference.pow(2).sum(dim=-1)
    return difference.abs().mean(dim=-1)


def prompt_anchor_loss(
    subprompt_features: Tensor,
    anchor_features: Tensor,
    *,
    distance: AnchorDistance = "cosine",
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Distance of learned text features to frozen hand-crafted ones (KgCoOp, PromptSRC).

    $$
    L = \frac{1}{C K} \sum_{c=1}^{C} \sum_{k=1}^{K} d\left(\hat t_{ck}, \hat a_{c}\right),
    \qquad d \in \{1 - \cos,\ \lVert\cdot\rVert_2^2,\ \tfrac{1}{D}\lVert\cdot\rVert_1\}
    $$

    The anchor $a_c$ is the frozen text tower's feature of a hand-crafted prompt for class
    $c$ ("a photo of a {}."), or the mean over a template ensemble. The defaults reproduce
    KgCoOp's term (`trainers/kgcoop.py`: `1 - mean(cos)`, weight 8);
    `distance="l1"` reproduces PromptSRC's text term (`trainers/promptsrc.py`: `F.l1_loss`
    of the normalised features, mean over classes and dimensions, weight 25).

    Args:
        subprompt_features: `(num_classes, K, dim)` or `(num_classes, dim)`.
        anchor_features: `(num_classes, dim)` or `(num_classes, K, dim)`.
        distance: `"cosine"`, `"l2"` or `"l1"` (see `anchor_distances`).
        reduction: `"mean"` or `"sum"` over classes and sub-prompts, or `"none"` for
            `(num_classes, K)`.

    Returns:
        A scalar, or `(num_classes, K)` with `reduction="none"`; `>= 0` up to float rounding
        (about 1e-7 in float32 for identical features). No classes give a zero that is still
        connected to the graph.

    Examples:
        >>> import torch
        >>> prompts = torch.eye(3)[:2]  # two classes, one prompt each
        >>> prompt_anchor_loss(prompts, prompts)  # identical
        tensor(0.)
        >>> prompt_anchor_loss(prompts, torch.eye(3)[1:])  # orthogonal
        tensor(1.)
    """
    check_choice("reduction", reduction, REDUCTIONS)
    distances = anchor_distances(subprompt_features, anchor_features, distance=distance)
    if reduction != "none" and distances.numel() == 0:
        return connected_zero(subprompt_features)
    return reduce(distances, reduction)
