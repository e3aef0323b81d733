"""`SoftEMAssigner`: the E-step that assigns each image to its class's sub-prompts."""

from __future__ import annotations

from torch import Tensor, nn

from promptmix import distributed
from promptmix import functional as PF
from promptmix._validation import check_choice, check_int, check_positive
from promptmix.functional.estep import _check_estep, _estep

__all__ = ["SoftEMAssigner"]


class SoftEMAssigner(nn.Module):
    r"""Responsibilities of each image's class sub-prompts for the image (the E-step).

    $$
    \gamma_{bk} = \operatorname{softmax}_k\left(s \cos(x_b, t_{y_b k}) / \tau\right)
    $$

    `s` (`logit_scale`, default 100 = CLIP's logit scale) puts cosines on the scale CLIP's
    classifier uses, so `tau = 1` assigns like CLIP would score the sub-prompts, and `tau`
    below 1 sharpens. (The original mixture-of-prompts code used `s = 50`: the same assignments
    take a `tau` twice as large here.)

    Modes:
        - `"soft"`: the softmax above; it carries gradient (an entropy term on it trains prompts).
        - `"hard"`: the one-hot argmax of `"soft"`.
        - `"sinkhorn"`: balanced assignment of each class's images over its K sub-prompts
          (Sinkhorn-Knopp, as in SwAV); best with several images per class in a batch.

    Inside `MixtureOfPromptsLoss` the E-step runs once per step: the loss computes the soft
    responsibilities with this assigner's `logit_scale` at its `tau`, derives this mode's
    targets from the same scores, and hands the soft ones to every part that declares
    `"responsibilities"` in its `inputs`.

    Args:
        mode: `"soft"`, `"hard"` or `"sinkhorn"`.
        logit_scale: the E-step's cosine-to-logit factor `s > 0`.
        sinkhorn_iterations: rounds of the log-domain Sinkhorn for `"sinkhorn"`, `>= 1`; the
            default brings every class's usage within 1 % of its target in the cases of
            `benchmarks/sinkhorn_iterations.py`.
        sync_distributed: balance `"sinkhorn"` over the global batch of all DDP processes.

    Shape:
        - image_features: `(batch, dim)`.
        - subprompt_features: `(num_classes, K, dim)` with `labels` `(batch,)`, or
          `(batch, K, dim)` already gathered per image with `labels=None` (`(rows, dim)`:
          `K = 1`).
        - usage_prior (optional, `"sinkhorn"`): `(num_classes, K)` target usage per class
          (simplex rows), e.g. a `UsageEstimate`'s; uniform when `None`.
        - output: `(batch, K)`, non-negative rows that sum to 1.

    Examples:
        >>> import torch
        >>> assigner = SoftEMAssigner(mode="hard")
        >>> images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
        >>> prompts = torch.eye(2).unsqueeze(0)  # one class with K=2 sub-prompts
        >>> assigner(images, prompts, torch.zeros(3, dtype=torch.long))
        tensor([[1., 0.],
                [0., 1.],
                [1., 0.]])
    """

    def __init__(
        self,
        *,
        mode: PF.AssignmentMode = "soft",
        logit_scale: float = PF.DEFAULT_LOGIT_SCALE,
        sinkhorn_iterations: int = PF.DEFAULT_SINKHORN_ITERATIONS,
        sync_distributed: bool = False,
    ):
        super().__init__()
        self.mode: PF.AssignmentMode = check_choice(  # type: ignore[assignment]
            "mode", mode, PF.ASSIGNMENT_MODES
        )
        self.logit_scale = check_positive("logit_scale", logit_scale)
        self.sinkhorn_iterations = check_int("sinkhorn_iterations", sinkhorn_iterations, minimum=1)
        self.sync_distributed = bool(sync_distributed)

    def forward(
        self,
        image_features: Tensor,
        subprompt_features: Tensor,
        labels: Tensor | None = None,
        usage_prior: Tensor | None = None,
        *,
        tau: float = PF.DEFAULT_TAU,
    ) -> Tensor:
        """Responsibilities `(batch, K)`; see the class docstring for shapes."""
        similarities = PF.own_class_similarities(image_features, subprompt_features, labels)
        return self.from_similarities(similarities, labels, usage_prior, tau=tau)

    def from_similarities(
        self,
        similarities: Tensor,
        labels: Tensor | None = None,
        usage_prior: Tensor | None = None,
        *,
        tau: float = PF.DEFAULT_TAU,
    ) -> Tensor:
        """Responsibilities from precomputed own-class cosines `(batch, K)`."""
        return self._estep(similarities, labels, usage_prior, tau=tau)[1]

    def _estep(
        self,
        similarities: Tensor,
        labels: Tensor | None,
        usage_prior: Tensor | None = None,
        *,
        tau: float,
    ) -> tuple[Tensor, Tensor]:
        """`(soft, assigned)`: the soft responsibilities (with gradient) and this mode's, from
        one softmax of the scores; what `MixtureOfPromptsLoss` runs once per step."""
        if usage_prior is not None and self.mode != "sinkhorn":
            raise ValueError(
                f'usage_prior is used by mode="sinkhorn" only, but this assigner\'s mode is '
                f"{self.mode!r}."
            )
        usage_prior = _check_estep(
            similarities,
            usage_prior,
            tau=tau,
            logit_scale=self.logit_scale,
            mode=self.mode,
            sinkhorn_iterations=self.sinkhorn_iterations,
        )

        def run(
            rows: Tensor, groups: Tensor | None, prior: Tensor | None, mode: str
        ) -> tuple[Tensor, Tensor]:
            return _estep(
                rows,
                groups,
                prior,
                tau=tau,
                logit_scale=self.logit_scale,
                mode=mode,
                sinkhorn_iterations=self.sinkhorn_iterations,
            )

        if not (self.mode == "sinkhorn" and self.sync_distributed and distributed.is_distributed()):
            return run(similarities, labels, usage_prior, self.mode)
        # Balance over the global batch; the soft responsibilities stay local, with gradient.
        local_batch = similarities.shape[0]
        all_similarities = distributed.gather_no_grad(similarities.detach())
        all_labels = None if labels is None else distributed.gather_no_grad(labels)
        _, balanced = run(all_similarities, all_labels, usage_prior, "sinkhorn")
        soft, _ = run(similarities, labels, None, "soft")
        return soft, distributed.local_slice(balanced, local_batch=local_batch)

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, logit_scale={self.logit_scale}, "
            f"sinkhorn_iterations={self.sinkhorn_iterations}"
        )
