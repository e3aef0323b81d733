"""`SoftEMAssigner`: the E-step that assigns each image to its class's sub-prompts."""

from __future__ import annotations

from torch import Tensor, nn

from promptmix import distributed
from promptmix import functional as PF
from promptmix._validation import check_choice, check_int, check_positive


class SoftEMAssigner(nn.Module):
    r"""Responsibilities of each image's class sub-prompts for the image (the E-step).

    $$
    \gamma_{bk} = \operatorname{softmax}_k\left(s \cos(x_b, t_{y_b k}) / \tau\right)
    $$

    `s` (`scale`, default 100 = CLIP's logit scale) puts cosines on the scale CLIP's
    classifier uses, so `tau = 1` assigns like CLIP would score the sub-prompts, and `tau`
    below 1 sharpens.

    Modes:
        - `"soft"`: the softmax above; it carries gradient (an entropy term on it trains prompts).
        - `"hard"`: the one-hot argmax of `"soft"`.
        - `"sinkhorn"`: balanced assignment of each class's images over its K sub-prompts
          (Sinkhorn-Knopp, as in SwAV); best with several images per class in a batch.

    Args:
        mode: `"soft"`, `"hard"` or `"sinkhorn"`.
        scale: similarity scale `s > 0`.
        sinkhorn_iterations: rounds of the log-domain Sinkhorn for `"sinkhorn"`, `>= 1`; the
            default brings every class's usage within 1 % of its target in the cases of
            `benchmarks/sinkhorn_iterations.py`.
        sync_distributed: balance `"sinkhorn"` over the global batch of all DDP processes.

    Shape:
        - image_features: `(batch, dim)`.
        - subprompt_features: `(num_classes, K, dim)` with `labels` `(batch,)`, or
          `(batch, K, dim)` already gathered per image with `labels=None`.
        - usage_prior (optional, `"sinkhorn"`): `(num_classes, K)` target usage per class
          (simplex rows), e.g. a running usage estimate; uniform when `None`.
        - output: `(batch, K)`, non-negative rows that sum to 1.

    Examples:
        >>> import torch
        >>> assigner = SoftEMAssigner(mode="hard")
        >>> images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
        >>> prompts = torch.eye(2).unsqueeze(0)  # one class with K=2 sub-prompts
        >>> assigner(images, prompts, labels=torch.zeros(3, dtype=torch.long))
        tensor([[1., 0.],
                [0., 1.],
                [1., 0.]])
    """

    def __init__(
        self,
        mode: PF.AssignmentMode = "soft",
        *,
        scale: float = 100.0,
        sinkhorn_iterations: int = PF.DEFAULT_SINKHORN_ITERATIONS,
        sync_distributed: bool = False,
    ):
        super().__init__()
        self.mode: PF.AssignmentMode = check_choice(  # type: ignore[assignment]
            "mode", mode, PF.ASSIGNMENT_MODES
        )
        self.scale = check_positive("scale", scale)
        self.sinkhorn_iterations = check_int("sinkhorn_iterations", sinkhorn_iterations, minimum=1)
        self.sync_distributed = bool(sync_distributed)

    def forward(
        self,
        image_features: Tensor,
        subprompt_features: Tensor,
        labels: Tensor | None = None,
        tau: float = 1.0,
        *,
        usage_prior: Tensor | None = None,
    ) -> Tensor:
        """Responsibilities `(batch, K)`; see the class docstring for shapes."""
        similarities = PF.own_class_similarities(image_features, subprompt_features, labels)
        return self.from_similarities(similarities, labels, tau=tau, usage_prior=usage_prior)

    def from_similarities(
        self,
        similarities: Tensor,
        labels: Tensor | None = None,
        *,
        tau: float = 1.0,
        usage_prior: Tensor | None = None,
    ) -> Tensor:
        """Responsibilities from precomputed own-class cosines `(batch, K)`."""
        if usage_prior is not None and self.mode != "sinkhorn":
            raise ValueError(
                f'usage_prior is used by mode="sinkhorn" only, but this assigner\'s mode is '
                f"{self.mode!r}."
            )
        if self.mode == "sinkhorn" and self.sync_distributed and distributed.is_distributed():
            local_batch = similarities.shape[0]
            all_similarities = distributed.gather_no_grad(similarities.detach())
            all_labels = None if labels is None else distributed.gather_no_grad(labels)
            balanced = self._assign(all_similarities, all_labels, tau, usage_prior)
            return distributed.local_slice(balanced, local_batch)
        return self._assign(similarities, labels, tau, usage_prior)

    def _assign(
        self,
        similarities: Tensor,
        labels: Tensor | None,
        tau: float,
        usage_prior: Tensor | None,
    ) -> Tensor:
        return PF.responsibilities_from_similarities(
            similarities,
            labels,
            tau=tau,
            scale=self.scale,
            mode=self.mode,
            sinkhorn_iterations=self.sinkhorn_iterations,
            usage_prior=usage_prior,
        )

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, scale={self.scale}, "
            f"sinkhorn_iterations={self.sinkhorn_iterations}"
        )
