# ruff: noqa: E501  (the table of cases reads best one case per line)
"""Every bad input we tried, run for real: the table of docs/reliability.md.

Each case is run twice: as on a CPU (value checks read the tensor, which is free there) and on
the device path a GPU takes (`_validation.HOST_CHECKS = False`: no host reads, bad values become
NaN on the device). The outcome is what actually happened, and its kind:

- **clear**: a named error raised by promptmix's own checks (its innermost frame is in
  promptmix, or it is PyTorch's `load_state_dict` report of them), or a non-finite result;
- **SILENT**: a finite result (or a state change) from bad input;
- **CRYPTIC**: an error raised somewhere else (deep in PyTorch or Python), whose message does not
  say which argument was wrong.

Valid-but-extreme inputs show the check that their result is right. A silent or cryptic outcome
makes the script exit with 1.

    PYTHONPATH=src python benchmarks/bad_inputs.py --write docs/reliability.md
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch

import promptmix
import promptmix.functional as PF
from promptmix import (
    DiversityLoss,
    GaussianPromptAverage,
    ImagePrototypeLoss,
    InterClassDispersion,
    MixtureOfPrompts,
    MixtureOfPromptsLoss,
    OffsetMixtureOfPrompts,
    PromptAnchor,
    SoftEMAssigner,
    SubpromptReviver,
    TemperatureSchedule,
    TextToTextLoss,
    UsageEstimate,
    UsageFloor,
    ZeroShotConsistency,
    _validation,
    detect_collapse,
    initialize_from_kmeans,
    prograd_backward,
    project_conflicting_gradients,
)
from promptmix.diagnostics import subprompt_usage

SOURCE = Path(promptmix.__file__).resolve().parent

BEGIN, END = "<!-- bad-inputs:begin -->", "<!-- bad-inputs:end -->"
NAN, INF = float("nan"), float("inf")


def problem(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 6, generator=generator).to(dtype)
    prompts = torch.randn(4, 3, 6, generator=generator).to(dtype)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    return images, prompts, labels


def loss(images=None, prompts=None, labels=None, **kwargs):
    base_images, base_prompts, base_labels = problem()
    module_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("logit_scale", "tau")}
    loss_fn = MixtureOfPromptsLoss(**module_kwargs)
    out = loss_fn(
        base_images if images is None else images,
        base_prompts if prompts is None else prompts,
        base_labels if labels is None else labels,
        **kwargs,
    )
    return out["loss"]


def with_nan(tensor, index):
    tensor = tensor.clone()
    tensor[index] = NAN
    return tensor


def same_loss_as_int64(dtype):
    def run():
        images, prompts, labels = problem()
        estimate = UsageEstimate(num_classes=4, n_subprompts=3)
        reference = MixtureOfPromptsLoss(usage_estimate=estimate)(images, prompts, labels)["loss"]
        estimate = UsageEstimate(num_classes=4, n_subprompts=3)
        loss_fn = MixtureOfPromptsLoss(usage_estimate=estimate)
        value = loss_fn(images, prompts, labels.to(dtype))["loss"]
        return f"class indices: loss equals the int64 one: {torch.equal(value, reference)}"

    return run


class Changed(Exception):
    """A call on bad input changed the object's state before (or instead of) failing."""


def unchanged(state: Callable[[], object], call: Callable[[], object]) -> object:
    """Run `call`; if it raises, the state must be what it was (else `Changed`)."""
    before = state()
    try:
        return call()
    except Exception as error:
        after = state()
        if not equal(before, after):
            raise Changed(f"changed before raising {type(error).__name__}: {error}") from error
        raise


def equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)  # type: ignore[union-attr]
    return a == b


_CLIP: list[object] = []


def clip_and_tokenizer():
    """A tiny random-init open_clip model and its tokenizer (built once)."""
    if not _CLIP:
        torch.manual_seed(0)
        model = open_clip.CLIP(
            embed_dim=16,
            vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=32),
            text_cfg=dict(width=32, heads=2, layers=1),
        )
        _CLIP.extend([model, open_clip.get_tokenizer("ViT-B-32")])
    return _CLIP[0], _CLIP[1]


def learner(classnames=("cat", "dog", "owl"), cls=OffsetMixtureOfPrompts, **kwargs):
    model, tokenizer = clip_and_tokenizer()
    return cls(model, kwargs.pop("tokenizer", tokenizer), list(classnames), n_subprompts=2, **kwargs)


def init_with(images, labels):
    prompts = learner()
    return unchanged(lambda: prompts.offsets.clone(), lambda: initialize_from_kmeans(prompts, images, labels))


def zero_class_images():
    images = torch.randn(9, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2] * 3)
    images[labels == 2] = 0.0
    return images, labels


def revive_after_nan_images():
    estimate = UsageEstimate(num_classes=4, n_subprompts=3)
    loss_fn = MixtureOfPromptsLoss(usage_estimate=estimate)
    images, prompts, labels = problem()
    loss_fn(with_nan(images, (0, 1)), prompts, labels)  # NaN reaches the step (its loss is NaN)
    parameter = torch.nn.Parameter(prompts.clone())
    reviver = SubpromptReviver(estimate)
    return unchanged(lambda: parameter.detach().clone(), lambda: reviver.revive_(parameter))


def reviver_wrong_k():
    estimate = UsageEstimate(num_classes=4, n_subprompts=3)
    parameter = torch.nn.Parameter(torch.randn(4, 2, 6))
    return unchanged(
        lambda: (parameter.detach().clone(), estimate.usage.clone()),
        lambda: SubpromptReviver(estimate).revive_(parameter),
    )


def schedule_load(saved_kwargs, state_change):
    saved = TemperatureSchedule(**saved_kwargs)
    for _ in range(3):
        saved.step()
    target = TemperatureSchedule(total_steps=1000, kind="cosine")
    state = saved.state_dict() | state_change
    return unchanged(
        lambda: (target.step_count.clone(), target()), lambda: target.load_state_dict(state)
    )


class Wide(torch.nn.Module):
    def __init__(self, width: int, bias: int = 2) -> None:
        super().__init__()
        self.ctx = torch.nn.Parameter(torch.zeros(2, width))
        self.bias = torch.nn.Parameter(torch.zeros(bias))


def trained_average(width: int = 3) -> GaussianPromptAverage:
    module = Wide(width)
    average = GaussianPromptAverage(module, total_epochs=4, mean=2.0)
    for value in (1.0, 2.0):
        module.ctx.data.fill_(value)
        average.update()
    return average


def average_state(average: GaussianPromptAverage):
    return lambda: (average.epoch, {k: v.clone() for k, v in average.averages.items()})


def load_other_average():
    average, other = trained_average(3), trained_average(5)
    other.update()
    return unchanged(average_state(average), lambda: average.load_state_dict(other.state_dict()))


def copy_to_other_bias():
    average, target = trained_average(3), Wide(3, bias=5)
    return unchanged(
        lambda: [p.detach().clone() for p in target.parameters()],
        lambda: average.copy_to(target),
    )


class ReturnsNone(torch.nn.Module):
    inputs = ("labels",)

    def forward(self, labels):
        return None


def loss_with(regularizers, **inputs):
    images, prompts, labels = problem()
    return MixtureOfPromptsLoss(regularizers=regularizers)(images, prompts, labels, **inputs)["loss"]


def k1_equals_2d():
    images, prompts, labels = problem()
    flat = prompts[:, 0]
    a = MixtureOfPromptsLoss()(images, flat, labels)["loss"]
    b = MixtureOfPromptsLoss()(images, flat.unsqueeze(1), labels)["loss"]
    return f"(C, D) is K = 1: loss equals the (C, 1, D) one: {torch.equal(a, b)}"


def extra_classes_run():
    templates = torch.randn(2, 6, 6)
    loss_fn = MixtureOfPromptsLoss(
        regularizers={"text": (TextToTextLoss(extra_classes=2, template_features=templates), 5.0)}
    )
    images, prompts, labels = problem()
    out = loss_fn(images, prompts, labels, extra_subprompt_features=torch.randn(2, 3, 6))
    return f"finite text-to-text term over 4 + 2 classes: {bool(torch.isfinite(out['text']))}"


def tiny_tau_half():
    images, prompts, labels = problem(torch.float16)
    gamma = PF.responsibilities(images, prompts, labels, tau=1e-3)
    ok = bool(torch.isfinite(gamma).all()) and bool(
        ((gamma.float().sum(-1) - 1).abs() < 1e-2).all()
    )
    return f"finite rows on the simplex: {ok}"


def sinkhorn_winner():
    cosine = 0.3 + 0.03 * torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    cosine[:, 0] = cosine.max(1).values + 0.2
    gamma = SoftEMAssigner(mode="sinkhorn").from_similarities(cosine, torch.zeros(8, dtype=torch.long),
                                                          tau=0.3)
    usage = gamma.sum(0)
    return f"usage {[round(u, 4) for u in usage.tolist()]} (fair share 2.0 each)"


def anti_parallel():
    t = torch.tensor([1.0, 2.0, 0.5])
    report = detect_collapse(torch.stack([t, -t]).unsqueeze(0))
    return f"collapsed={report.collapsed}: {report.reasons}"


# --- the recommended recipe (issue 15): shared looks, their start, label noise, the prior

LOGITS = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
LABELS3 = torch.tensor([0, 1, 2, 0])
VALUES = torch.randn(5, 2, generator=torch.Generator().manual_seed(2))
GROUPS = torch.tensor([0, 0, 1, 2, 2])


def look_start(images=None, labels=None, text=None, **kwargs):
    """`shared_look_start` on 12 images of 3 classes (dim 6); its three parts, flattened."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(12, 6, generator=generator) if images is None else images
    labels = torch.arange(3).repeat(4) if labels is None else labels
    text = torch.randn(3, 6, generator=generator) if text is None else text
    start = PF.shared_look_start(images, labels, text, **{"n_subprompts": 2, **kwargs})
    return torch.cat(
        [start.class_offsets.flatten(), start.shared_offsets.flatten(), start.subprompt_offsets.flatten()]
    )


def images_on_their_text(**kwargs):
    """Images exactly on their class's text: nothing left to cluster, so k-means is skipped."""
    text = torch.eye(3, 6)
    return look_start(images=text.repeat(4, 1), text=text, **kwargs)


def one_shot_stays_near_text():
    generator = torch.Generator().manual_seed(3)
    text = torch.nn.functional.normalize(torch.randn(3, 6, generator=generator), dim=-1)
    images = torch.nn.functional.normalize(torch.randn(3, 6, generator=generator), dim=-1)
    start = PF.shared_look_start(images, torch.arange(3), text, n_subprompts=1, prior_count=4.0)
    residual = images - text
    kept = start.class_offsets.norm(dim=-1) / (residual - residual.mean(0)).norm(dim=-1)
    return f"one image per class keeps {[round(k, 3) for k in kept.tolist()]} of its offset (1/5 = 0.2)"


def loss_with_prior(prior, **kwargs):
    return MixtureOfPromptsLoss(**kwargs)(*problem(), prior)["loss"]


def negative_prior_is_added():
    base = MixtureOfPromptsLoss()(*problem())["loss"]
    value = loss_with_prior(torch.tensor(-1.0))
    return f"a log-density may be negative: loss = loss without prior - 1: {torch.allclose(value, base - 1)}"


def no_noise_is_plain_cross_entropy():
    images, prompts, labels = problem()
    loss_fn = MixtureOfPromptsLoss(label_noise=0.0, mixture_weight=0.0)
    out = loss_fn(images, prompts, labels)
    plain = torch.nn.functional.cross_entropy(loss_fn.logits(images, prompts), labels)
    return f"label_noise 0: ce equals plain cross-entropy: {torch.allclose(out['ce'], plain)}"


def empty_batch_with_prior():
    images, prompts, labels = problem()
    prior = torch.tensor(0.25)
    out = MixtureOfPromptsLoss()(images[:0], prompts, labels[:0], prior)
    return (
        f"the loss is the prior alone: {torch.equal(out['loss'], prior)}; label_confidence of "
        f"shape {tuple(out['label_confidence'].shape)}"
    )


def prior_loss_after(change):
    prompts = learner()
    change(prompts)
    return prompts.prior_loss()


def load_num_images(value):
    prompts = learner()
    state = {k: v.clone() for k, v in prompts.state_dict().items()}
    state["num_images"] = torch.tensor(value)
    return unchanged(lambda: prompts.state_dict(), lambda: prompts.load_state_dict(state))


def load_other_learner(source_share_looks, target_share_looks):
    prompts = learner(share_looks=target_share_looks)
    state = learner(share_looks=source_share_looks).state_dict()
    return unchanged(lambda: prompts.state_dict(), lambda: prompts.load_state_dict(state))


def recipe_init(images, labels, **kwargs):
    """`initialize_from_kmeans` on the recipe's learner (shared looks), which must not change on error."""
    prompts = learner(**kwargs.pop("learner", {}))
    return unchanged(
        lambda: {k: v.clone() for k, v in prompts.state_dict().items()},
        lambda: initialize_from_kmeans(prompts, images, labels, **kwargs),
    )


TRAIN = (torch.randn(9, 16, generator=torch.Generator().manual_seed(4)), torch.arange(3).repeat(3))


GOOD = torch.full((4, 3), 1 / 3)
LABELS4 = torch.tensor([0, 1, 0, 1])

# (what, kind, call): kind "bad" must raise or give non-finite; "valid" is extreme but valid.
CASES: list[tuple[str, str, Callable[[], object]]] = [
    # --- the loss: features
    ("loss: NaN in one sub-prompt feature", "bad", lambda: loss(prompts=with_nan(problem()[1], (1, 0, 2)))),
    ("loss: NaN in one image feature", "bad", lambda: loss(images=with_nan(problem()[0], (2, 1)))),
    ("loss: inf in one image feature", "bad", lambda: loss(images=problem()[0].index_fill(1, torch.tensor([0]), INF))),
    ("loss: NaN sub-prompt of a class not in the batch", "bad", lambda: loss(prompts=with_nan(problem()[1], (3, 0, 0)))),
    ("loss: NaN sub-prompt, every weight 0", "bad", lambda: loss(prompts=with_nan(problem()[1], (1, 0, 2)), diversity_weight=0.0, entropy_weight=0.0, mixture_weight=0.0)),
    ("loss: NaN image, hard assigner", "bad", lambda: loss(images=with_nan(problem()[0], (2, 1)), assigner=SoftEMAssigner(mode="hard"))),
    ("loss: NaN image, Sinkhorn assigner", "bad", lambda: loss(images=with_nan(problem()[0], (2, 1)), assigner=SoftEMAssigner(mode="sinkhorn"))),
    ("loss: image_features of rank 1", "bad", lambda: loss(images=torch.randn(6))),
    ("loss: subprompt_features of rank 1", "bad", lambda: loss(prompts=torch.randn(6))),
    ("loss: feature dimensions differ", "bad", lambda: loss(images=torch.randn(8, 5))),
    ("loss: K = 0 sub-prompts", "bad", lambda: loss(prompts=torch.randn(4, 0, 6))),
    ("loss: integer image features", "bad", lambda: loss(images=torch.ones(8, 6, dtype=torch.long))),
    ("loss: image features as a list", "bad", lambda: loss(images=[[0.0] * 6] * 8)),
    # --- the loss: labels
    ("loss: uint8 labels", "valid", same_loss_as_int64(torch.uint8)),
    ("loss: int8 labels", "valid", same_loss_as_int64(torch.int8)),
    ("loss: int16 labels", "valid", same_loss_as_int64(torch.int16)),
    ("loss: int32 labels", "valid", same_loss_as_int64(torch.int32)),
    ("loss: float labels", "bad", lambda: loss(labels=problem()[2].float())),
    ("loss: bool labels", "bad", lambda: loss(labels=problem()[2] > 0)),
    ("loss: a label = num_classes", "bad", lambda: loss(labels=problem()[2].index_fill(0, torch.tensor([0]), 4), mixture_weight=0.0)),
    ("loss: a label = -1", "bad", lambda: loss(labels=problem()[2].index_fill(0, torch.tensor([0]), -1), mixture_weight=0.0)),
    ("loss: labels of shape (batch + 1,)", "bad", lambda: loss(labels=torch.zeros(9, dtype=torch.long))),
    ("loss: labels of shape (batch, 1)", "bad", lambda: loss(labels=torch.zeros(8, 1, dtype=torch.long))),
    # --- the loss: scales and temperatures
    ("loss: tensor logit_scale -5", "bad", lambda: loss(logit_scale=torch.tensor(-5.0))),
    ("loss: tensor logit_scale NaN", "bad", lambda: loss(logit_scale=torch.tensor(NAN))),
    ("loss: tensor logit_scale inf", "bad", lambda: loss(logit_scale=torch.tensor(INF))),
    ("loss: tensor logit_scale of shape (batch,)", "bad", lambda: loss(logit_scale=torch.full((8,), 50.0))),
    ("loss: float logit_scale 0", "bad", lambda: loss(logit_scale=0.0)),
    ("loss: float logit_scale NaN", "bad", lambda: loss(logit_scale=NAN)),
    ("loss: tau 0", "bad", lambda: loss(tau=0.0)),
    ("loss: tau -1", "bad", lambda: loss(tau=-1.0)),
    ("loss: tau NaN", "bad", lambda: loss(tau=NAN)),
    ("loss: tau 1e-40 (scores overflow float32)", "bad", lambda: loss(tau=1e-40)),
    ("E-step: float16 features, tau 1e-3", "valid", tiny_tau_half),
    ("loss: diversity_weight -1", "bad", lambda: loss(diversity_weight=-1.0)),
    ("loss: assigner of the wrong type", "bad", lambda: loss(assigner=DiversityLoss())),
    # --- entropy
    ("entropy: NaN responsibilities", "bad", lambda: PF.assignment_entropy(with_nan(GOOD, (1, 1)), mode="marginal")),
    ("entropy: rows summing to 0.7", "bad", lambda: PF.assignment_entropy(torch.full((2, 2), 0.35))),
    ("entropy: a negative responsibility", "bad", lambda: PF.assignment_entropy(torch.tensor([[1.5, -0.5]]))),
    ("entropy: usage_prior with another K", "bad", lambda: PF.assignment_entropy(GOOD, LABELS4, mode="marginal", usage_prior=torch.full((2, 2), 0.5), prior_count=1.0)),
    ("entropy: usage_prior rows off the simplex", "bad", lambda: PF.assignment_entropy(GOOD, LABELS4, mode="marginal", usage_prior=torch.full((2, 3), 0.5), prior_count=1.0)),
    ("entropy: label beyond the usage_prior's classes", "bad", lambda: PF.assignment_entropy(GOOD, torch.tensor([0, 1, 0, 2]), mode="marginal", usage_prior=torch.full((2, 3), 1 / 3), prior_count=1.0)),
    ("entropy: prior_count -1", "bad", lambda: PF.assignment_entropy(GOOD, prior_count=-1.0)),
    ("usage: an estimate without n_subprompts", "bad", lambda: UsageEstimate(num_classes=3)),
    ("usage: momentum 1", "bad", lambda: UsageEstimate(num_classes=2, n_subprompts=2, momentum=1.0)),
    # --- E-step
    ("E-step: Sinkhorn on a NaN score", "bad", lambda: PF.sinkhorn(with_nan(torch.randn(4, 3), (1, 2)))),
    ("E-step: Sinkhorn with 0 iterations", "bad", lambda: PF.sinkhorn(torch.randn(4, 3), iterations=0)),
    ("E-step: Sinkhorn with tol 0", "bad", lambda: PF.sinkhorn(torch.randn(4, 3), tol=0.0)),
    ("E-step: Sinkhorn with float groups", "bad", lambda: PF.sinkhorn(torch.randn(4, 3), torch.zeros(4))),
    ("E-step: Sinkhorn, one sub-prompt wins every image by 0.2", "valid", sinkhorn_winner),
    ("E-step: mode 'foo'", "bad", lambda: SoftEMAssigner(mode="foo")),
    ("E-step: usage_prior with the soft mode", "bad", lambda: SoftEMAssigner(mode="soft").from_similarities(torch.rand(2, 2), torch.tensor([0, 0]), usage_prior=torch.full((1, 2), 0.5))),
    ("E-step: hard mode on a NaN similarity", "bad", lambda: PF.responsibilities_from_similarities(with_nan(torch.rand(3, 2), (0, 0)), mode="hard")),
    # --- diversity and similarities
    ("diversity: NaN sub-prompt", "bad", lambda: DiversityLoss()(with_nan(torch.randn(2, 3, 4), (0, 1, 1)))),
    ("diversity: NaN in a masked-out class", "bad", lambda: DiversityLoss()(with_nan(torch.randn(2, 3, 4), (0, 1, 1)), torch.tensor([False, True]))),
    ("diversity: power 0.5", "bad", lambda: DiversityLoss(power=0.5)),
    ("diversity: margin 1", "bad", lambda: DiversityLoss(margin=1.0)),
    ("diversity: class_mask of another length", "bad", lambda: DiversityLoss()(torch.randn(2, 3, 4), torch.tensor([True]))),
    ("similarity: pairwise cosine of a NaN sub-prompt", "bad", lambda: PF.pairwise_cosine(with_nan(torch.randn(1, 2, 3), (0, 0, 0)))),
    ("classifier: aggregation 'foo'", "bad", lambda: PF.class_logits(torch.rand(2, 3, 2), aggregation="foo")),
    # --- diagnostics
    ("diagnostics: all-NaN features", "bad", lambda: detect_collapse(torch.full((2, 3, 4), NAN))),
    ("diagnostics: NaN responsibilities", "bad", lambda: detect_collapse(torch.randn(2, 3, 4), torch.full((2, 3), NAN), torch.tensor([0, 1]))),
    ("diagnostics: empty batch of responsibilities", "bad", lambda: detect_collapse(torch.randn(2, 3, 4), torch.empty(0, 3), torch.empty(0, dtype=torch.long))),
    ("diagnostics: responsibilities with another K", "bad", lambda: detect_collapse(torch.randn(2, 3, 4), torch.full((2, 4), 0.25), torch.tensor([0, 1]))),
    ("diagnostics: rows off the simplex (share 3.4)", "bad", lambda: detect_collapse(torch.randn(2, 3, 4), torch.tensor([[3.4, 0.0, 0.0], [1.0, 0.0, 0.0]]), torch.tensor([0, 0]))),
    ("diagnostics: responsibilities without labels", "bad", lambda: detect_collapse(torch.randn(2, 3, 4), GOOD)),
    ("diagnostics: anti-parallel sub-prompts", "valid", anti_parallel),
    ("diagnostics: usage with num_classes 0", "bad", lambda: subprompt_usage(GOOD, LABELS4, num_classes=0)),
    ("schedule: warmup_steps >= total_steps", "bad", lambda: PF.temperature_at(step=0, total_steps=5, warmup_steps=5)),
    # --- 1.0: one convention, every input checked (issue 17)
    ("loss: PromptAnchor(reduction='none') as a regularizer", "bad", lambda: MixtureOfPromptsLoss(regularizers={"anchor": (PromptAnchor(reduction="none"), 8.0)})),
    ("loss: DiversityLoss(reduction='none') in the diversity slot", "bad", lambda: MixtureOfPromptsLoss(diversity=DiversityLoss(reduction="none"))),
    ("loss: weight-0 regularizer, NaN anchor_features", "bad", lambda: loss_with({"anchor": (PromptAnchor(), 0.0)}, anchor_features=torch.full((4, 6), NAN))),
    ("loss: weight-0 regularizer, anchor_features of another shape", "bad", lambda: loss_with({"anchor": (PromptAnchor(), 0.0)}, anchor_features=torch.randn(4, 5))),
    ("loss: a regularizer that returns None", "bad", lambda: loss_with({"none": (ReturnsNone(), 1.0)})),
    ("loss: a regularizer without inputs", "bad", lambda: MixtureOfPromptsLoss(regularizers={"x": (torch.nn.Identity(), 1.0)})),
    ("loss: a keyword no part takes", "bad", lambda: loss_with({}, anchor_features=torch.randn(4, 6))),
    ("loss: (C, D) sub-prompts", "valid", k1_equals_2d),
    ("loss: usage estimate built for another K", "bad", lambda: MixtureOfPromptsLoss(usage_estimate=UsageEstimate(num_classes=4, n_subprompts=4))(*problem())),
    ("zero-shot: all-NaN stored zero_shot_text_features", "bad", lambda: ZeroShotConsistency(zero_shot_text_features=torch.full((4, 6), NAN))),
    ("zero-shot: NaN teacher logits", "bad", lambda: PF.zero_shot_consistency(torch.randn(4, 3), torch.full((4, 3), NAN))),
    ("zero-shot: temperature 1e20", "bad", lambda: ZeroShotConsistency(temperature=1e20)),
    ("zero-shot: reduction 'batchmean' (the old name)", "bad", lambda: PF.zero_shot_consistency(torch.randn(4, 3), torch.randn(4, 3), reduction="batchmean")),
    ("text-to-text: extra class features, extra_classes=0", "bad", lambda: TextToTextLoss()(torch.randn(3, 6), torch.randn(5, 6), extra_subprompt_features=torch.randn(2, 6))),
    ("text-to-text: two class names without images", "valid", extra_classes_run),
    ("prototypes: class_prototypes(num_classes=0)", "bad", lambda: PF.class_prototypes(torch.randn(4, 6), torch.zeros(4, dtype=torch.long), num_classes=0)),
    ("prototypes: a label beyond the prototypes", "bad", lambda: ImagePrototypeLoss(prototypes=torch.randn(2, 6))(torch.randn(3, 6), torch.tensor([0, 1, 2]))),
    ("dispersion: NaN sub-prompt", "bad", lambda: InterClassDispersion()(with_nan(torch.randn(3, 2, 4), (1, 0, 0)))),
    ("usage floor: rows summing to 1.5", "bad", lambda: UsageFloor()(torch.full((2, 2), 0.75))),
    ("usage: estimate for K + 1 updated with K", "bad", lambda: UsageEstimate(num_classes=2, n_subprompts=3).update(torch.full((2, 2), 0.5), torch.tensor([0, 1]))),
    ("usage: label beyond the estimate's classes", "bad", lambda: PF.running_usage(torch.full((2, 2), 0.5), torch.full((1, 2), 0.5), torch.tensor([2]))),
    ("reviver: parameter with another K", "bad", reviver_wrong_k),
    ("reviver: NaN images reached the loss", "bad", revive_after_nan_images),
    ("reviver: NaN parameter", "bad", lambda: PF.revive_dead_subprompts(torch.full((1, 2, 3), NAN), torch.tensor([[1.0, 0.0]]))),
    ("gradients: NaN reference gradient (the cosine)", "bad", lambda: project_conflicting_gradients([torch.tensor([1.0, -1.0])], [torch.tensor([NAN, 2.0])])[1]),
    ("gradients: integer gradients", "bad", lambda: project_conflicting_gradients([torch.tensor([3, -1])], [torch.tensor([0, 2])])),
    ("gradients: prograd_backward with a bare Parameter", "bad", lambda: (lambda w: prograd_backward((2 * w).sum(), (3 * w).sum(), w))(torch.nn.Parameter(torch.ones(2)))),
    ("schedule: a 5-step linear state into a 1000-step cosine schedule", "bad", lambda: schedule_load({"total_steps": 5}, {})),
    ("schedule: step_count 2.7", "bad", lambda: schedule_load({"total_steps": 1000, "kind": "cosine"}, {"step_count": torch.tensor(2.7)})),
    ("averaging: load another model's average", "bad", load_other_average),
    ("averaging: copy_to a module whose bias differs", "bad", copy_to_other_bias),
    ("k-means: NaN features", "bad", lambda: PF.spherical_kmeans(with_nan(torch.randn(6, 3), (2, 1)), n_subprompts=2)),
    ("k-means: zero-width features", "bad", lambda: PF.spherical_kmeans(torch.zeros(6, 0), n_subprompts=2)),
    ("k-means: labels as a list", "bad", lambda: PF.kmeans_subprompts(torch.randn(4, 3), [0, 0, 1, 1], num_classes=2, n_subprompts=1)),
    ("k-means: a class of all-zero image features", "bad", lambda: PF.kmeans_subprompts(*zero_class_images(), num_classes=3, n_subprompts=2)),
    ("init: a class of all-zero image features", "bad", lambda: init_with(*zero_class_images())),
    ("init: labels as a list", "bad", lambda: init_with(torch.randn(9, 16), [0, 1, 2] * 3)),
    ("prompts: an empty class name", "bad", lambda: learner(("cat", "", "owl"))),
    ("prompts: duplicate class names", "bad", lambda: learner(("cat", "dog", "cat"))),
    ("prompts: two names beyond 77 tokens", "bad", lambda: learner((" ".join(["very"] * 80) + " red", " ".join(["very"] * 80) + " blue"))),
    ("prompts: tokenizer=None", "bad", lambda: learner(tokenizer=None)),
    ("prompts: MixtureOfPrompts with duplicate names", "bad", lambda: learner(("cat", "cat"), cls=MixtureOfPrompts)),
    # --- the recommended recipe (issue 15): label confidence
    ("label confidence: NaN logits row", "bad", lambda: PF.label_confidence(with_nan(LOGITS, (1, 1)), LABELS3)),
    ("label confidence: NaN logits row, label_noise 0", "bad", lambda: PF.label_confidence(with_nan(LOGITS, (1, 1)), LABELS3, label_noise=0.0)),
    ("label confidence: NaN logits row, one class", "bad", lambda: PF.label_confidence(torch.tensor([[NAN], [1.0]]), torch.tensor([0, 0]))),
    ("label confidence: a label = num_classes", "bad", lambda: PF.label_confidence(LOGITS, torch.tensor([0, 1, 3, 0]))),
    ("label confidence: a label = -1, label_noise 0", "bad", lambda: PF.label_confidence(LOGITS, torch.tensor([0, 1, -1, 0]), label_noise=0.0)),
    ("label confidence: label_noise 1", "bad", lambda: PF.label_confidence(LOGITS, LABELS3, label_noise=1.0)),
    ("label confidence: label_noise NaN", "bad", lambda: PF.label_confidence(LOGITS, LABELS3, label_noise=NAN)),
    ("label confidence: label_noise as a tensor", "bad", lambda: PF.label_confidence(LOGITS, LABELS3, label_noise=torch.tensor(0.1))),
    ("label confidence: integer logits", "bad", lambda: PF.label_confidence(torch.ones(4, 3, dtype=torch.long), LABELS3)),
    ("label confidence: logits of rank 1", "bad", lambda: PF.label_confidence(torch.randn(3), LABELS3)),
    # --- shrunk group means and the shared-look start
    ("shrunk means: NaN value", "bad", lambda: PF.shrunk_group_means(with_nan(VALUES, (0, 0)), GROUPS, num_groups=3)),
    ("shrunk means: a group = num_groups", "bad", lambda: PF.shrunk_group_means(VALUES, torch.tensor([0, 0, 1, 3, 2]), num_groups=3)),
    ("shrunk means: a group = -1", "bad", lambda: PF.shrunk_group_means(VALUES, torch.tensor([0, 0, 1, -1, 2]), num_groups=3)),
    ("shrunk means: integer values", "bad", lambda: PF.shrunk_group_means(torch.ones(5, 2, dtype=torch.long), GROUPS, num_groups=3)),
    ("shrunk means: prior_count inf", "bad", lambda: PF.shrunk_group_means(VALUES, GROUPS, num_groups=3, prior_count=INF)),
    ("shrunk means: num_groups 0", "bad", lambda: PF.shrunk_group_means(VALUES, GROUPS, num_groups=0)),
    ("shared looks: NaN image feature", "bad", lambda: look_start(images=with_nan(torch.randn(12, 6), (3, 1)))),
    ("shared looks: a zero image feature", "bad", lambda: look_start(images=torch.randn(12, 6).index_fill(0, torch.tensor([2]), 0.0))),
    ("shared looks: NaN text feature", "bad", lambda: look_start(text=with_nan(torch.randn(3, 6), (1, 1)))),
    ("shared looks: a zero text feature", "bad", lambda: look_start(text=torch.randn(3, 6).index_fill(0, torch.tensor([2]), 0.0))),
    ("shared looks: text features (C, K, D)", "bad", lambda: look_start(text=torch.randn(3, 2, 6))),
    ("shared looks: a label = num_classes", "bad", lambda: look_start(labels=torch.arange(3).repeat(4).index_fill(0, torch.tensor([0]), 3))),
    ("shared looks: more looks than images", "bad", lambda: look_start(n_subprompts=13)),
    ("shared looks: iterations -1, k-means skipped", "bad", lambda: images_on_their_text(iterations=-1)),
    ("shared looks: restarts 0, k-means skipped", "bad", lambda: images_on_their_text(restarts=0)),
    ("shared looks: one image per class", "valid", one_shot_stays_near_text),
    # --- the loss: prior= and label_noise=
    ("loss: prior NaN", "bad", lambda: loss_with_prior(torch.tensor(NAN))),
    ("loss: prior of shape (2,)", "bad", lambda: loss_with_prior(torch.ones(2))),
    ("loss: prior as a float", "bad", lambda: loss_with_prior(0.5)),
    ("loss: prior=prompts.prior_loss (not called)", "bad", lambda: loss_with_prior(learner().prior_loss)),
    ("loss: integer prior", "bad", lambda: loss_with_prior(torch.tensor(1))),
    ("loss: a negative prior", "valid", negative_prior_is_added),
    ("loss: label_noise 1", "bad", lambda: MixtureOfPromptsLoss(label_noise=1.0)),
    ("loss: label_noise -0.1", "bad", lambda: MixtureOfPromptsLoss(label_noise=-0.1)),
    ("loss: label_noise '0.1'", "bad", lambda: MixtureOfPromptsLoss(label_noise="0.1")),
    ("loss: NaN image, label_confidence output", "bad", lambda: MixtureOfPromptsLoss()(with_nan(problem()[0], (2, 1)), *problem()[1:])["label_confidence"]),
    ("loss: label_noise 0", "valid", no_noise_is_plain_cross_entropy),
    ("loss: empty batch with a prior", "valid", empty_batch_with_prior),
    # --- OffsetMixtureOfPrompts: shared looks and its prior
    ("offset prompts: share_looks 1", "bad", lambda: learner(share_looks=1)),
    ("offset prompts: text_prior_weight -1", "bad", lambda: learner(text_prior_weight=-1.0)),
    ("offset prompts: subprompt_prior_weight NaN", "bad", lambda: learner(subprompt_prior_weight=NAN)),
    ("offset prompts: prior_loss with a NaN shared look", "bad", lambda: prior_loss_after(lambda p: p.shared_offsets.data.fill_(NAN))),
    ("offset prompts: prior_loss with a NaN class part", "bad", lambda: prior_loss_after(lambda p: p.class_offsets.data.fill_(NAN))),
    ("offset prompts: load num_images 0", "bad", lambda: load_num_images(0.0)),
    ("offset prompts: load num_images -5", "bad", lambda: load_num_images(-5.0)),
    ("offset prompts: load num_images NaN", "bad", lambda: load_num_images(NAN)),
    ("offset prompts: load a share_looks=False state into shared looks", "bad", lambda: load_other_learner(False, True)),
    ("offset prompts: load a shared-looks state into share_looks=False", "bad", lambda: load_other_learner(True, False)),
    # --- initialize_from_kmeans: the recipe's start
    ("init: prior_count -1", "bad", lambda: recipe_init(*TRAIN, prior_count=-1.0)),
    ("init: prior_count NaN", "bad", lambda: recipe_init(*TRAIN, prior_count=NAN)),
    ("init: a label = num_classes, shared looks", "bad", lambda: recipe_init(TRAIN[0], TRAIN[1].index_fill(0, torch.tensor([0]), 3))),
    ("init: NaN image feature, shared looks", "bad", lambda: recipe_init(with_nan(TRAIN[0], (1, 1)), TRAIN[1])),
    ("init: fewer images than looks", "bad", lambda: recipe_init(TRAIN[0][:1], TRAIN[1][:1])),
    ("init: no images, shared looks", "bad", lambda: recipe_init(torch.empty(0, 16), torch.empty(0, dtype=torch.long))),
    ("init: no images, share_looks=False", "bad", lambda: recipe_init(torch.empty(0, 16), torch.empty(0, dtype=torch.long), learner={"share_looks": False})),
]


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (braces would be read as attributes)."""
    for char in "|{}":
        text = text.replace(char, "\\" + char)
    return text


#: Python's own check of a call's arguments (a missing or unknown keyword): it names them.
PYTHON_ARGUMENT_ERROR = ("required keyword-only argument", "unexpected keyword argument",
                         "required positional argument", "positional argument")


def kind_of(error: BaseException) -> str:
    """`"clear"` if promptmix (or Python's argument check) raised it deliberately."""
    if isinstance(error, Changed):
        return "silent"
    frames = traceback.extract_tb(error.__traceback__)
    # Raised on purpose by a check of promptmix (a `raise` statement in its source), not an
    # indexing or shape error that happened to occur in its code.
    ours = bool(frames) and (
        Path(frames[-1].filename).resolve().is_relative_to(SOURCE)
        and (frames[-1].line or "").lstrip().startswith("raise")
    )
    state_dict = isinstance(error, RuntimeError) and "Error(s) in loading state_dict" in str(error)
    arguments = isinstance(error, TypeError) and any(p in str(error) for p in PYTHON_ARGUMENT_ERROR)
    return "clear" if ours or state_dict or arguments else "cryptic"


def outcome(call: Callable[[], object]) -> tuple[str, str]:
    """(what happened, its kind: "clear", "silent", "cryptic" or "valid")."""
    try:
        value = call()
    except Exception as error:
        message = str(error).replace("\n", " ")
        if len(message) > 110:
            message = message[:107] + "..."
        return f"`{type(error).__name__}`: {_cell(message)}", kind_of(error)
    if isinstance(value, str):
        return _cell(value), "valid"
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not torch.isfinite(value).all():
            kind = "NaN" if torch.isnan(value).any() else "inf"
            return f"{kind} result", "clear"
        return f"finite result {value.flatten()[:3].tolist()}", "silent"
    return f"returned {type(value).__name__}", "silent"


MARK = {"silent": "**SILENT**: ", "cryptic": "**CRYPTIC**: "}


def table() -> tuple[str, dict[str, int]]:
    rows = ["| # | Input | CPU | Device path (GPU, no host reads) |", "|---|---|---|---|"]
    counts = {"clear": 0, "silent": 0, "cryptic": 0, "valid": 0}
    for number, (what, kind, call) in enumerate(CASES, 1):
        cells, kinds = [], []
        for host in (True, False):
            _validation.HOST_CHECKS = host
            text, found = outcome(call)
            if kind == "valid" and found != "valid":
                found = "cryptic" if found == "clear" else found
            cells.append(MARK.get(found, "") + text)
            kinds.append(found)
        _validation.HOST_CHECKS = True
        worst = next((k for k in ("silent", "cryptic", "valid") if k in kinds), "clear")
        counts[worst] += 1
        label = what + (" (valid)" if kind == "valid" else "")
        rows.append(f"| {number} | {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows), counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="replace the table between the markers")
    args = parser.parse_args()
    torch.set_num_threads(1)
    text, counts = table()
    bad = sum(kind == "bad" for _, kind, _ in CASES)
    summary = (
        f"{len(CASES)} inputs ({bad} bad, {len(CASES) - bad} valid but extreme): "
        f"{counts['clear']} clear, {counts['silent']} silent, {counts['cryptic']} cryptic "
        f"(the worst of the two paths). Generated by `benchmarks/bad_inputs.py` with torch "
        f"{torch.__version__.split('+')[0]}."
    )
    block = f"{BEGIN}\n{summary}\n\n{text}\n{END}"
    if args.write:
        page = args.write.read_text()
        start, end = page.index(BEGIN), page.index(END) + len(END)
        args.write.write_text(page[:start] + block + page[end:])
    else:
        print(block)
    print(summary, file=sys.stderr)
    sys.exit(1 if counts["silent"] or counts["cryptic"] else 0)


if __name__ == "__main__":
    main()
