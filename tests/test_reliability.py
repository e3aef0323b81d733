"""Reliability: no host syncs in a training step, and no finite number from bad input.

The policy (docs/reliability.md): a function either raises a named error or returns a non-finite
result. Value checks raise where reading the value is free (CPU tensors); elsewhere the same
condition propagates NaN on the device. `_validation.HOST_CHECKS = False` makes CPU tensors take
that device path, so these tests cover it without a GPU.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import promptmix.functional as PF
from promptmix import (
    AssignmentEntropy,
    DiversityLoss,
    ImagePrototypeLoss,
    InterClassDispersion,
    MixtureOfPromptsLoss,
    PromptAnchor,
    SoftEMAssigner,
    TextToTextLoss,
    UsageEstimate,
    UsageFloor,
    ZeroShotConsistency,
    _validation,
)

pytestmark = pytest.mark.usefixtures("single_thread")

NAN = float("nan")
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def make_problem(batch=8, classes=4, k=3, dim=6, dtype=torch.float32):
    images = torch.randn(batch, dim, dtype=dtype)
    prompts = torch.randn(classes, k, dim, dtype=dtype, requires_grad=True)
    labels = torch.arange(batch) % (classes - 1)  # the last class is absent
    return images, prompts, labels


@contextlib.contextmanager
def device_path():
    """Value checks behave as on a GPU: no host reads, NaN propagation instead."""
    switch = _validation.HOST_CHECKS
    _validation.HOST_CHECKS = False
    try:
        yield
    finally:
        _validation.HOST_CHECKS = switch


# ------------------------------------------------------------------ no device-to-host sync


def _forbid(name):
    def raising(*args, **kwargs):
        raise AssertionError(f"{name} would synchronise the device with the host")

    return raising


def _no_bool_mask_getitem(original):
    def getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            raise AssertionError("indexing with a boolean mask synchronises (nonzero)")
        return original(self, index)

    return getitem


@pytest.fixture
def no_host_sync(monkeypatch):
    """Every Python-level way a step could read a device value on the host raises."""
    with device_path():
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__",
                     "nonzero", "unique", "bincount", "masked_select", "cpu", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, _forbid(f"Tensor.{name}"))
        for name in ("unique", "nonzero", "bincount", "masked_select", "unique_consecutive",
                     "repeat_interleave", "argwhere"):
            monkeypatch.setattr(torch, name, _forbid(f"torch.{name}"))
        monkeypatch.setattr(
            torch.Tensor, "__getitem__", _no_bool_mask_getitem(torch.Tensor.__getitem__)
        )
        yield


def every_regularizer() -> dict[str, tuple[torch.nn.Module, float]]:
    """Every field regularizer and the usage floor, with frozen references stored (dim 6)."""
    generator = torch.Generator().manual_seed(3)
    text = torch.randn(4, 6, generator=generator)
    return {
        "usage": (UsageFloor(floor=0.5), 1.0),
        "anchor": (PromptAnchor(anchor_features=text), 8.0),
        "zero_shot": (ZeroShotConsistency(zero_shot_text_features=text, text_weight=1.0), 1.0),
        "text": (TextToTextLoss(template_features=text, noise_std=0.05), 5.0),
        "dispersion": (InterClassDispersion(), 0.1),
        "prototypes": (ImagePrototypeLoss(prototypes=text), 0.0),  # weight 0: computed too
    }


@pytest.mark.parametrize(
    ("assignment", "entropy_mode", "usage", "regularized"),
    [
        ("soft", "marginal", False, False),
        ("soft", "marginal", True, False),
        ("sinkhorn", "marginal", True, False),
        ("sinkhorn", "marginal", False, False),
        ("soft", "mutual_information", False, False),
        ("soft", "sample", False, False),
        ("hard", "marginal", True, True),
        ("soft", "marginal", True, True),
    ],
    ids=[
        "soft",
        "soft-usage",
        "sinkhorn-usage",
        "sinkhorn",
        "mutual-information",
        "sample",
        "hard-usage-regularizers",
        "soft-usage-regularizers",
    ],
)
def test_training_step_makes_no_host_sync(
    assignment, entropy_mode, usage, regularized, request
) -> None:
    """Construction may read host values (it runs once); the guard starts with the first step."""
    images, prompts, labels = make_problem()
    loss_fn = MixtureOfPromptsLoss(
        assigner=SoftEMAssigner(mode=assignment),
        entropy=AssignmentEntropy(mode=entropy_mode),
        usage_estimate=UsageEstimate(num_classes=4, n_subprompts=3) if usage else None,
        regularizers=every_regularizer() if regularized else None,
        diversity_weight=0.1,
        tau=0.3,
    )
    optimizer = torch.optim.SGD([prompts], lr=0.1)
    request.getfixturevalue("no_host_sync")
    for _ in range(2):  # the second step reads the usage estimate the first one wrote
        optimizer.zero_grad()
        out = loss_fn(images, prompts, labels.to(torch.int32), logit_scale=torch.tensor(50.0))
        out["loss"].backward()
        optimizer.step()


def test_the_guard_catches_a_sync(no_host_sync) -> None:
    with pytest.raises(AssertionError, match="synchronise"):
        torch.unique(torch.tensor([1, 1]))
    with pytest.raises(AssertionError, match="synchronise"):
        PF.class_mean_responsibilities(torch.full((2, 2), 0.5), torch.tensor([0, 1]))
    with pytest.raises(AssertionError, match="synchronise"):
        float(torch.tensor(1.0))


def test_the_device_path_gives_the_same_loss() -> None:
    images, prompts, labels = make_problem()
    loss_fn = MixtureOfPromptsLoss(
        usage_estimate=UsageEstimate(num_classes=4, n_subprompts=3)
    ).eval()  # eval: the usage estimate stays as it is between the two calls
    host = loss_fn(images, prompts, labels)
    with device_path():
        device = loss_fn(images, prompts, labels)
    torch.testing.assert_close(host["loss"], device["loss"])


# ------------------------------------------------------------------ non-finite input


def _poisoned(images, prompts, where):
    images, prompts = images.clone(), prompts.detach().clone()
    if where == "subprompt":
        prompts[1, 0, 2] = NAN
    elif where == "absent-class":
        prompts[3, 1, 0] = NAN
    elif where == "image":
        images[2, 1] = NAN
    elif where == "inf-image":
        images[0, 0] = math.inf
    return images, prompts.requires_grad_()


@pytest.mark.parametrize("where", ["subprompt", "absent-class", "image", "inf-image"])
@pytest.mark.parametrize(
    "weights",
    [{}, {"diversity_weight": 0.0}, {"entropy_weight": 0.0}, {"mixture_weight": 0.0},
     {"diversity_weight": 0.0, "entropy_weight": 0.0, "mixture_weight": 0.0}],
)
@pytest.mark.parametrize("mode", ["soft", "hard", "sinkhorn"])
def test_non_finite_features_never_give_a_finite_loss(where, weights, mode) -> None:
    images, prompts, labels = make_problem()
    images, prompts = _poisoned(images, prompts, where)
    loss_fn = MixtureOfPromptsLoss(assigner=SoftEMAssigner(mode=mode), **weights)
    assert not torch.isfinite(loss_fn(images, prompts, labels)["loss"])


def test_unit_keeps_nan_and_inf_visible() -> None:
    from promptmix.functional._common import _unit

    rows = torch.tensor([[NAN, 1.0], [math.inf, 1.0], [0.0, 0.0], [3e20, 4e20]])
    unit = _unit(rows)
    assert torch.isnan(unit[0]).all() and not torch.isfinite(unit[1]).all()
    torch.testing.assert_close(unit[2:], torch.tensor([[0.0, 0.0], [0.6, 0.8]]))
    # Shorter than 1 / sqrt(float32 max) = 5.4e-20: counts as zero (its gradient would overflow).
    short = torch.tensor([[1e-21, 0.0], [1e-18, 0.0]], requires_grad=True)
    unit = _unit(short)
    torch.testing.assert_close(unit.detach(), torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    unit[0].sum().backward()
    assert short.grad.abs().max() == 0


@pytest.mark.parametrize("mode", ["soft", "hard", "sinkhorn"])
def test_assigner_marks_a_nan_image_not_uniform(mode) -> None:
    images, prompts, labels = make_problem()
    images[2] = NAN
    gamma = SoftEMAssigner(mode=mode)(images, prompts.detach(), labels)
    assert torch.isnan(gamma[2]).all()
    if mode != "sinkhorn":  # Sinkhorn couples a class's rows: the whole class is NaN
        assert torch.isfinite(gamma[torch.arange(8) != 2]).all()


def test_diversity_and_entropy_do_not_hide_nan() -> None:
    prompts = torch.randn(2, 3, 4)
    prompts[0, 1, 1] = NAN
    assert torch.isnan(DiversityLoss()(prompts))
    mask = torch.tensor([False, True])
    assert torch.isnan(DiversityLoss()(prompts, mask))  # a masked-out class still shows
    assert torch.isnan(PF.diversity_loss(prompts[:, 1:2]))  # K == 1: the connected zero
    assert torch.isnan(PF.connected_zero(prompts))
    gamma = torch.full((3, 2), 0.5)
    gamma[1] = NAN
    for path in (contextlib.nullcontext, device_path):
        with path():
            for mode in ("sample", "marginal", "mutual_information"):
                value = PF.assignment_entropy(gamma, torch.tensor([0, 0, 1]), mode=mode)
                assert torch.isnan(value)


def test_device_path_makes_bad_values_nan_instead_of_raising() -> None:
    images, prompts, labels = make_problem()
    loss_fn = MixtureOfPromptsLoss(
        usage_estimate=UsageEstimate(num_classes=4, n_subprompts=3),
        mixture_weight=0.0,
    )
    bad_labels = labels.clone()
    bad_labels[0] = 7
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        loss_fn(images, prompts, bad_labels)
    with device_path():
        assert torch.isnan(loss_fn(images, prompts, bad_labels)["loss"])
        bad_labels[0] = -1  # would wrap around to the last class if indexed as it is
        assert torch.isnan(loss_fn(images, prompts, bad_labels)["loss"])
        own = PF.own_class_similarities(images, prompts, bad_labels)
        assert torch.isnan(own[0]).all() and torch.isfinite(own[1:]).all()
        off_simplex = torch.tensor([[0.9, 0.9], [0.5, 0.5]])
        assert torch.isnan(PF.assignment_entropy(off_simplex, mode="marginal"))
        prior = torch.tensor([[0.9, 0.9]])
        assert torch.isnan(PF.assignment_entropy(
            off_simplex[1:], torch.tensor([0]), mode="marginal", usage_prior=prior,
            prior_count=1.0,
        ))


# ------------------------------------------------------------------ labels and logit_scale


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
def test_every_integer_label_dtype_is_class_indices(dtype) -> None:
    images, prompts, labels = make_problem()
    labels = torch.tensor([0, 2, 2, 1, 0, 2, 1, 1])  # uint8 as a mask would pick rows 1-7
    estimate = UsageEstimate(num_classes=4, n_subprompts=3)
    reference = MixtureOfPromptsLoss(usage_estimate=estimate)(images, prompts, labels)
    estimate = UsageEstimate(num_classes=4, n_subprompts=3)
    out = MixtureOfPromptsLoss(usage_estimate=estimate)(images, prompts, labels.to(dtype))
    for key in ("loss", "ce", "entropy", "diversity", "responsibilities"):
        torch.testing.assert_close(out[key], reference[key])
    own = PF.own_class_similarities(images, prompts, labels.to(dtype))
    torch.testing.assert_close(own, PF.own_class_similarities(images, prompts, labels))


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.complex64])
def test_non_integer_labels_get_a_named_error(dtype) -> None:
    images, prompts, labels = make_problem()
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        MixtureOfPromptsLoss()(images, prompts, labels.to(dtype))


@pytest.mark.parametrize(
    ("scale", "error", "match"),
    [
        (torch.tensor(-5.0), ValueError, r"logit_scale must be in \(0, inf\) but is -5"),
        (torch.tensor(NAN), ValueError, "logit_scale must be in"),
        (torch.tensor(math.inf), ValueError, "logit_scale must be in"),
        (torch.tensor(0.0), ValueError, "logit_scale must be in"),
        (torch.full((8,), 10.0), ValueError, r"shape \(\) or \(1,\) but has shape \(8,\)"),
        (torch.tensor(True), TypeError, "real tensor"),
        (-1.0, ValueError, "logit_scale"),
    ],
)
def test_logit_scale_is_validated(scale, error, match) -> None:
    images, prompts, labels = make_problem()
    with pytest.raises(error, match=match):
        MixtureOfPromptsLoss()(images, prompts, labels, logit_scale=scale)


def test_logit_scale_tensor_on_the_device_path() -> None:
    similarities = torch.rand(2, 3, 2)
    for good in (torch.tensor(20.0), torch.tensor([20.0])):
        torch.testing.assert_close(
            PF.class_logits(similarities, logit_scale=good),
            PF.class_logits(similarities, logit_scale=20.0),
        )
    with device_path():
        for bad in (torch.tensor(-5.0), torch.tensor(NAN), torch.tensor(0.0)):
            assert torch.isnan(PF.class_logits(similarities, logit_scale=bad)).all()


# ------------------------------------------------------------------ tiny tau


@pytest.mark.parametrize("mode", ["soft", "hard", "sinkhorn"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_tiny_tau_does_not_overflow(mode, dtype) -> None:
    images, prompts, labels = make_problem(dtype=dtype)
    gamma = PF.responsibilities(images, prompts.detach(), labels, tau=1e-3, mode=mode)
    assert gamma.dtype == dtype and torch.isfinite(gamma).all()
    torch.testing.assert_close(gamma.float().sum(-1), torch.ones(8), atol=1e-2, rtol=0)
    loss_fn = MixtureOfPromptsLoss(assigner=SoftEMAssigner(mode=mode), tau=1e-3)
    out = loss_fn(images, prompts, labels)
    assert torch.isfinite(out["loss"])


def test_a_tau_beyond_float32_blames_tau() -> None:
    images, prompts, labels = make_problem()
    with pytest.raises(ValueError, match=r"^tau must be >= logit_scale / "):
        MixtureOfPromptsLoss(tau=1e-40)(images, prompts, labels)
    with pytest.raises(ValueError, match=r"^tau must be"):
        PF.class_logits(torch.rand(2, 3, 2), aggregation="responsibility", tau=1e-40)


# ------------------------------------------------------------------ buffers follow the inputs


def test_usage_buffer_follows_the_inputs_dtype_without_to() -> None:
    estimate = UsageEstimate(num_classes=2, n_subprompts=2)
    loss_fn = MixtureOfPromptsLoss(usage_estimate=estimate)
    images, prompts = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 2, 3).double()
    value = loss_fn(images, prompts.requires_grad_(), torch.tensor([0, 1]))["loss"]
    assert estimate.usage.dtype == torch.float64 and value.dtype == torch.float64
    value.backward()
    estimate.update(torch.full((2, 2), 0.5, dtype=torch.bfloat16), torch.tensor([0, 1]))
    assert estimate.usage.dtype == torch.float64  # never narrowed
    assert "usage_estimate.usage" in loss_fn.state_dict()


def test_usage_buffer_follows_the_inputs_device() -> None:
    estimate = UsageEstimate(num_classes=2, n_subprompts=2)
    gamma = torch.full((2, 2), 0.5, device="meta")
    estimate.update(gamma, torch.tensor([0, 1], device="meta"))
    assert estimate.usage.device.type == "meta"


def test_dimension_mismatch_message_names_both_dimensions() -> None:
    match = "image_features has dim 5 and subprompt_features has dim 6"
    with pytest.raises(ValueError, match=match):
        PF.subprompt_similarities(torch.randn(8, 5), torch.randn(4, 3, 6))


def test_whole_default_training_step_makes_no_host_sync(request) -> None:
    """Learner forward, the scheduled loss with its defaults, backward and the optimizer step.

    Construction may read host values (it runs once); the guard starts with the first step.
    """
    import open_clip

    from promptmix import MixtureOfPrompts, TemperatureSchedule

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    ).requires_grad_(False)
    classnames = ["cat", "red panda", "sedan"]
    learner = MixtureOfPrompts(
        model, open_clip.get_tokenizer("ViT-B-32"), classnames, n_subprompts=2
    )
    schedule = TemperatureSchedule(total_steps=4)
    loss_fn = MixtureOfPromptsLoss(
        usage_estimate=UsageEstimate(num_classes=3, n_subprompts=2), tau=schedule
    )
    optimizer = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.1)
    images, labels = torch.randn(6, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    request.getfixturevalue("no_host_sync")
    for _ in range(2):
        optimizer.zero_grad()
        out = loss_fn(images, learner(), labels)
        out["loss"].backward()
        optimizer.step()
        schedule.step()


def test_the_recipe_training_step_makes_no_host_sync(request) -> None:
    """The recommended recipe: shared looks, their start, label noise and the learner's prior.

    Construction and `initialize_from_kmeans` read the host (once); the guard starts after.
    """
    import open_clip

    from promptmix import OffsetMixtureOfPrompts, TemperatureSchedule, initialize_from_kmeans

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=32),
        text_cfg=dict(width=32, heads=2, layers=1),
    )
    prompts = OffsetMixtureOfPrompts(
        model, open_clip.get_tokenizer("ViT-B-32"), ["cat", "dog", "owl"], n_subprompts=2
    )
    images, labels = torch.randn(12, 16), torch.arange(3).repeat(4)
    initialize_from_kmeans(prompts, images, labels)
    schedule = TemperatureSchedule(total_steps=4)
    loss_fn = MixtureOfPromptsLoss(tau=schedule)
    # SGD: PyTorch's CPU Adam reads its step count on the host (its own business, not ours).
    optimizer = torch.optim.SGD(prompts.parameters(), lr=0.1)
    before = prompts.shared_offsets.detach().clone()
    request.getfixturevalue("no_host_sync")
    for _ in range(2):
        optimizer.zero_grad()
        out = loss_fn(images, prompts(), labels, prompts.prior_loss())
        out["loss"].backward()
        optimizer.step()
        schedule.step()
    assert not torch.equal(prompts.shared_offsets, before)
