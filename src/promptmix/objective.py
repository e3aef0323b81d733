"""`MixtureOfPromptsLoss`: classification, EM pull, diversity and entropy in one objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from promptmix import distributed
from promptmix import functional as PF
from promptmix._validation import check_choice, check_labels, check_positive
from promptmix.assignment import SoftEMAssigner
from promptmix.diversity import DiversityLoss
from promptmix.entropy import AssignmentEntropy
from promptmix.schedule import TemperatureSchedule

DEFAULT_DIVERSITY_WEIGHT = 0.1
# The design note had sample entropy at 0.01. benchmarks/collapse.py measured that it does not
# stop collapse (dominant share 0.95, NMI 0.09 against the true modes), while the per-class
# marginal entropy at 0.3 does (dominant share 0.39, NMI 0.68 with these defaults and a default
# TemperatureSchedule): these are the defaults.
DEFAULT_ENTROPY_WEIGHT = 0.3
DEFAULT_ENTROPY_MODE: PF.EntropyMode = "marginal"
DEFAULT_MIXTURE_WEIGHT = 1.0


def _weight(name: str, value: float | None, default: float) -> float:
    return default if value is None else check_positive(name, value, allow_zero=True)


class MixtureOfPromptsLoss(nn.Module):
    r"""The training objective of a mixture of prompts, with the cure for mode collapse built in.

    $$
    L = \mathrm{CE}(\ell(x), y)
      + w_m \frac{1}{B}\sum_{b,k} \bar\gamma_{bk}\,(1 - \cos(x_b, t_{y_b k}))
      + w_d\,\mathrm{Div}(t_{\text{batch classes}})
      - w_e\,H(\gamma)
    $$

    - `ce`: cross-entropy of class logits that pool each class's K similarities
      (`aggregation`, default `"logsumexp"`: the mixture's log-likelihood, see
      `promptmix.functional.class_logits`).
    - `mixture`: the EM M-step: each sub-prompt is pulled toward the images assigned to it, with
      the assigner's responsibilities $\bar\gamma$ *detached* (they are targets).
    - `diversity`: `DiversityLoss` over the classes present in the batch.
    - `entropy`: `AssignmentEntropy` of the *soft* responsibilities at `tau`, with their
      gradient, so maximising it moves the sub-prompts. Skipped with `assignment="hard"` (as in
      the design note: hard assignments have no entropy to spread).

    A weight left as `None` takes its default (diversity 0.1, entropy 0.3, mixture 1.0); a
    weight of 0 switches its term off (it is reported as a graph-connected zero and not computed).

    Args:
        diversity_weight: $w_d \ge 0$.
        entropy_weight: $w_e \ge 0$.
        mixture_weight: $w_m \ge 0$.
        aggregation: how class logits pool the K sub-prompts: `"logsumexp"`, `"max"`,
            `"mean"` or `"responsibility"`.
        assignment: E-step mode for the EM targets: `"soft"`, `"hard"` or `"sinkhorn"`.
        entropy_mode: `"marginal"` (default), `"sample"` or `"mutual_information"`. The
            design note's sample entropy at 0.01 does not stop collapse in
            `benchmarks/collapse.py`; marginal entropy at 0.3 does (`docs/tuning.md`).
        tau: a fixed temperature, or a `TemperatureSchedule` (stored as `self.schedule`,
            saved in `state_dict`; call `schedule.step()` once per iteration yourself).
        num_classes: with `n_subprompts`, keeps a running usage estimate for marginal entropy.
        n_subprompts: `K`, with `num_classes`.
        assigner_scale: similarity scale of the E-step (see `SoftEMAssigner`).
        sinkhorn_iterations: normalisation rounds of `assignment="sinkhorn"`.
        diversity: a configured `DiversityLoss` to use instead of the default one.
        sync_distributed: gather batch statistics (Sinkhorn, marginal entropy, the classes whose
            sub-prompts the diversity term sees) across DDP processes.

    Shape:
        - image_features: `(batch, dim)`.
        - subprompt_features: `(num_classes, K, dim)`.
        - labels: `(batch,)` integer classes in `[0, num_classes)`.
        - output: a dict of tensors: `"loss"`, `"ce"`, `"mixture"`, `"diversity"`,
          `"entropy"` (scalars; `"entropy"` is the unweighted, positive entropy), `"tau"`
          (0-dim), `"logits"` `(batch, num_classes)` and `"responsibilities"`
          `(batch, K)`, the EM targets (both detached).

    Examples:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> subprompts = torch.randn(5, 3, 16, requires_grad=True)
        >>> images, labels = torch.randn(8, 16), torch.randint(0, 5, (8,))
        >>> loss_fn = MixtureOfPromptsLoss(tau=TemperatureSchedule(total_steps=100))
        >>> out = loss_fn(images, subprompts, labels)
        >>> sorted(out)
        ['ce', 'diversity', 'entropy', 'logits', 'loss', 'mixture', 'responsibilities', 'tau']
        >>> out["loss"].backward(); loss_fn.schedule.step()
        >>> subprompts.grad.shape
        torch.Size([5, 3, 16])
    """

    schedule: TemperatureSchedule | None

    def __init__(
        self,
        *,
        diversity_weight: float | None = None,
        entropy_weight: float | None = None,
        mixture_weight: float | None = None,
        aggregation: PF.Aggregation = "logsumexp",
        assignment: PF.AssignmentMode = "soft",
        entropy_mode: PF.EntropyMode = DEFAULT_ENTROPY_MODE,
        tau: float | TemperatureSchedule = 0.3,
        num_classes: int | None = None,
        n_subprompts: int | None = None,
        assigner_scale: float = 100.0,
        sinkhorn_iterations: int = 3,
        diversity: DiversityLoss | None = None,
        sync_distributed: bool = False,
    ):
        super().__init__()
        self.diversity_weight = _weight(
            "diversity_weight", diversity_weight, DEFAULT_DIVERSITY_WEIGHT
        )
        self.entropy_weight = _weight("entropy_weight", entropy_weight, DEFAULT_ENTROPY_WEIGHT)
        self.mixture_weight = _weight("mixture_weight", mixture_weight, DEFAULT_MIXTURE_WEIGHT)
        self.aggregation: PF.Aggregation = check_choice(  # type: ignore[assignment]
            "aggregation", aggregation, PF.AGGREGATIONS
        )
        if isinstance(tau, TemperatureSchedule):
            self.schedule, self.fixed_tau = tau, None
        else:
            self.schedule, self.fixed_tau = None, check_positive("tau", tau)
        self.sync_distributed = bool(sync_distributed)
        self.assigner = SoftEMAssigner(
            assignment,
            scale=assigner_scale,
            sinkhorn_iterations=sinkhorn_iterations,
            sync_distributed=sync_distributed,
        )
        self.diversity = diversity if diversity is not None else DiversityLoss()
        self.entropy = AssignmentEntropy(
            entropy_mode,
            num_classes=num_classes,
            n_subprompts=n_subprompts,
            sync_distributed=sync_distributed,
        )

    def current_tau(self) -> float:
        """The temperature the next call uses when none is passed."""
        return self.schedule() if self.schedule is not None else float(self.fixed_tau)  # type: ignore[arg-type]

    def forward(
        self,
        image_features: Tensor,
        subprompt_features: Tensor,
        labels: Tensor,
        *,
        logit_scale: float | Tensor = 100.0,
        tau: float | None = None,
    ) -> dict[str, Tensor]:
        """Loss and its parts; see the class docstring for shapes."""
        tau = self.current_tau() if tau is None else check_positive("tau", tau)
        similarities = PF.subprompt_similarities(image_features, subprompt_features)
        check_labels("labels", labels, image_features.shape[0], subprompt_features.shape[0])
        zero = PF.connected_zero(image_features, subprompt_features)
        batch = similarities.shape[0]
        own = similarities[torch.arange(batch, device=labels.device), labels]  # (batch, K)

        logits = PF.class_logits(
            similarities,
            logit_scale=logit_scale,
            aggregation=self.aggregation,
            tau=tau,
            assigner_scale=self.assigner.scale,
        )
        # `.long()`: cross_entropy rejects int32 targets that every other step accepts.
        ce = F.cross_entropy(logits, labels.long()) if batch else zero

        targets = self.assigner.from_similarities(own.detach(), labels, tau=tau)
        mixture = zero
        if self.mixture_weight and batch:
            mixture = (targets * (1 - own)).sum(dim=-1).mean()

        diversity = zero
        if self.diversity_weight and batch:
            # Under DDP every process penalises the classes of the *global* batch, so a run on N
            # processes matches one process with the same total batch.
            batch_labels = distributed.gather_no_grad(labels) if self.sync_distributed else labels
            diversity = self.diversity(subprompt_features[torch.unique(batch_labels)])

        entropy = zero
        if self.entropy_weight and self.assigner.mode != "hard":
            soft = PF.responsibilities_from_similarities(own, tau=tau, scale=self.assigner.scale)
            entropy = self.entropy(soft, labels)

        loss = (
            ce
            + self.mixture_weight * mixture
            + self.diversity_weight * diversity
            - self.entropy_weight * entropy
        )
        return {
            "loss": loss,
            "ce": ce,
            "mixture": mixture,
            "diversity": diversity,
            "entropy": entropy,
            "tau": torch.tensor(tau),
            "logits": logits.detach(),
            "responsibilities": targets.detach(),
        }

    def extra_repr(self) -> str:
        return (
            f"diversity_weight={self.diversity_weight}, entropy_weight={self.entropy_weight}, "
            f"mixture_weight={self.mixture_weight}, aggregation={self.aggregation!r}"
        )
