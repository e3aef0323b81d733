"""ZeroShotConsistency / functional.zero_shot_consistency: the kornia grid plus properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import promptmix.functional as PF
from promptmix import MixtureOfPromptsLoss, ZeroShotConsistency

pytestmark = pytest.mark.usefixtures("single_thread")

logit_values = st.floats(-100.0, 100.0, width=32)


@st.composite
def logit_pairs(draw) -> tuple[np.ndarray, np.ndarray]:
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 5)))
    return (
        draw(hnp.arrays(np.float32, shape, elements=logit_values)),
        draw(hnp.arrays(np.float32, shape, elements=logit_values)),
    )


def promptsrc(logits: torch.Tensor, zero_shot: torch.Tensor) -> torch.Tensor:
    """PromptSRC's L_SCL_logits, as written in trainers/promptsrc.py."""
    return (
        F.kl_div(
            F.log_softmax(logits / 1, dim=1),
            F.log_softmax(zero_shot / 1, dim=1),
            reduction="sum",
            log_target=True,
        )
        * (1 * 1)
        / logits.numel()
    )


def prograd(logits: torch.Tensor, zero_shot: torch.Tensor, t: float) -> torch.Tensor:
    """ProGrad's kl_loss (a cross-entropy), as written in trainers/prograd.py."""
    tea_prob = F.softmax(zero_shot / t, dim=-1)
    return (-tea_prob * F.log_softmax(logits / t, -1) * t * t).sum(1).mean()


class TestZeroShotConsistency:
    def test_smoke(self) -> None:
        logits = torch.randn(4, 5, requires_grad=True)
        loss = ZeroShotConsistency()(logits, torch.randn(4, 5))
        assert loss.shape == () and loss.item() > 0
        loss.backward()
        assert logits.grad.abs().sum() > 0

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"temperature": 0.0}, ValueError, "temperature"),
            ({"temperature": "1"}, TypeError, "temperature"),
            ({"temperature": 1e20}, ValueError, r"T\^2 must be a normal float32"),
            ({"temperature": 1e-20}, ValueError, r"T\^2 must be a normal float32"),
            ({"reduction": "avg"}, ValueError, "reduction"),
            ({"reduction": "batchmean"}, ValueError, "reduction must be one of 'mean'"),
            ({"text_weight": -1.0}, ValueError, "text_weight"),
            ({"image_weight": float("nan")}, ValueError, "image_weight"),
            ({"reduction": "none", "text_weight": 1.0}, ValueError, "reduction='none'"),
            ({"logit_scale": 0.0}, ValueError, "logit_scale"),
            ({"zero_shot_text_features": torch.ones(2, 3, 4)}, ValueError, "zero_shot_text"),
            (
                {"zero_shot_text_features": torch.full((2, 4), float("nan"))},
                ValueError,
                "zero_shot_text_features must be finite",
            ),
        ],
    )
    def test_bad_constructor_arguments(self, kwargs, error, match) -> None:
        with pytest.raises(error, match=match):
            ZeroShotConsistency(**kwargs)

    @pytest.mark.parametrize(
        ("logits", "zero_shot", "error", "match"),
        [
            (torch.randn(4), torch.randn(4), ValueError, "logits"),
            (torch.randn(4, 3), torch.randn(4, 2), ValueError, "zero_shot_logits"),
            (torch.randn(4, 3), torch.ones(4, 3, dtype=torch.long), TypeError, "zero_shot"),
        ],
    )
    def test_bad_inputs(self, logits, zero_shot, error, match) -> None:
        with pytest.raises(error, match=match):
            ZeroShotConsistency()(logits, zero_shot)

    def test_missing_inputs_are_named(self) -> None:
        with pytest.raises(TypeError, match="zero_shot_logits="):
            ZeroShotConsistency()(torch.randn(2, 3))
        with pytest.raises(TypeError, match="image_features="):
            ZeroShotConsistency(zero_shot_text_features=torch.randn(3, 4))(torch.randn(2, 3))
        with pytest.raises(TypeError, match="subprompt_features="):
            ZeroShotConsistency(text_weight=1.0)(torch.randn(2, 3), torch.randn(2, 3))

    @pytest.mark.parametrize(("reduction", "shape"), [("mean", ()), ("sum", ()), ("none", (4,))])
    def test_cardinality(self, reduction, shape) -> None:
        loss = ZeroShotConsistency(reduction=reduction)(torch.randn(4, 3), torch.randn(4, 3))
        assert loss.shape == shape

    def test_inputs_follow_the_configuration(self) -> None:
        text = torch.randn(3, 4)
        assert ZeroShotConsistency().inputs == ("logits", "zero_shot_logits")
        assert ZeroShotConsistency(text_weight=25.0, image_weight=10.0).inputs == (
            "logits",
            "zero_shot_logits",
            "subprompt_features",
            "anchor_features",
            "image_features",
            "zero_shot_image_features",
        )
        stored = ZeroShotConsistency(text_weight=1.0, zero_shot_text_features=text)
        assert stored.inputs == ("logits", "image_features", "subprompt_features")

    def test_hand_computed_values(self) -> None:
        # p_z = softmax([0, ln 3]) = (1/4, 3/4); p_l uniform: KL = 1/4 ln 1/2 + 3/4 ln 3/2.
        zero_shot = torch.tensor([[0.0, float(np.log(3.0))], [0.0, 0.0]])
        logits = torch.tensor([[5.0, 5.0], [1.0, 1.0]])
        kl = 0.25 * np.log(0.5) + 0.75 * np.log(1.5)
        per_sample = torch.tensor([kl, 0.0], dtype=torch.float32)
        torch.testing.assert_close(
            PF.zero_shot_consistency(logits, zero_shot, reduction="none"), per_sample
        )
        torch.testing.assert_close(
            PF.zero_shot_consistency(logits, zero_shot), per_sample.sum() / 2
        )
        torch.testing.assert_close(
            PF.zero_shot_consistency(logits, zero_shot, reduction="sum"), per_sample.sum()
        )
        averaged = PF.zero_shot_consistency(logits, zero_shot, average_over_classes=True)
        torch.testing.assert_close(averaged, per_sample.sum() / 4)
        # Temperature 2: p_z = softmax([0, ln 3 / 2]) = (1, sqrt 3) / (1 + sqrt 3), times T^2 = 4.
        p = np.array([1.0, np.sqrt(3.0)]) / (1 + np.sqrt(3.0))
        expected = 4 * float((p * np.log(p / 0.5)).sum())
        actual = PF.zero_shot_consistency(logits, zero_shot, temperature=2.0, reduction="none")
        torch.testing.assert_close(actual[0], torch.tensor(expected, dtype=torch.float32))

    def test_matches_promptsrc_and_prograd(self) -> None:
        logits, zero_shot = 30 * torch.randn(6, 5), 30 * torch.randn(6, 5)
        torch.testing.assert_close(
            ZeroShotConsistency(average_over_classes=True)(logits, zero_shot),
            promptsrc(logits, zero_shot),
        )
        # ProGrad reports the cross-entropy: KL + H(p_z), the same gradient.
        for t in (1.0, 2.0):
            ours = logits.clone().requires_grad_()
            theirs = logits.clone().requires_grad_()
            entropy = -(F.softmax(zero_shot / t, -1) * F.log_softmax(zero_shot / t, -1)).sum(1)
            value = ZeroShotConsistency(temperature=t)(ours, zero_shot)
            torch.testing.assert_close(
                value + t * t * entropy.mean(), prograd(theirs, zero_shot, t)
            )
            value.backward()
            prograd(theirs, zero_shot, t).backward()
            torch.testing.assert_close(ours.grad, theirs.grad)

    def test_promptsrc_with_the_l1_terms(self) -> None:
        logits, zero_shot = torch.randn(4, 3), torch.randn(4, 3)
        text, anchors = torch.randn(3, 8), torch.randn(3, 8)
        images, frozen_images = torch.randn(4, 8), torch.randn(4, 8)
        module = ZeroShotConsistency(average_over_classes=True, text_weight=25.0, image_weight=10.0)
        value = module(
            logits,
            zero_shot,
            subprompt_features=text,
            anchor_features=anchors,
            image_features=images,
            zero_shot_image_features=frozen_images,
        )
        normalize = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
        expected = (
            promptsrc(logits, zero_shot)
            + 25 * F.l1_loss(normalize(text), normalize(anchors), reduction="mean")
            + 10 * F.l1_loss(normalize(images), normalize(frozen_images), reduction="mean")
        )
        torch.testing.assert_close(value, expected)

    def test_zero_shot_logits_from_stored_text_features(self) -> None:
        text, images = torch.randn(3, 8), torch.randn(5, 8)
        logits = torch.randn(5, 3)
        zero_shot = 50.0 * F.normalize(images, dim=-1) @ F.normalize(text, dim=-1).T
        stored = ZeroShotConsistency(zero_shot_text_features=text, logit_scale=50.0)
        torch.testing.assert_close(
            stored(logits, image_features=images), PF.zero_shot_consistency(logits, zero_shot)
        )
        assert "zero_shot_text_features" not in stored.state_dict()
        with pytest.raises(TypeError, match="do not pass them too"):
            stored(logits, zero_shot, image_features=images)

    def test_zero_shot_logits_are_targets(self) -> None:
        logits = torch.randn(3, 4, requires_grad=True)
        zero_shot = torch.randn(3, 4, requires_grad=True)
        ZeroShotConsistency()(logits, zero_shot).backward()
        assert zero_shot.grad is None and logits.grad is not None

    def test_masked_teacher_classes_cost_nothing(self) -> None:
        # A class the zero-shot classifier rules out (-inf) contributes 0 * log 0 = 0, not NaN.
        zero_shot = torch.tensor([[0.0, float("-inf"), 0.0]])
        logits = torch.tensor([[1.0, 2.0, 1.0]], requires_grad=True)
        loss = ZeroShotConsistency()(logits, zero_shot)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()

    def test_empty_batch_is_a_connected_zero(self) -> None:
        logits = torch.randn(0, 3, requires_grad=True)
        loss = ZeroShotConsistency()(logits, torch.randn(0, 3))
        assert loss.item() == 0.0 and loss.requires_grad

    @pytest.mark.parametrize("temperature", [1.0, 2.5])
    def test_gradcheck(self, temperature) -> None:
        logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        zero_shot = torch.randn(3, 4, dtype=torch.float64)
        assert torch.autograd.gradcheck(
            lambda x: PF.zero_shot_consistency(x, zero_shot, temperature=temperature), (logits,)
        )

    @pytest.mark.parametrize(
        "kwargs",
        [{}, {"temperature": 2.0}, {"reduction": "none"}, {"average_over_classes": True}],
    )
    def test_module_equals_functional(self, kwargs) -> None:
        logits, zero_shot = torch.randn(5, 4), torch.randn(5, 4)
        torch.testing.assert_close(
            ZeroShotConsistency(**kwargs)(logits, zero_shot),
            PF.zero_shot_consistency(logits, zero_shot, **kwargs),
        )

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_precision_finite(self, dtype) -> None:
        # CLIP-scale logits (|l| ~ 100): exp overflows float16 without log_softmax.
        reference, zero_shot = 100 * torch.randn(6, 5), 100 * torch.randn(6, 5)
        logits = reference.to(dtype).requires_grad_()
        loss = ZeroShotConsistency()(logits, zero_shot.to(dtype))
        loss.backward()
        assert loss.dtype == dtype
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
        expected = ZeroShotConsistency()(reference.to(dtype).float(), zero_shot.to(dtype).float())
        torch.testing.assert_close(loss.float(), expected, rtol=1e-2, atol=1e-2)

    def test_in_the_mixture_loss(self) -> None:
        images, labels = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
        prompts = torch.randn(3, 2, 8, requires_grad=True)
        text = torch.randn(3, 8)
        loss_fn = MixtureOfPromptsLoss(
            regularizers={"consistency": (ZeroShotConsistency(zero_shot_text_features=text), 1.0)}
        )
        out = loss_fn(images, prompts, labels, logit_scale=100.0)
        zero_shot = 100.0 * F.normalize(images, dim=-1) @ F.normalize(text, dim=-1).T
        expected = PF.zero_shot_consistency(loss_fn.logits(images, prompts), zero_shot)
        torch.testing.assert_close(out["consistency"], expected)
        (grad,) = torch.autograd.grad(out["consistency"], prompts)
        assert grad.abs().sum() > 0


@pytest.mark.compile
def test_torch_compile_matches_eager() -> None:
    dynamo = pytest.importorskip("torch._dynamo")
    if not dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this platform")
    logits, zero_shot = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5)
    module = ZeroShotConsistency(temperature=2.0)
    compiled = torch.compile(module, backend="aot_eager")
    value = compiled(logits, zero_shot)
    (grad,) = torch.autograd.grad(value, logits)
    (eager_grad,) = torch.autograd.grad(module(logits, zero_shot), logits)
    torch.testing.assert_close(value, module(logits, zero_shot))
    torch.testing.assert_close(grad, eager_grad)


# ----------------------------------------------------------------------------- properties


@given(logit_pairs(), st.floats(0.25, 8.0))
def test_property_never_negative(pair, temperature) -> None:
    logits, zero_shot = map(torch.from_numpy, pair)
    loss = PF.zero_shot_consistency(logits, zero_shot, temperature=temperature, reduction="none")
    assert torch.isfinite(loss).all()
    assert (loss >= -1e-4).all()


@given(logit_pairs(), st.floats(0.25, 8.0), st.floats(-50.0, 50.0))
def test_property_equal_logits_give_zero(pair, temperature, shift) -> None:
    logits, _ = map(torch.from_numpy, pair)
    # softmax is shift-invariant: a per-row constant shift is still "equal" logits.
    loss = PF.zero_shot_consistency(logits, logits + shift, temperature=temperature)
    assert abs(loss.item()) < 1e-4


def test_a_nan_teacher_is_not_read_as_no_mass() -> None:
    """NaN zero-shot logits gave 0.0 before 1.0 (NaN > 0 is False, so they cost nothing)."""
    logits = torch.randn(4, 3)
    teacher = torch.randn(4, 3)
    teacher[1, 2] = float("nan")
    assert torch.isnan(PF.zero_shot_consistency(logits, teacher))
    assert torch.isnan(PF.zero_shot_consistency(logits, teacher, reduction="none")[1])
    assert torch.isfinite(PF.zero_shot_consistency(logits, teacher, reduction="none")[0])
    # A class the teacher gives no mass at all still costs nothing (0 log 0 = 0).
    certain = torch.tensor([[0.0, -float("inf"), -float("inf")]])
    assert torch.isfinite(PF.zero_shot_consistency(torch.zeros(1, 3), certain))


@pytest.mark.parametrize("temperature", [1e20, 1e-20])
def test_a_temperature_whose_square_leaves_float32_is_named(temperature) -> None:
    with pytest.raises(ValueError, match=r"T\^2 must be a normal float32"):
        PF.zero_shot_consistency(torch.randn(2, 3), torch.randn(2, 3), temperature=temperature)
    finite = PF.zero_shot_consistency(torch.randn(2, 3), torch.randn(2, 3), temperature=1e18)
    assert torch.isfinite(finite)
