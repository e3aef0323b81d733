"""The field's prompt-learning regularizers as modules for `MixtureOfPromptsLoss(regularizers=...)`.

Each module is a thin, validated wrapper around a function of `promptmix.functional` and declares
in `inputs` the keyword arguments its `forward` takes, so the loss can feed it. A frozen reference
(hand-crafted prompt features, zero-shot text features, prototypes) can be given once to the
constructor instead of to every call: it is kept as a non-persistent buffer (it moves with
`.to(device)`, stays out of checkpoints, as CoOp's fixed token embeddings do) and its name leaves
`inputs`.

Weights of the original methods (the weight is the loss's, not the module's; the pages of
`docs/regularizers/` give them per dataset):

| module | original | weight there |
|---|---|---|
| `PromptAnchor()` | KgCoOp `trainers/kgcoop.py` | 8 (every dataset) |
| `PromptAnchor(distance="l1")` | PromptSRC `trainers/promptsrc.py` (text) | 25 |
| `ZeroShotConsistency(average_over_classes=True)` | PromptSRC `L_SCL_logits` | 1 |
| `ZeroShotConsistency()` | ProGrad `trainers/prograd.py` (KD) | used for the projection |
| `TextToTextLoss()` | LASP `prompting/lasp.py` | 5, or 10 on Caltech101, DTD, UCF101 |
| `InterClassDispersion()` | DAPT `trainers/dapt.py` (text) | 0.01 on 7 of 11 datasets; 0.1, 10 |
| `ImagePrototypeLoss()` | DAPT `trainers/dapt.py` (image) | 0.01 to 100 by dataset |
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from promptmix import functional as PF
from promptmix._validation import (
    as_subprompts,
    check_choice,
    check_finite,
    check_floating,
    check_int,
    check_positive,
    check_rank,
    check_unit_interval,
)
from promptmix.functional._common import _unit
from promptmix.functional.consistency import _check_temperature

__all__ = [
    "ImagePrototypeLoss",
    "InterClassDispersion",
    "PromptAnchor",
    "TextToTextLoss",
    "ZeroShotConsistency",
]


def _frozen(name: str, value: Tensor | None) -> Tensor | None:
    """A detached copy of a frozen reference, checked once: it must be finite."""
    if value is None:
        return None
    return check_finite(name, check_floating(name, value)).detach().clone()


def _given(name: str, value: Tensor | None, stored: Tensor | None) -> Tensor:
    """The tensor passed to forward, else the one stored at construction."""
    if value is not None and stored is not None:
        raise TypeError(f"{name} was given to the constructor; do not pass it to forward() too.")
    if value is None and stored is None:
        raise TypeError(f"forward() needs {name}= (or give it to the constructor once).")
    return value if value is not None else stored  # type: ignore[return-value]


class PromptAnchor(nn.Module):
    r"""Keeps learned text features near frozen hand-crafted prompt features (KgCoOp, PromptSRC).

    $$
    R = \frac{1}{C K} \sum_{c, k} d\left(\hat t_{ck}, \hat a_{c}\right), \qquad
    d = 1 - \cos \text{ (default)},\ \lVert \hat t - \hat a \rVert_2^2,\ \text{or }
    \tfrac{1}{D} \lVert \hat t - \hat a \rVert_1
    $$

    Identical features give 0, orthogonal ones 1 (cosine distance); the value is `>= 0` up to
    float rounding. KgCoOp (htyao89/KgCoOp `trainers/kgcoop.py`) uses `1 - mean(cos)` with
    weight 8 on every dataset and one template per dataset ("a photo of a {}." for Stanford
    Cars); its paper writes the squared L2 distance (`distance="l2"`, twice the cosine distance
    on unit vectors). PromptSRC (muzairkhattak/PromptSRC `trainers/promptsrc.py`) uses the L1
    distance (`distance="l1"`) with weight 25 to the mean feature of a template ensemble. Give
    `anchor_features` as the mean over templates for an ensemble.

    Args:
        distance: `"cosine"`, `"l2"` or `"l1"`.
        reduction: `"mean"` or `"sum"` over classes and sub-prompts, or `"none"` (not as a loss
            term: `MixtureOfPromptsLoss` needs a scalar).
        anchor_features: the frozen anchors `(num_classes, dim)` or `(num_classes, K, dim)`,
            stored once (they must be finite); `None` to pass them to every call.

    Shape:
        - subprompt_features: `(num_classes, K, dim)` or `(num_classes, dim)`.
        - anchor_features: `(num_classes, dim)` or `(num_classes, K, dim)`.
        - output: scalar, or `(num_classes, K)` with `reduction="none"`.

    Examples:
        >>> import torch
        >>> from promptmix import MixtureOfPromptsLoss
        >>> anchors = torch.eye(4)[:3]  # 3 classes, dim 4
        >>> PromptAnchor()(anchors.unsqueeze(1).expand(3, 2, 4), anchors)
        tensor(0.)
        >>> loss_fn = MixtureOfPromptsLoss(regularizers={"anchor": (PromptAnchor(), 8.0)})
        >>> out = loss_fn(torch.randn(5, 4), torch.randn(3, 2, 4), torch.tensor([0, 1, 2, 0, 1]),
        ...               anchor_features=anchors)
        >>> out["anchor"].shape
        torch.Size([])
    """

    anchor_features: Tensor | None

    def __init__(
        self,
        *,
        distance: PF.AnchorDistance = "cosine",
        reduction: PF.Reduction = "mean",
        anchor_features: Tensor | None = None,
    ):
        super().__init__()
        self.distance: PF.AnchorDistance = check_choice(  # type: ignore[assignment]
            "distance", distance, PF.ANCHOR_DISTANCES
        )
        self.reduction: PF.Reduction = check_choice(  # type: ignore[assignment]
            "reduction", reduction, PF.REDUCTIONS
        )
        self.register_buffer(
            "anchor_features", _frozen("anchor_features", anchor_features), persistent=False
        )
        self.inputs: tuple[str, ...] = ("subprompt_features",) + (
            ("anchor_features",) if anchor_features is None else ()
        )

    def forward(self, subprompt_features: Tensor, anchor_features: Tensor | None = None) -> Tensor:
        """Anchor loss of `subprompt_features` against `anchor_features` (or the stored ones)."""
        anchors = _given("anchor_features", anchor_features, self.anchor_features)
        return PF.prompt_anchor_loss(
            subprompt_features, anchors, distance=self.distance, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        stored = ", anchor_features stored" if self.anchor_features is not None else ""
        return f"distance={self.distance!r}, reduction={self.reduction!r}{stored}"


class ZeroShotConsistency(nn.Module):
    r"""Distils the frozen zero-shot classifier into the learned one (PromptSRC, ProGrad).

    $$
    R = T^2\, \mathrm{KL}\left(\mathrm{softmax}(z / T)
        \,\middle\|\, \mathrm{softmax}(\ell / T)\right)
      + w_t\, \tfrac{1}{CKD} \sum \lvert \hat t_{ck} - \hat a_c \rvert
      + w_i\, \tfrac{1}{BD} \sum \lvert \hat x_b - \hat x^{zs}_b \rvert
    $$

    $\ell$ are the learned logits, $z$ the zero-shot logits of the hand-crafted prompts; the
    KL is averaged over the batch (`reduction="mean"`), each sample's divided by `num_classes`
    as in PromptSRC with `average_over_classes=True`; see
    `promptmix.functional.zero_shot_consistency`. Equal logits give 0; `>= 0` up to float
    rounding; NaN logits (or NaN stored features) give NaN.

    The optional L1 terms are PromptSRC's `L_SCL_text` (weight 25, text features to the
    template-ensemble mean) and `L_SCL_image` (weight 10, prompted image features to the frozen
    encoder's); they are off by default (`text_weight = image_weight = 0`). PromptSRC in full,
    on every dataset: `ZeroShotConsistency(average_over_classes=True, text_weight=25,
    image_weight=10)` with loss weight 1. (muzairkhattak/PromptSRC `trainers/promptsrc.py`;
    ProGrad: BeierZhu/Prompt-align `trainers/prograd.py`, `T = 1`.)

    **Where the zero-shot logits come from.** Pass `zero_shot_logits=` to each call, or give
    `zero_shot_text_features` (`(num_classes, dim)`, the hand-crafted classifier) once: the
    module then computes $z = s \cdot \cos(x, a)$ from the loss's `image_features`, which is
    exact when the image tower is frozen (as in CoOp-style prompt learning), and uses the same
    features as the anchors of the text L1 term. `logit_scale` $s$ should equal the one the
    loss's logits use (CLIP's `logit_scale.exp()`, 100).

    Args:
        temperature: the distillation temperature $T > 0$ (not the E-step's `tau`).
        reduction: `"mean"` or `"sum"` over the samples, or `"none"` (not as a loss term).
        average_over_classes: divide each sample's KL by `num_classes` (PromptSRC).
        text_weight: $w_t \ge 0$ of the text L1 term.
        image_weight: $w_i \ge 0$ of the image L1 term.
        zero_shot_text_features: the frozen hand-crafted classifier `(num_classes, dim)`,
            stored once (it must be finite); `None` to pass `zero_shot_logits=` (and
            `anchor_features=`) instead.
        logit_scale: $s$ for logits computed from `zero_shot_text_features`.

    Shape:
        - logits, zero_shot_logits: `(batch, num_classes)`.
        - image_features: `(batch, dim)` (zero-shot logits from stored features; image term).
        - subprompt_features: `(num_classes, K, dim)` or `(num_classes, dim)` (text term).
        - anchor_features: `(num_classes, dim)` (text term without stored features).
        - zero_shot_image_features: `(batch, dim)` (image term).
        - output: scalar, or `(batch,)` with `reduction="none"` and no L1 terms.

    Examples:
        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
        >>> ZeroShotConsistency(temperature=2.0)(logits, logits)
        tensor(0.)
        >>> ZeroShotConsistency().inputs
        ('logits', 'zero_shot_logits')
        >>> ZeroShotConsistency(zero_shot_text_features=torch.eye(3)).inputs
        ('logits', 'image_features')
    """

    zero_shot_text_features: Tensor | None

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        reduction: PF.Reduction = "mean",
        average_over_classes: bool = False,
        text_weight: float = 0.0,
        image_weight: float = 0.0,
        zero_shot_text_features: Tensor | None = None,
        logit_scale: float = PF.DEFAULT_LOGIT_SCALE,
    ):
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.reduction: PF.Reduction = check_choice(  # type: ignore[assignment]
            "reduction", reduction, PF.REDUCTIONS
        )
        self.average_over_classes = bool(average_over_classes)
        self.text_weight = check_positive("text_weight", text_weight, allow_zero=True)
        self.image_weight = check_positive("image_weight", image_weight, allow_zero=True)
        if reduction == "none" and (self.text_weight or self.image_weight):
            raise ValueError(
                "reduction='none' gives one value per sample and cannot add the L1 terms; use "
                "text_weight=0 and image_weight=0, or another reduction."
            )
        self.logit_scale = check_positive("logit_scale", logit_scale)
        text = _frozen("zero_shot_text_features", zero_shot_text_features)
        if text is not None and text.dim() != 2:
            raise ValueError(
                "zero_shot_text_features must have shape (num_classes, dim) but has shape "
                f"{tuple(text.shape)}."
            )
        self.register_buffer("zero_shot_text_features", text, persistent=False)
        stored = text is not None
        names = ["logits", "image_features" if stored else "zero_shot_logits"]
        if self.text_weight:
            names += ["subprompt_features"] + ([] if stored else ["anchor_features"])
        if self.image_weight:
            names += ["image_features", "zero_shot_image_features"]
        self.inputs: tuple[str, ...] = tuple(dict.fromkeys(names))

    def forward(
        self,
        logits: Tensor,
        zero_shot_logits: Tensor | None = None,
        image_features: Tensor | None = None,
        subprompt_features: Tensor | None = None,
        anchor_features: Tensor | None = None,
        zero_shot_image_features: Tensor | None = None,
    ) -> Tensor:
        """KL to the zero-shot logits, plus the L1 terms whose weights are positive."""
        text = self.zero_shot_text_features
        if text is not None:
            if zero_shot_logits is not None:
                raise TypeError(
                    "zero_shot_logits are computed from the stored zero_shot_text_features; do "
                    "not pass them too."
                )
            if image_features is None:
                raise TypeError("forward() needs image_features= to compute the zero-shot logits.")
            with torch.no_grad():
                similarities = PF.subprompt_similarities(image_features, text.unsqueeze(1))
                zero_shot_logits = self.logit_scale * similarities.squeeze(-1)
        elif zero_shot_logits is None:
            raise TypeError("forward() needs zero_shot_logits= (or zero_shot_text_features).")
        loss = PF.zero_shot_consistency(
            logits,
            zero_shot_logits,
            temperature=self.temperature,
            reduction=self.reduction,
            average_over_classes=self.average_over_classes,
        )
        if self.text_weight:
            if subprompt_features is None:
                raise TypeError("forward() needs subprompt_features= for the text L1 term.")
            anchors = _given("anchor_features", anchor_features, text)
            loss = loss + self.text_weight * PF.prompt_anchor_loss(
                subprompt_features, anchors, distance="l1"
            )
        if self.image_weight:
            if image_features is None or zero_shot_image_features is None:
                raise TypeError(
                    "forward() needs image_features= and zero_shot_image_features= for the "
                    "image L1 term."
                )
            loss = loss + self.image_weight * PF.prompt_anchor_loss(
                image_features, zero_shot_image_features, distance="l1"
            )
        return loss

    def extra_repr(self) -> str:
        stored = self.zero_shot_text_features is not None
        return (
            f"temperature={self.temperature}, reduction={self.reduction!r}, "
            f"average_over_classes={self.average_over_classes}, "
            f"text_weight={self.text_weight}, image_weight={self.image_weight}"
            + (", zero_shot_text_features stored" if stored else "")
        )


class TextToTextLoss(nn.Module):
    r"""Hand-crafted prompt features classified by the learned prompts (LASP).

    $$
    R = \frac{1}{M C} \sum_{m, c} -\log \mathrm{softmax}_c\left(
        s \cdot \mathrm{pool}_k \cos(\tilde a_{mc}, t_{\cdot k})\right)
    $$

    See `promptmix.functional.text_to_text_loss`. In training mode, with probability
    `noise_probability` per call, Gaussian noise of standard deviation `noise_std` is added to
    the unit template features $\tilde a$ (LASP: 0.05 with probability 0.5; here off by default,
    `noise_std = 0`; the noisy features are renormalised here, LASP's are not). LASP
    (1adrianb/lasp `prompting/lasp.py`) weighs the term 5, or 10 on Caltech101, DTD and UCF101,
    and uses `logit_scale = exp(CLIP's logit_scale) = 100` and 35 templates.

    **Extra classes** (LASP's "virtual classes"). LASP computes this loss over all the class
    names it knows, new classes included, though it sees no image of them. Build the module with
    `extra_classes=E` and template features of `num_classes + E` classes (the training classes
    first), and pass the learned features of the E extra names as `extra_subprompt_features=`
    (e.g. a `MixtureOfPrompts` with `class_specific=False` built on those names): they join the
    classifier here and nowhere else.

    Args:
        logit_scale: $s > 0$.
        aggregation: how each class's K similarities pool (see `class_logits`).
        reduction: `"mean"`, `"sum"` or `"none"` (not as a loss term).
        noise_std: standard deviation of the target noise, `>= 0`.
        noise_probability: probability in `[0, 1]` that a training call adds noise.
        extra_classes: number `E >= 0` of class names without images.
        template_features: the frozen `(C, dim)` or `(M, C, dim)` template features of the
            `C = num_classes + extra_classes` names, stored once (they must be finite); `None`
            to pass `template_features=` to every call.

    Shape:
        - subprompt_features: `(num_classes, K, dim)` or `(num_classes, dim)`.
        - template_features: `(C, dim)` or `(M, C, dim)`.
        - extra_subprompt_features: `(E, K, dim)` or `(E, dim)`, with `extra_classes=E`.
        - output: scalar, or `(M, C)` with `reduction="none"`.

    Examples:
        >>> import torch
        >>> TextToTextLoss(logit_scale=10.0)(torch.eye(3), torch.eye(3)) < 0.01
        tensor(True)
        >>> virtual = TextToTextLoss(
        ...     logit_scale=10.0, extra_classes=1, template_features=torch.eye(3)
        ... )
        >>> virtual.inputs
        ('subprompt_features', 'extra_subprompt_features')
        >>> virtual(torch.eye(3)[:2], extra_subprompt_features=torch.eye(3)[2:]) < 0.01
        tensor(True)
    """

    template_features: Tensor | None

    def __init__(
        self,
        *,
        logit_scale: float = PF.DEFAULT_LOGIT_SCALE,
        aggregation: PF.Aggregation = "logsumexp",
        reduction: PF.Reduction = "mean",
        noise_std: float = 0.0,
        noise_probability: float = 0.5,
        extra_classes: int = 0,
        template_features: Tensor | None = None,
    ):
        super().__init__()
        self.logit_scale = check_positive("logit_scale", logit_scale)
        self.aggregation: PF.Aggregation = check_choice(  # type: ignore[assignment]
            "aggregation", aggregation, PF.AGGREGATIONS
        )
        self.reduction: PF.Reduction = check_choice(  # type: ignore[assignment]
            "reduction", reduction, PF.REDUCTIONS
        )
        self.noise_std = check_positive("noise_std", noise_std, allow_zero=True)
        self.noise_probability = check_unit_interval(
            "noise_probability", noise_probability, closed_right=True
        )
        self.extra_classes = check_int("extra_classes", extra_classes, minimum=0)
        stored = _frozen("template_features", template_features)
        if stored is not None:
            check_rank("template_features", stored, (2, 3), "(C, dim) or (M, C, dim)")
            if stored.shape[-2] <= self.extra_classes:
                raise ValueError(
                    f"template_features must hold more than extra_classes={self.extra_classes} "
                    f"classes (the training classes, then the extra ones) but has shape "
                    f"{tuple(stored.shape)}."
                )
        self.register_buffer("template_features", stored, persistent=False)
        self.inputs: tuple[str, ...] = (
            ("subprompt_features",)
            + (("template_features",) if template_features is None else ())
            + (("extra_subprompt_features",) if self.extra_classes else ())
        )

    def forward(
        self,
        subprompt_features: Tensor,
        template_features: Tensor | None = None,
        extra_subprompt_features: Tensor | None = None,
    ) -> Tensor:
        """Text-to-text cross-entropy of the (possibly noised) templates."""
        templates = _given("template_features", template_features, self.template_features)
        if self.extra_classes:
            if extra_subprompt_features is None:
                raise TypeError(
                    f"forward() needs extra_subprompt_features= for the extra_classes="
                    f"{self.extra_classes} class names without images."
                )
            extra = as_subprompts("extra_subprompt_features", extra_subprompt_features)
            if extra.shape[0] != self.extra_classes:
                raise ValueError(
                    f"extra_subprompt_features must hold extra_classes={self.extra_classes} "
                    f"classes but has shape {tuple(extra_subprompt_features.shape)}."
                )
        elif extra_subprompt_features is not None:
            raise TypeError(
                "extra_subprompt_features were given but this TextToTextLoss was built with "
                "extra_classes=0; build it with extra_classes=E."
            )
        if self.training and self.noise_std and self.noise_probability:
            # Drawn on the device and applied with `where`: no host read in a training step.
            units = _unit(check_floating("template_features", templates))
            noisy = units + self.noise_std * torch.randn_like(units)
            draw = torch.rand((), device=units.device) < self.noise_probability
            templates = torch.where(draw, noisy, templates)
        return PF.text_to_text_loss(
            subprompt_features,
            templates,
            extra_subprompt_features,
            logit_scale=self.logit_scale,
            aggregation=self.aggregation,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"logit_scale={self.logit_scale}, aggregation={self.aggregation!r}, "
            f"reduction={self.reduction!r}, noise_std={self.noise_std}, "
            f"noise_probability={self.noise_probability}, extra_classes={self.extra_classes}"
        )


class InterClassDispersion(nn.Module):
    r"""Spreads the text features of different classes apart (DAPT's text term).

    $$
    R = \operatorname{mean}_{c < c',\, k,\, k'}
        \exp\left(-t \lVert \hat t_{ck} - \hat t_{c'k'} \rVert_2^2\right)
    $$

    A Gaussian potential over squared distances on the unit sphere: close classes cost up to 1,
    anti-parallel ones $e^{-4t}$. Acts *between* classes, whereas `DiversityLoss` acts within
    one. DAPT (mlvlab/DAPT `trainers/dapt.py`): `t = TXT_RBF_T = 2` on every dataset; its
    weight `TXT_BETA` is set per dataset: 0.01 on Caltech101, DTD, FGVC Aircraft, Food101,
    ImageNet, Flowers102 and SUN397, 0.1 on Oxford Pets, Stanford Cars and UCF101, 10 on EuroSAT
    (0.1 is only the fallback of its `train.py`). See `promptmix.functional.dispersion_loss`.

    Args:
        bandwidth: $t > 0$.

    Shape:
        - subprompt_features: `(num_classes, K, dim)` or `(num_classes, dim)`.
        - output: scalar.

    Examples:
        >>> import torch
        >>> InterClassDispersion()(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))  # same direction
        tensor(1.)
    """

    #: What `MixtureOfPromptsLoss` passes to `forward`, by name.
    inputs: tuple[str, ...] = ("subprompt_features",)

    def __init__(self, *, bandwidth: float = 2.0):
        super().__init__()
        self.bandwidth = check_positive("bandwidth", bandwidth)

    def forward(self, subprompt_features: Tensor) -> Tensor:
        """Dispersion loss of `subprompt_features`."""
        return PF.dispersion_loss(subprompt_features, bandwidth=self.bandwidth)

    def extra_repr(self) -> str:
        return f"bandwidth={self.bandwidth}"


class ImagePrototypeLoss(nn.Module):
    r"""Pulls image features to their class's frozen few-shot prototype (DAPT's image term).

    $$ R = \frac{1}{B D} \sum_b \lVert \hat x_b - p_{y_b} \rVert_2^2 $$

    Prototypes are the class means of the frozen encoder's normalised few-shot features
    (`promptmix.functional.class_prototypes`). Useful only where the image features are learned
    (visual prompts); with a frozen image tower it is a constant. DAPT (mlvlab/DAPT
    `trainers/dapt.py`) sets its weight `VIS_BETA` per dataset: 100 on DTD, EuroSAT, FGVC
    Aircraft, Stanford Cars and SUN397, 10 on Caltech101, Food101, Flowers102 and Oxford Pets,
    0.1 on UCF101, 0.01 on ImageNet (0.1 is only the fallback of its `train.py`).

    Args:
        prototypes: `(num_classes, dim)` prototypes, stored once (they must be finite); `None`
            to pass `prototypes=` to every call.

    Shape:
        - image_features: `(batch, dim)`.
        - labels: `(batch,)`.
        - prototypes: `(num_classes, dim)`.
        - output: scalar.

    Examples:
        >>> import torch
        >>> loss = ImagePrototypeLoss(prototypes=torch.eye(2))
        >>> loss(torch.tensor([[5.0, 0.0]]), torch.tensor([0]))
        tensor(0.)
    """

    prototypes: Tensor | None

    def __init__(self, *, prototypes: Tensor | None = None):
        super().__init__()
        self.register_buffer("prototypes", _frozen("prototypes", prototypes), persistent=False)
        self.inputs: tuple[str, ...] = ("image_features", "labels") + (
            ("prototypes",) if prototypes is None else ()
        )

    def forward(
        self, image_features: Tensor, labels: Tensor, prototypes: Tensor | None = None
    ) -> Tensor:
        """Mean squared error of the normalised images to their class prototypes."""
        return PF.image_prototype_loss(
            image_features, labels, _given("prototypes", prototypes, self.prototypes)
        )
