"""The field's prompt-learning regularizers as modules for `MixtureOfPromptsLoss(regularizers=...)`.

Each module is a thin, validated wrapper around a function of `promptmix.functional` and declares
in `inputs` the keyword arguments its `forward` takes, so the loss can feed it. A frozen reference
(hand-crafted prompt features, zero-shot text features, prototypes) can be given once to the
constructor instead of to every call: it is kept as a non-persistent buffer (it moves with
`.to(device)`, stays out of checkpoints, as CoOp's fixed token embeddings do) and its name leaves
`inputs`.

Weights and reductions of the original methods (the weight is the loss's, not the module's):

| module | original | weight there |
|---|---|---|
| `PromptAnchor()` | KgCoOp `trainers/kgcoop.py` | 8 |
| `PromptAnchor("l1")` | PromptSRC `trainers/promptsrc.py` (text) | 25 |
| `ZeroShotConsistency(reduction="mean")` | PromptSRC `L_SCL_logits` | 1 |
| `ZeroShotConsistency()` | ProGrad `trainers/prograd.py` (KD) | used for the projection |
| `TextToTextLoss()` | LASP `prompting/lasp.py` | 5 (10 on some datasets) |
| `InterClassDispersion()` | DAPT `trainers/dapt.py` (text) | 0.1 |
| `ImagePrototypeLoss()` | DAPT `trainers/dapt.py` (image) | 0.1 (100 on Stanford Cars) |
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from promptmix import functional as PF
from promptmix._validation import (
    check_choice,
    check_floating,
    check_positive,
    check_unit_interval,
)
from promptmix.functional.consistency import KL_REDUCTIONS, KLReduction
from promptmix.functional.text_to_text import TEXT_REDUCTIONS


def _frozen(name: str, value: Tensor | None) -> Tensor | None:
    return None if value is None else check_floating(name, value).detach().clone()


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

    Identical features give 0, orthogonal ones 1 (cosine distance); the value is never negative.
    KgCoOp (htyao89/KgCoOp `trainers/kgcoop.py`) uses `1 - mean(cos)` with weight 8 and one
    template per dataset ("a photo of a {}." for Stanford Cars); its paper writes the squared L2
    distance (`distance="l2"`, twice the cosine distance on unit vectors). PromptSRC
    (muzairkhattak/PromptSRC `trainers/promptsrc.py`) uses the L1 distance (`distance="l1"`)
    with weight 25 to the mean feature of a template ensemble. Give `anchor_features` as the
    mean over templates for an ensemble.

    Args:
        distance: `"cosine"`, `"l2"` or `"l1"`.
        reduction: `"mean"` or `"sum"` over classes and sub-prompts, or `"none"`.
        anchor_features: the frozen anchors `(num_classes, dim)` or `(num_classes, K, dim)`,
            stored once; `None` to pass them to every call.

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
        distance: PF.AnchorDistance = "cosine",
        reduction: PF.Reduction = "mean",
        *,
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
    KL is averaged over the batch (`reduction="batchmean"`) or divided by
    `batch * num_classes` as in PromptSRC (`reduction="mean"`); see
    `promptmix.functional.zero_shot_consistency`. Equal logits give 0; never negative.

    The optional L1 terms are PromptSRC's `L_SCL_text` (weight 25, text features to the
    template-ensemble mean) and `L_SCL_image` (weight 10, prompted image features to the frozen
    encoder's); they are off by default (`text_weight = image_weight = 0`). PromptSRC in full:
    `ZeroShotConsistency(reduction="mean", text_weight=25, image_weight=10)` with loss weight 1.
    (muzairkhattak/PromptSRC `trainers/promptsrc.py`; ProGrad: BeierZhu/Prompt-align
    `trainers/prograd.py`, `T = 1`.)

    **Where the zero-shot logits come from.** Pass `zero_shot_logits=` to each call, or give
    `zero_shot_text_features` (`(num_classes, dim)`, the hand-crafted classifier) once: the
    module then computes $z = s \cdot \cos(x, a)$ from the loss's `image_features`, which is
    exact when the image tower is frozen (as in CoOp-style prompt learning), and uses the same
    features as the anchors of the text L1 term. `logit_scale` $s$ should equal the one the
    loss's logits use (CLIP's `logit_scale.exp()`, 100).

    Args:
        temperature: the distillation temperature $T > 0$ (not the E-step's `tau`).
        reduction: `"batchmean"`, `"mean"`, `"sum"` or `"none"`.
        text_weight: $w_t \ge 0$ of the text L1 term.
        image_weight: $w_i \ge 0$ of the image L1 term.
        zero_shot_text_features: the frozen hand-crafted classifier `(num_classes, dim)`,
            stored once; `None` to pass `zero_shot_logits=` (and `anchor_features=`) instead.
        logit_scale: $s$ for logits computed from `zero_shot_text_features`.

    Shape:
        - logits, zero_shot_logits: `(batch, num_classes)`.
        - subprompt_features: `(num_classes, K, dim)` or `(num_classes, dim)` (text term).
        - anchor_features: `(num_classes, dim)` (text term without stored features).
        - image_features, zero_shot_image_features: `(batch, dim)`.
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
        temperature: float = 1.0,
        reduction: KLReduction = "batchmean",
        *,
        text_weight: float = 0.0,
        image_weight: float = 0.0,
        zero_shot_text_features: Tensor | None = None,
        logit_scale: float = 100.0,
    ):
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.reduction: KLReduction = check_choice(  # type: ignore[assignment]
            "reduction", reduction, KL_REDUCTIONS
        )
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
        *,
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
            logits, zero_shot_logits, temperature=self.temperature, reduction=self.reduction
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
    (1adrianb/lasp `prompting/lasp.py`) weighs the term 5 (10 on some datasets) and uses
    `logit_scale = exp(CLIP's logit_scale) = 100` and 35 templates.

    Args:
        logit_scale: $s > 0$.
        aggregation: how each class's K similarities pool (see `class_logits`).
        reduction: `"mean"`, `"sum"` or `"none"`.
        noise_std: standard deviation of the target noise, `>= 0`.
        noise_probability: probability in `[0, 1]` that a training call adds noise.
        template_features: the frozen `(num_classes, dim)` or `(M, num_classes, dim)` template
            features, stored once; `None` to pass `template_features=` to every call.

    Shape:
        - subprompt_features: `(num_classes, K, dim)` or `(num_classes, dim)`.
        - template_features: `(num_classes, dim)` or `(M, num_classes, dim)`.
        - output: scalar, or `(M, num_classes)` with `reduction="none"`.

    Examples:
        >>> import torch
        >>> TextToTextLoss(logit_scale=10.0)(torch.eye(3), torch.eye(3)) < 0.01
        tensor(True)
    """

    template_features: Tensor | None

    def __init__(
        self,
        logit_scale: float = 100.0,
        aggregation: PF.Aggregation = "logsumexp",
        reduction: str = "mean",
        *,
        noise_std: float = 0.0,
        noise_probability: float = 0.5,
        template_features: Tensor | None = None,
    ):
        super().__init__()
        self.logit_scale = check_positive("logit_scale", logit_scale)
        self.aggregation: PF.Aggregation = check_choice(  # type: ignore[assignment]
            "aggregation", aggregation, PF.AGGREGATIONS
        )
        self.reduction = check_choice("reduction", reduction, TEXT_REDUCTIONS)
        self.noise_std = check_positive("noise_std", noise_std, allow_zero=True)
        self.noise_probability = check_unit_interval(
            "noise_probability", noise_probability, closed_right=True
        )
        self.register_buffer(
            "template_features",
            _frozen("template_features", template_features),
            persistent=False,
        )
        self.inputs: tuple[str, ...] = ("subprompt_features",) + (
            ("template_features",) if template_features is None else ()
        )

    def forward(
        self, subprompt_features: Tensor, template_features: Tensor | None = None
    ) -> Tensor:
        """Text-to-text cross-entropy of the (possibly noised) templates."""
        templates = _given("template_features", template_features, self.template_features)
        if self.training and self.noise_std and bool(torch.rand(()) < self.noise_probability):
            units = templates / templates.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            templates = units + self.noise_std * torch.randn_like(units)
        return PF.text_to_text_loss(
            subprompt_features,
            templates,
            logit_scale=self.logit_scale,
            aggregation=self.aggregation,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"logit_scale={self.logit_scale}, aggregation={self.aggregation!r}, "
            f"reduction={self.reduction!r}, noise_std={self.noise_std}, "
            f"noise_probability={self.noise_probability}"
        )


class InterClassDispersion(nn.Module):
    r"""Spreads the text features of different classes apart (DAPT's text term).

    $$
    R = \operatorname{mean}_{c < c',\, k,\, k'}
        \exp\left(-t \lVert \hat t_{ck} - \hat t_{c'k'} \rVert_2^2\right)
    $$

    A Gaussian potential over squared distances on the unit sphere: close classes cost up to 1,
    anti-parallel ones $e^{-4t}$. Acts *between* classes, whereas `DiversityLoss` acts within
    one. DAPT (mlvlab/DAPT `trainers/dapt.py`): `t = TXT_RBF_T = 2`, weight `TXT_BETA = 0.1`.
    See `promptmix.functional.dispersion_loss`.

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

    inputs = ("subprompt_features",)

    def __init__(self, bandwidth: float = 2.0):
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
    `trainers/dapt.py`): weight `VIS_BETA` 0.1 by default, 100 on Stanford Cars.

    Args:
        prototypes: `(num_classes, dim)` prototypes, stored once; `None` to pass
            `prototypes=` to every call.

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
            image_features, _given("prototypes", prototypes, self.prototypes), labels
        )
