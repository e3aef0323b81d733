"""`MixtureOfPromptsLoss`: classification, EM pull, diversity, entropy and extra regularizers."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from promptmix import distributed
from promptmix import functional as PF
from promptmix._validation import (
    check_choice,
    check_floating,
    check_labels,
    check_positive,
    check_unit_interval,
    clamp_labels,
    labels_out_of_range,
    nan_where,
    reads_host,
)
from promptmix.assignment import SoftEMAssigner
from promptmix.diversity import DiversityLoss
from promptmix.entropy import AssignmentEntropy
from promptmix.schedule import TemperatureSchedule
from promptmix.usage import UsageEstimate

__all__ = ["BUILTIN_INPUTS", "OUTPUT_KEYS", "LossPart", "MixtureOfPromptsLoss"]

#: The keys of the loss's output dict; an extra regularizer's name may not be one of them.
OUTPUT_KEYS = (
    "loss",
    "ce",
    "mixture",
    "diversity",
    "entropy",
    "prior",
    "tau",
    "logits",
    "responsibilities",
    "label_confidence",
)
#: What the loss itself hands to a part that names it in its `inputs`.
BUILTIN_INPUTS = (
    "image_features",
    "subprompt_features",
    "labels",
    "logits",
    "responsibilities",
    "usage_prior",
    "class_mask",
)


class LossPart(Protocol):
    """What plugs into `MixtureOfPromptsLoss`: an `nn.Module` whose `forward` takes the keyword
    arguments named in `inputs` and returns a 0-dim floating-point tensor.

    The loss passes `BUILTIN_INPUTS` itself; any other name comes from its `forward`'s keyword
    arguments. `DiversityLoss`, `AssignmentEntropy`, `UsageFloor` and the field's regularizers
    are parts; so is any module of yours that declares `inputs`.
    """

    inputs: tuple[str, ...]

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


def _inputs_of(name: str, module: object) -> tuple[str, ...]:
    """The inputs a part declares: the one protocol of every term of the loss."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{name} must hold an nn.Module but holds {type(module).__name__}.")
    inputs = getattr(module, "inputs", None)
    if not (isinstance(inputs, tuple) and all(isinstance(i, str) for i in inputs)):
        raise TypeError(
            f"{name} ({type(module).__name__}) must declare the keyword arguments its forward "
            f"takes as a tuple of names in `inputs` but has {inputs!r}."
        )
    return inputs


def _check_part(name: str, module: object) -> tuple[str, ...]:
    """`_inputs_of`, and that `forward` takes them and returns a scalar (at construction)."""
    inputs = _inputs_of(name, module)
    assert isinstance(module, nn.Module)
    parameters = inspect.signature(module.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = [i for i in inputs if i not in parameters and not takes_any]
    if unknown:
        raise TypeError(
            f"{name} ({type(module).__name__}) declares inputs {', '.join(unknown)} that its "
            "forward() does not take."
        )
    if getattr(module, "reduction", None) == "none":
        raise ValueError(
            f"{name} ({type(module).__name__}) has reduction='none' and returns one value per "
            "sample or class; a term of the loss must be a scalar: use 'mean' or 'sum'."
        )
    return inputs


def _check_sync(name: str, part: nn.Module, sync_distributed: bool) -> None:
    if bool(getattr(part, "sync_distributed", sync_distributed)) != sync_distributed:
        raise ValueError(
            f"{name}.sync_distributed must equal the loss's sync_distributed={sync_distributed} "
            f"but is {part.sync_distributed}; configure both the same way."
        )


def _check_regularizers(
    regularizers: Mapping[str, tuple[LossPart, float]],
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
        _check_part(f"regularizers[{name!r}]", module)
        assert isinstance(module, nn.Module)
        modules[name] = module
        weights[name] = check_positive(f"regularizers[{name!r}] weight", weight, allow_zero=True)
    return modules, weights


def _scalar_term(name: str, module: nn.Module, value: object) -> Tensor:
    """A part's output, if it is a 0-dim floating-point tensor (shapes only: no host read)."""
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() != 0:
        what = (
            f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            if isinstance(value, Tensor)
            else type(value).__name__
        )
        raise TypeError(
            f"{name} ({type(module).__name__}) must return a 0-dim floating-point tensor (a "
            f"scalar term of the loss) but returned {what}."
        )
    return value


class MixtureOfPromptsLoss(nn.Module):
    r"""The training objective of a mixture of prompts, with the cure for mode collapse built in.

    $$
    L = \frac{\sum_b w_b\,\mathrm{CE}(\ell(x_b), y_b)}{\sum_b w_b}
      + w_m \frac{1}{B}\sum_{b,k} w_b\,\bar\gamma_{bk}\,(1 - \cos(x_b, t_{y_b k}))
      + w_d\,\mathrm{Div}(t_{\text{batch classes}})
      - w_e\,H(\gamma)
      + \sum_r w_r R_r + P
    $$

    - `ce`: cross-entropy of the class logits of `logits()`, which pool each class's K
      similarities (`aggregation`, default `"logsumexp"`: the mixture's log-likelihood, see
      `promptmix.functional.class_logits`), each image weighted by $w_b$, the posterior that its
      label is right when a share `label_noise` of labels is flipped
      (`promptmix.functional.label_confidence`, reported as `"label_confidence"`): a flipped
      label or an outlier that another class explains far better weighs almost nothing.
    - `mixture`: the EM M-step: each sub-prompt is pulled toward the images assigned to it, with
      the `assigner`'s responsibilities $\bar\gamma$ *detached* (they are targets), weighted by
      $w_b$ too.
    - `diversity`: the `diversity` part over the classes present in the batch.
    - `entropy`: the `entropy` part on the *soft* responsibilities at `tau`, with their
      gradient, so maximising it moves the sub-prompts. Skipped when the assigner is `"hard"`
      (hard assignments have no entropy to spread).
    - one term per entry of `regularizers`, reported under its name.
    - `prior`: $P$, the learner's prior on its own parameters passed as `prior=` (for
      `OffsetMixtureOfPrompts`, `prompts.prior_loss()`: the text anchor and the shared-look
      prior); zero when none is passed.

    **One E-step per step.** The loss computes the soft responsibilities
    $\gamma = \operatorname{softmax}_k(s_a \cos / \tau)$ once (with the assigner's
    `logit_scale` $s_a$), derives the assigner's targets $\bar\gamma$ from the same scores, and
    hands $\gamma$ to every part that declares `"responsibilities"` in its `inputs`. With a
    `usage_estimate`, it hands its running usage to every part that declares `"usage_prior"`
    (`AssignmentEntropy`, `UsageFloor`) and then, in training mode, updates it once from
    $\gamma$: one estimate, without host syncs, that `SubpromptReviver` can read too.

    **One way to plug a part in.** Every term beyond the cross-entropy and the EM pull is an
    `nn.Module` that declares in its `inputs` attribute (a tuple of names) the keyword arguments
    its `forward` takes and returns a scalar: the `diversity=` and `entropy=` slots (whose
    weights and signs the loss owns) and each entry of `regularizers={name: (module, weight)}`
    alike. The loss passes what it has by name: `image_features`, `subprompt_features` (all
    classes), `labels`, `logits` (the class logits, with their gradient), `responsibilities`
    (soft, with their gradient), `usage_prior` (`None` without a `usage_estimate`) and
    `class_mask` (the classes in the batch); any other name, such as `anchor_features=`, must
    be passed to this loss's `forward` as a keyword argument. A name may not shadow a key of the
    output dict.

    **Weights.** The defaults (EM pull 1, entropy 0, diversity 0, label noise 0.1) come from
    `benchmarks/suite.py` (evidence in `docs/tuning.md`): with the shared-look start and the
    learner's prior, a stronger pull overrides the text prior at one shot, and the entropy term
    spreads one image over its sub-prompts when a class has one image in a batch. A weight of 0
    keeps a term out of the gradient: the term is still computed, without a graph, and reported,
    so its inputs are checked and it can be logged (NaN in it still makes the loss NaN, as the
    policy of `docs/reliability.md` asks).

    Args:
        diversity_weight: $w_d \ge 0$.
        entropy_weight: $w_e \ge 0$.
        mixture_weight: $w_m \ge 0$.
        label_noise: $\varepsilon \in [0, 1)$, the share of labels assumed flipped; 0 trusts
            every label (plain cross-entropy and pull).
        aggregation: how class logits pool the K sub-prompts: `"logsumexp"`, `"max"`,
            `"mean"` or `"responsibility"`.
        tau: a fixed temperature, or a `TemperatureSchedule` (stored as `self.schedule`,
            saved in `state_dict`; call `step()` on it once per iteration yourself).
        assigner: the E-step for the EM targets; default `SoftEMAssigner()` (soft).
        entropy: the entropy part; default `AssignmentEntropy()` (marginal).
        diversity: the diversity part; default `DiversityLoss()`.
        usage_estimate: a `UsageEstimate` the loss updates and hands to the parts as
            `usage_prior`, or `None`.
        regularizers: extra terms, `{name: (module, weight)}`.
        sync_distributed: gather the classes whose sub-prompts the diversity term sees, and the
            rows of the usage update, across DDP processes; the default assigner and entropy
            are built with the same setting, and configured ones must match it.

    Shape:
        - image_features: `(batch, dim)`.
        - subprompt_features: `(num_classes, K, dim)` (`(num_classes, dim)`: `K = 1`).
        - labels: `(batch,)` integer classes in `[0, num_classes)`.
        - output: a dict of tensors: `"loss"`, `"ce"`, `"mixture"`, `"diversity"`,
          `"entropy"`, `"prior"` (scalars; `"entropy"` is the unweighted, positive entropy),
          `"tau"` (0-dim), `"logits"` `(batch, num_classes)`, `"responsibilities"`
          `(batch, K)`, the EM targets, and `"label_confidence"` `(batch,)` (all three
          detached), and one unweighted scalar per extra regularizer.

    Raises:
        TypeError: At construction, on a part that is not a module declaring its `inputs`; in
            `forward`, on a keyword input no part takes, an input a part needs that was not
            given, or a part that returns something other than a 0-dim floating-point tensor.
        ValueError: On a part with `reduction="none"` or a `sync_distributed` that differs
            from the loss's.

    Examples:
        >>> import torch
        >>> from promptmix import SoftEMAssigner, UsageEstimate
        >>> _ = torch.manual_seed(0)
        >>> subprompts = torch.randn(5, 3, 16, requires_grad=True)
        >>> images, labels = torch.randn(8, 16), torch.randint(0, 5, (8,))
        >>> schedule = TemperatureSchedule(total_steps=100)
        >>> loss_fn = MixtureOfPromptsLoss(
        ...     tau=schedule,
        ...     assigner=SoftEMAssigner(mode="sinkhorn"),
        ...     usage_estimate=UsageEstimate(num_classes=5, n_subprompts=3),
        ... )
        >>> out = loss_fn(images, subprompts, labels)
        >>> sorted(out)  # doctest: +NORMALIZE_WHITESPACE
        ['ce', 'diversity', 'entropy', 'label_confidence', 'logits', 'loss', 'mixture', 'prior',
         'responsibilities', 'tau']
        >>> out["loss"].backward(); schedule.step()
        >>> subprompts.grad.shape
        torch.Size([5, 3, 16])
        >>> loss_fn.logits(images, subprompts).shape  # the classifier, for evaluation
        torch.Size([8, 5])
    """

    schedule: TemperatureSchedule | None
    usage_estimate: UsageEstimate | None

    def __init__(
        self,
        *,
        diversity_weight: float = 0.0,
        entropy_weight: float = 0.0,
        mixture_weight: float = 1.0,
        label_noise: float = 0.1,
        aggregation: PF.Aggregation = "logsumexp",
        tau: float | TemperatureSchedule = PF.DEFAULT_TAU,
        assigner: SoftEMAssigner | None = None,
        entropy: LossPart | None = None,
        diversity: LossPart | None = None,
        usage_estimate: UsageEstimate | None = None,
        regularizers: Mapping[str, tuple[LossPart, float]] | None = None,
        sync_distributed: bool = False,
    ):
        super().__init__()
        self.diversity_weight = check_positive(
            "diversity_weight", diversity_weight, allow_zero=True
        )
        self.entropy_weight = check_positive("entropy_weight", entropy_weight, allow_zero=True)
        self.mixture_weight = check_positive("mixture_weight", mixture_weight, allow_zero=True)
        self.label_noise = check_unit_interval("label_noise", label_noise)
        self.aggregation: PF.Aggregation = check_choice(  # type: ignore[assignment]
            "aggregation", aggregation, PF.AGGREGATIONS
        )
        if isinstance(tau, TemperatureSchedule):
            self.schedule, self.fixed_tau = tau, None
        else:
            self.schedule, self.fixed_tau = None, check_positive("tau", tau)
        self.sync_distributed = bool(sync_distributed)
        if assigner is not None and not isinstance(assigner, SoftEMAssigner):
            raise TypeError(
                f"assigner must be an instance of SoftEMAssigner but is {type(assigner).__name__}."
            )
        if usage_estimate is not None and not isinstance(usage_estimate, UsageEstimate):
            raise TypeError(
                "usage_estimate must be an instance of UsageEstimate but is "
                f"{type(usage_estimate).__name__}."
            )
        if assigner is None:
            assigner = SoftEMAssigner(sync_distributed=self.sync_distributed)
        if entropy is None:
            entropy = AssignmentEntropy(sync_distributed=self.sync_distributed)
        if diversity is None:
            diversity = DiversityLoss()
        _check_part("entropy", entropy)
        _check_part("diversity", diversity)
        assert isinstance(entropy, nn.Module) and isinstance(diversity, nn.Module)
        _check_sync("assigner", assigner, self.sync_distributed)
        _check_sync("entropy", entropy, self.sync_distributed)
        self.assigner = assigner
        self.entropy = entropy
        self.diversity = diversity
        self.usage_estimate = usage_estimate
        modules, self.regularizer_weights = _check_regularizers(regularizers or {})
        self.regularizers = nn.ModuleDict(modules)

    def current_tau(self) -> float:
        """The temperature the next call uses when none is passed."""
        if self.schedule is not None:
            return self.schedule()
        assert self.fixed_tau is not None
        return self.fixed_tau

    def _class_logits(
        self, similarities: Tensor, logit_scale: float | Tensor, tau: float
    ) -> Tensor:
        return PF.class_logits(
            similarities,
            logit_scale=logit_scale,
            aggregation=self.aggregation,
            tau=tau,
            assignment_logit_scale=self.assigner.logit_scale,
        )

    def logits(
        self,
        image_features: Tensor,
        subprompt_features: Tensor,
        *,
        logit_scale: float | Tensor = PF.DEFAULT_LOGIT_SCALE,
        tau: float | None = None,
    ) -> Tensor:
        """The mixture's classifier: class logits that pool each class's K similarities.

        The same logits the loss trains on (`aggregation`), for evaluation and inference.

        Args:
            image_features: `(batch, dim)`, normalised or not.
            subprompt_features: `(num_classes, K, dim)` (or `(num_classes, dim)`), normalised
                or not.
            logit_scale: positive float or 0-dim tensor, e.g. CLIP's `logit_scale.exp()`.
            tau: temperature of the `"responsibility"` aggregation; `None` takes the current one.

        Returns:
            `(batch, num_classes)` logits, with gradient where the inputs have one.
        """
        tau = self.current_tau() if tau is None else check_positive("tau", tau)
        similarities = PF.subprompt_similarities(image_features, subprompt_features)
        return self._class_logits(similarities, logit_scale, tau)

    def _parts(self) -> list[tuple[str, nn.Module, tuple[str, ...], float, float]]:
        """`(name, module, inputs, weight, sign)` of every term fed through declared inputs."""
        slots: list[tuple[str, nn.Module, float, float]] = [
            ("diversity", self.diversity, self.diversity_weight, 1.0)
        ]
        if self.assigner.mode != "hard":
            slots.append(("entropy", self.entropy, self.entropy_weight, -1.0))
        slots += [
            (name, module, self.regularizer_weights[name], 1.0)
            for name, module in self.regularizers.items()
        ]
        return [
            (name, module, _inputs_of(name, module), weight, sign)
            for name, module, weight, sign in slots
        ]

    def forward(
        self,
        image_features: Tensor,
        subprompt_features: Tensor,
        labels: Tensor,
        prior: Tensor | None = None,
        *,
        logit_scale: float | Tensor = PF.DEFAULT_LOGIT_SCALE,
        tau: float | None = None,
        **regularizer_inputs: Tensor,
    ) -> dict[str, Tensor]:
        """Loss and its parts; see the class docstring for shapes.

        Args:
            image_features: `(batch, dim)`.
            subprompt_features: `(num_classes, K, dim)` (or `(num_classes, dim)`).
            labels: `(batch,)` integer classes.
            prior: a 0-dim penalty on the prompt learner's parameters, added to the loss and
                reported under `"prior"`: the learner's `prior_loss()`; `None` adds nothing.
            logit_scale: the classifier's scale, e.g. CLIP's `logit_scale.exp()`.
            tau: the E-step temperature; `None` takes the schedule's (or the fixed) one.
            **regularizer_inputs: what the parts need beyond the loss's own inputs, e.g.
                `anchor_features=` for `PromptAnchor`.
        """
        tau = self.current_tau() if tau is None else check_positive("tau", tau)
        if prior is not None:
            prior = check_floating("prior", prior)
            if prior.dim() != 0:
                raise ValueError(
                    f"prior must be a 0-dim tensor (e.g. prompts.prior_loss()) but has shape "
                    f"{tuple(prior.shape)}."
                )
        parts = self._parts()
        wanted = {name for _, _, inputs, _, _ in parts for name in inputs}
        unused = sorted(set(regularizer_inputs) - wanted)
        if unused:
            raise TypeError(
                f"forward() got keyword argument(s) {', '.join(unused)} that no part takes; "
                f"the parts take: {', '.join(sorted(wanted)) or 'nothing'}."
            )
        for name, module, inputs, _, _ in parts:
            missing = [i for i in inputs if i not in BUILTIN_INPUTS and i not in regularizer_inputs]
            if missing:
                raise TypeError(
                    f"{name} ({type(module).__name__}) needs "
                    f"{', '.join(f'{m}=' for m in missing)} passed to the loss's forward()."
                )

        similarities = PF.subprompt_similarities(image_features, subprompt_features)
        num_classes = similarities.shape[1]
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
        # How much each label is trusted (an E-step over "is this label right"): constants that
        # weigh the image's cross-entropy and its pull on the sub-prompts.
        confidence = PF.label_confidence(logits, labels, label_noise=self.label_noise)
        if not batch:
            ce = zero
        elif self.label_noise:
            per_image = F.cross_entropy(logits, labels, reduction="none")
            ce = (confidence * per_image).sum() / confidence.sum().clamp_min(1e-12)
        else:
            ce = F.cross_entropy(logits, labels)

        # The E-step, once: soft responsibilities with their gradient for the parts, and the
        # assigner's targets from the same scores.
        soft, assigned = self.assigner._estep(own, labels, tau=tau)
        targets = assigned.detach()
        pull = targets * confidence.unsqueeze(1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(self.mixture_weight)):
            mixture = (pull * (1 - own)).sum(dim=-1).mean() if batch else zero

        # Under DDP every process sees the classes of the *global* batch, so a run on N
        # processes matches one process with the same total batch. A mask, not
        # `subprompt_features[unique(labels)]`: fixed shapes, so no device-to-host sync.
        batch_labels = distributed.gather_no_grad(labels) if self.sync_distributed else labels
        class_mask = torch.zeros(num_classes, dtype=torch.bool, device=labels.device)
        class_mask = class_mask.index_fill(0, batch_labels, True)
        usage_prior = None if self.usage_estimate is None else self.usage_estimate._prior(soft)
        available: dict[str, Tensor | None] = {
            "image_features": image_features,
            "subprompt_features": subprompt_features,
            "labels": labels,
            "logits": logits,
            "responsibilities": soft,
            "usage_prior": usage_prior,
            "class_mask": class_mask,
        }

        terms: dict[str, Tensor] = {"entropy": zero}
        loss = ce + self.mixture_weight * mixture
        for name, module, inputs, weight, sign in parts:
            kwargs = {
                i: regularizer_inputs[i] if i in regularizer_inputs else available[i]
                for i in inputs
            }
            # A weight of 0: computed and reported, without a graph.
            with torch.set_grad_enabled(torch.is_grad_enabled() and bool(weight)):
                term = _scalar_term(name, module, module(**kwargs))
            terms[name] = term
            loss = loss + (sign * weight) * term

        if self.usage_estimate is not None and self.training and batch:
            rows, row_labels = soft.detach(), labels
            if self.sync_distributed:
                rows = distributed.gather_no_grad(rows)
                row_labels = distributed.gather_no_grad(labels)
            self.usage_estimate.update(rows, row_labels)

        prior_term = zero if prior is None else prior
        loss = loss + prior_term
        if invalid is not None:
            loss = nan_where(invalid.any(), loss)
        builtin = {
            "diversity": terms.pop("diversity"),
            "entropy": terms.pop("entropy"),
            "prior": prior_term,
        }
        return {
            "loss": loss,
            "ce": ce,
            "mixture": mixture,
            **builtin,
            "tau": torch.tensor(tau),
            "logits": logits.detach(),
            "responsibilities": targets,
            "label_confidence": confidence,
            **terms,
        }

    def extra_repr(self) -> str:
        weights = ", ".join(f"{name}={w}" for name, w in self.regularizer_weights.items())
        return (
            f"diversity_weight={self.diversity_weight}, entropy_weight={self.entropy_weight}, "
            f"mixture_weight={self.mixture_weight}, aggregation={self.aggregation!r}"
            + (f", regularizer_weights=({weights})" if weights else "")
        )
