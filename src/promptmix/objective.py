"""`MixtureOfPromptsLoss`: classification, EM pull, diversity, entropy and extra regularizers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from promptmix import distributed
from promptmix import functional as PF
from promptmix._validation import (
    check_choice,
    check_labels,
    check_positive,
    clamp_labels,
    labels_out_of_range,
    nan_where,
    reads_host,
)
from promptmix.assignment import SoftEMAssigner
from promptmix.diversity import DiversityLoss
from promptmix.entropy import AssignmentEntropy
from promptmix.schedule import TemperatureSchedule

# The loss's default weights were chosen on the benchmark suite (benchmarks/suite.py,
# docs/tuning.md): a strong EM pull keeps each sub-prompt on the images it explains; the
# marginal entropy keeps sub-prompts in use when they start at the class text feature; the
# diversity term (no margin) pushes sub-prompts below the cosine that a class's true looks
# have, so it is off.
DEFAULT_ENTROPY_MODE: PF.EntropyMode = "marginal"

#: The keys of the loss's output dict; an extra regularizer's name may not be one of them.
OUTPUT_KEYS = ("loss", "ce", "mixture", "diversity", "entropy", "tau", "logits", "responsibilities")
#: What the loss itself hands to a regularizer that names it in its `inputs`.
BUILTIN_INPUTS = ("image_features", "subprompt_features", "labels", "logits")



def _check_sync(name: str, part: nn.Module, sync_distributed: bool) -> None:
    if bool(getattr(part, "sync_distributed", sync_distributed)) != sync_distributed:
        raise ValueError(
            f"{name}.sync_distributed must equal the loss's sync_distributed={sync_distributed} "
            f"but is {part.sync_distributed}; configure both the same way."
        )


def _inputs_of(module: nn.Module) -> tuple[str, ...]:
    """The keyword arguments a regularizer's `forward` takes (checked at construction)."""
    return cast(tuple[str, ...], module.inputs)


def _check_regularizers(
    regularizers: Mapping[str, tuple[nn.Module, float]],
) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """Validated `{name: module}` and `{name: weight}` from `{name: (module, weight)}`."""
    if not isinstance(regularizers, Mapping):
        raise TypeError(
            "regularizers must be a mapping {name: (module, weight)} but is "
            f"{type(regularizers).__name__}."
        )
    modules: dict[str, nn.Module] = {}
    weights: dict[str, float] = {}
    for name, entry in regularizers.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"regularizers keys must be identifiers but one is {name!r}.")
        if name in OUTPUT_KEYS:
            raise ValueError(
                f"regularizers[{name!r}] would shadow the loss's own output key {name!r}; "
                f"choose a name other than {', '.join(map(repr, OUTPUT_KEYS))}."
            )
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise TypeError(
                f"regularizers[{name!r}] must be a (module, weight) tuple but is {entry!r}."
            )
        module, weight = entry
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"regularizers[{name!r}] must hold an nn.Module but holds "
                f"{type(module).__name__}."
            )
        inputs = getattr(module, "inputs", None)
        if not (isinstance(inputs, tuple) and all(isinstance(i, str) for i in inputs)):
            raise TypeError(
                f"regularizers[{name!r}] ({type(module).__name__}) must declare the keyword "
                f"arguments it takes as a tuple of names in `inputs` but has {inputs!r}."
            )
        modules[name] = module
        weights[name] = check_positive(f"regularizers[{name!r}] weight", weight, allow_zero=True)
    return modules, weights


class MixtureOfPromptsLoss(nn.Module):
    r"""The training objective of a mixture of prompts, with the cure for mode collapse built in.

    $$
    L = \mathrm{CE}(\ell(x), y)
      + w_m \frac{1}{B}\sum_{b,k} \bar\gamma_{bk}\,(1 - \cos(x_b, t_{y_b k}))
      + w_d\,\mathrm{Div}(t_{\text{batch classes}})
      - w_e\,H(\gamma)
      + \sum_r w_r R_r
    $$

    - `ce`: cross-entropy of the class logits of `logits()`, which pool each class's K
      similarities (`aggregation`, default `"logsumexp"`: the mixture's log-likelihood, see
      `promptmix.functional.class_logits`).
    - `mixture`: the EM M-step: each sub-prompt is pulled toward the images assigned to it, with
      the `assigner`'s responsibilities $\bar\gamma$ *detached* (they are targets).
    - `diversity`: the `diversity` module over the classes present in the batch.
    - `entropy`: the `entropy` module on the *soft* responsibilities at `tau`, with their
      gradient, so maximising it moves the sub-prompts. Skipped when the assigner is `"hard"`
      (hard assignments have no entropy to spread).
    - one term per entry of `regularizers`, reported under its name.

    The parts are configured modules, passed in as pytorch-metric-learning's losses take reducers:
    `assigner=SoftEMAssigner(...)`, `entropy=AssignmentEntropy(...)`,
    `diversity=DiversityLoss(...)`. The default weights (mixture 10, entropy 1, diversity 0) come
    from `benchmarks/suite.py`; a weight of 0 switches its term off (it is reported as a
    graph-connected zero and not computed). The evidence for the defaults is in `docs/tuning.md`.

    **Extra regularizers.** `regularizers={"anchor": (PromptAnchor(), 8.0)}` adds
    $w \cdot R$ for each entry. Each module declares in its `inputs` attribute (a tuple of names)
    the keyword arguments its `forward` takes; the loss passes `image_features`,
    `subprompt_features` (all classes), `labels` and `logits` (the class logits, with their
    gradient) itself, and any other name, such as `anchor_features=`, must be passed to this
    loss's `forward` as a keyword argument. A name may not shadow a key of the output dict.

    Args:
        diversity_weight: $w_d \ge 0$.
        entropy_weight: $w_e \ge 0$.
        mixture_weight: $w_m \ge 0$.
        aggregation: how class logits pool the K sub-prompts: `"logsumexp"`, `"max"`,
            `"mean"` or `"responsibility"`.
        tau: a fixed temperature, or a `TemperatureSchedule` (stored as `self.schedule`,
            saved in `state_dict`; call `schedule.step()` once per iteration yourself).
        assigner: the E-step for the EM targets; default `SoftEMAssigner("soft")`.
        entropy: the entropy term; default `AssignmentEntropy("marginal")`. Give it
            `num_classes` and `n_subprompts` to keep a running usage estimate per class.
        diversity: the diversity term; default `DiversityLoss()`.
        regularizers: extra terms, `{name: (module, weight)}`.
        sync_distributed: gather the classes whose sub-prompts the diversity term sees across DDP
            processes; the default assigner and entropy are built with the same setting, and
            configured ones must match it.

    Shape:
        - image_features: `(batch, dim)`.
        - subprompt_features: `(num_classes, K, dim)`.
        - labels: `(batch,)` integer classes in `[0, num_classes)`.
        - output: a dict of tensors: `"loss"`, `"ce"`, `"mixture"`, `"diversity"`,
          `"entropy"` (scalars; `"entropy"` is the unweighted, positive entropy), `"tau"`
          (0-dim), `"logits"` `(batch, num_classes)` and `"responsibilities"`
          `(batch, K)`, the EM targets (both detached), and one unweighted scalar per extra
          regularizer.

    Examples:
        >>> import torch
        >>> from promptmix import AssignmentEntropy, SoftEMAssigner
        >>> _ = torch.manual_seed(0)
        >>> subprompts = torch.randn(5, 3, 16, requires_grad=True)
        >>> images, labels = torch.randn(8, 16), torch.randint(0, 5, (8,))
        >>> loss_fn = MixtureOfPromptsLoss(
        ...     tau=TemperatureSchedule(total_steps=100),
        ...     assigner=SoftEMAssigner("sinkhorn"),
        ...     entropy=AssignmentEntropy("marginal", num_classes=5, n_subprompts=3),
        ... )
        >>> out = loss_fn(images, subprompts, labels)
        >>> sorted(out)
        ['ce', 'diversity', 'entropy', 'logits', 'loss', 'mixture', 'responsibilities', 'tau']
        >>> out["loss"].backward(); loss_fn.schedule.step()
        >>> subprompts.grad.shape
        torch.Size([5, 3, 16])
        >>> loss_fn.logits(images, subprompts).shape  # the classifier, for evaluation
        torch.Size([8, 5])
    """

    schedule: TemperatureSchedule | None

    def __init__(
        self,
        *,
        diversity_weight: float = 0.0,
        entropy_weight: float = 1.0,
        mixture_weight: float = 10.0,
        aggregation: PF.Aggregation = "logsumexp",
        tau: float | TemperatureSchedule = 0.3,
        assigner: SoftEMAssigner | None = None,
        entropy: AssignmentEntropy | None = None,
        diversity: DiversityLoss | None = None,
        regularizers: Mapping[str, tuple[nn.Module, float]] | None = None,
        sync_distributed: bool = False,
    ):
        super().__init__()
        self.diversity_weight = check_positive(
            "diversity_weight", diversity_weight, allow_zero=True
        )
        self.entropy_weight = check_positive("entropy_weight", entropy_weight, allow_zero=True)
        self.mixture_weight = check_positive("mixture_weight", mixture_weight, allow_zero=True)
        self.aggregation: PF.Aggregation = check_choice(  # type: ignore[assignment]
            "aggregation", aggregation, PF.AGGREGATIONS
        )
        if isinstance(tau, TemperatureSchedule):
            self.schedule, self.fixed_tau = tau, None
        else:
            self.schedule, self.fixed_tau = None, check_positive("tau", tau)
        self.sync_distributed = bool(sync_distributed)
        for name, part, kind in (
            ("assigner", assigner, SoftEMAssigner),
            ("entropy", entropy, AssignmentEntropy),
            ("diversity", diversity, DiversityLoss),
        ):
            if part is not None and not isinstance(part, kind):
                raise TypeError(
                    f"{name} must be an instance of {kind.__name__} but is {type(part).__name__}."
                )
        if assigner is None:
            assigner = SoftEMAssigner("soft", sync_distributed=self.sync_distributed)
        if entropy is None:
            entropy = AssignmentEntropy(
                DEFAULT_ENTROPY_MODE, sync_distributed=self.sync_distributed
            )
        _check_sync("assigner", assigner, self.sync_distributed)
        _check_sync("entropy", entropy, self.sync_distributed)
        self.assigner = assigner
        self.entropy = entropy
        self.diversity = diversity if diversity is not None else DiversityLoss()
        modules, self.regularizer_weights = _check_regularizers(regularizers or {})
        self.regularizers = nn.ModuleDict(modules)

    def current_tau(self) -> float:
        """The temperature the next call uses when none is passed."""
        return self.schedule() if self.schedule is not None else float(self.fixed_tau)  # type: ignore[arg-type]

    def _class_logits(
        self, similarities: Tensor, logit_scale: float | Tensor, tau: float
    ) -> Tensor:
        return PF.class_logits(
            similarities,
            logit_scale=logit_scale,
            aggregation=self.aggregation,
            tau=tau,
            assigner_scale=self.assigner.scale,
        )

    def logits(
        self,
        image_features: Tensor,
        subprompt_features: Tensor,
        *,
        logit_scale: float | Tensor = 100.0,
        tau: float | None = None,
    ) -> Tensor:
        """The mixture's classifier: class logits that pool each class's K similarities.

        The same logits the loss trains on (`aggregation`), for evaluation and inference.

        Args:
            image_features: `(batch, dim)`, normalised or not.
            subprompt_features: `(num_classes, K, dim)`, normalised or not.
            logit_scale: positive float or 0-dim tensor, e.g. CLIP's `logit_scale.exp()`.
            tau: temperature of the `"responsibility"` aggregation; `None` takes the current one.

        Returns:
            `(batch, num_classes)` logits, with gradient where the inputs have one.
        """
        tau = self.current_tau() if tau is None else check_positive("tau", tau)
        similarities = PF.subprompt_similarities(image_features, subprompt_features)
        return self._class_logits(similarities, logit_scale, tau)

    def _regularizer_terms(
        self, zero: Tensor, available: dict[str, Tensor], extra: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        wanted = {name for module in self.regularizers.values() for name in _inputs_of(module)}
        unused = sorted(set(extra) - wanted)
        if unused:
            raise TypeError(
                f"forward() got keyword argument(s) {', '.join(unused)} that no regularizer "
                f"takes; the regularizers take: {', '.join(sorted(wanted)) or 'nothing'}."
            )
        terms: dict[str, Tensor] = {}
        for name, module in self.regularizers.items():
            missing = [i for i in _inputs_of(module) if i not in available and i not in extra]
            if missing:
                raise TypeError(
                    f"regularizer {name!r} ({type(module).__name__}) needs "
                    f"{', '.join(f'{m}=' for m in missing)} passed to the loss's forward()."
                )
            if not self.regularizer_weights[name]:
                terms[name] = zero
                continue
            kwargs = {i: extra[i] if i in extra else available[i] for i in _inputs_of(module)}
            terms[name] = module(**kwargs)
        return terms

    def forward(
        self,
        image_features: Tensor,
        subprompt_features: Tensor,
        labels: Tensor,
        *,
        logit_scale: float | Tensor = 100.0,
        tau: float | None = None,
        **regularizer_inputs: Tensor,
    ) -> dict[str, Tensor]:
        """Loss and its parts; see the class docstring for shapes.

        Args:
            image_features: `(batch, dim)`.
            subprompt_features: `(num_classes, K, dim)`.
            labels: `(batch,)` integer classes.
            logit_scale: the classifier's scale, e.g. CLIP's `logit_scale.exp()`.
            tau: the E-step temperature; `None` takes the schedule's (or the fixed) one.
            **regularizer_inputs: what the extra regularizers need beyond the loss's own
                inputs, e.g. `anchor_features=` for `PromptAnchor`.
        """
        tau = self.current_tau() if tau is None else check_positive("tau", tau)
        similarities = PF.subprompt_similarities(image_features, subprompt_features)
        num_classes = subprompt_features.shape[0]
        # `long` whatever integer dtype came in; the range is checked on the host only where
        # that is free (CPU), elsewhere a bad label makes the loss NaN (no device-to-host sync).
        labels = check_labels("labels", labels, image_features.shape[0], num_classes)
        invalid = None if reads_host(labels) else labels_out_of_range(labels, num_classes)
        if invalid is not None:
            labels = clamp_labels(labels, num_classes)
        zero = PF.connected_zero(image_features, subprompt_features)
        batch = similarities.shape[0]
        own = similarities[torch.arange(batch, device=labels.device), labels]  # (batch, K)
        if invalid is not None:
            own = nan_where(invalid.unsqueeze(1), own)

        logits = self._class_logits(similarities, logit_scale, tau)
        ce = F.cross_entropy(logits, labels) if batch else zero

        targets = self.assigner.from_similarities(own.detach(), labels, tau=tau)
        mixture = zero
        if self.mixture_weight and batch:
            mixture = (targets * (1 - own)).sum(dim=-1).mean()

        diversity = zero
        if self.diversity_weight and batch:
            # Under DDP every process penalises the classes of the *global* batch, so a run on N
            # processes matches one process with the same total batch.
            batch_labels = distributed.gather_no_grad(labels) if self.sync_distributed else labels
            # A mask of the classes present, not `subprompt_features[unique(labels)]`: fixed
            # shapes, so no device-to-host sync.
            present = torch.zeros(num_classes, dtype=torch.bool, device=labels.device)
            present = present.index_fill(0, batch_labels, True)
            diversity = self.diversity(subprompt_features, present)

        entropy = zero
        if self.entropy_weight and self.assigner.mode != "hard":
            soft = PF.responsibilities_from_similarities(own, tau=tau, scale=self.assigner.scale)
            entropy = self.entropy(soft, labels)

        available = {
            "image_features": image_features,
            "subprompt_features": subprompt_features,
            "labels": labels,
            "logits": logits,
        }
        extra_terms = self._regularizer_terms(zero, available, regularizer_inputs)

        loss = (
            ce
            + self.mixture_weight * mixture
            + self.diversity_weight * diversity
            - self.entropy_weight * entropy
        )
        for name, term in extra_terms.items():
            loss = loss + self.regularizer_weights[name] * term
        if invalid is not None:
            loss = nan_where(invalid.any(), loss)
        return {
            "loss": loss,
            "ce": ce,
            "mixture": mixture,
            "diversity": diversity,
            "entropy": entropy,
            "tau": torch.tensor(tau),
            "logits": logits.detach(),
            "responsibilities": targets.detach(),
            **extra_terms,
        }

    def extra_repr(self) -> str:
        weights = ", ".join(f"{name}={w}" for name, w in self.regularizer_weights.items())
        return (
            f"diversity_weight={self.diversity_weight}, entropy_weight={self.entropy_weight}, "
            f"mixture_weight={self.mixture_weight}, aggregation={self.aggregation!r}"
            + (f", regularizer_weights=({weights})" if weights else "")
        )
