"""PromptAnchor / functional.prompt_anchor_loss: the kornia grid plus hypothesis properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import promptmix.functional as PF
from promptmix import MixtureOfPromptsLoss, PromptAnchor

pytestmark = pytest.mark.usefixtures("single_thread")

moderate = st.one_of(
    st.just(0.0), st.floats(1 / 64, 10.0, width=32), st.floats(-10.0, -1 / 64, width=32)
)


@st.composite
def prompts_and_anchors(draw) -> tuple[np.ndarray, np.ndarray]:
    c, k, d = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 6))
    prompts = draw(hnp.arrays(np.float32, (c, k, d), elements=moderate))
    anchor_shape = draw(st.sampled_from([(c, d), (c, k, d)]))
    return prompts, draw(hnp.arrays(np.float32, anchor_shape, elements=moderate))


def reference(prompts: torch.Tensor, anchors: torch.Tensor, distance: str) -> torch.Tensor:
    """KgCoOp's / PromptSRC's expressions, written out with torch.nn.functional."""
    t = F.normalize(prompts, dim=-1)
    a = F.normalize(anchors, dim=-1)
    a = a.unsqueeze(1) if a.dim() == 2 else a
    a = a.expand_as(t)
    if distance == "cosine":
        return 1 - F.cosine_similarity(t, a, dim=-1).mean()
    if distance == "l2":
        return (t - a).pow(2).sum(-1).mean()
    return F.l1_loss(t, a)


class TestPromptAnchor:
    def test_smoke(self) -> None:
        prompts = torch.randn(4, 3, 8, requires_grad=True)
        loss = PromptAnchor()(prompts, torch.randn(4, 8))
        assert loss.shape == () and 0 < loss.item() < 2
        loss.backward()
        assert prompts.grad.abs().sum() > 0

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"distance": "l3"}, ValueError, "distance"),
            ({"reduction": "avg"}, ValueError, "reduction"),
            ({"anchor_features": [[1.0]]}, TypeError, "anchor_features"),
            ({"anchor_features": torch.ones(2, 3, dtype=torch.long)}, TypeError, "anchor_features"),
        ],
    )
    def test_bad_constructor_arguments(self, kwargs, error, match) -> None:
        with pytest.raises(error, match=match):
            PromptAnchor(**kwargs)

    @pytest.mark.parametrize(
        ("prompts", "anchors", "match"),
        [
            (torch.randn(8), torch.randn(1, 8), "subprompt_features"),  # rank 1
            (torch.randn(2, 3, 4, 8), torch.randn(2, 8), "subprompt_features"),  # rank 4
            (torch.randn(2, 0, 8), torch.randn(2, 8), "subprompt_features"),  # K = 0
            (torch.randn(2, 3, 8), torch.randn(3, 8), "anchor_features"),  # classes differ
            (torch.randn(2, 3, 8), torch.randn(2, 4), "anchor_features"),  # dims differ
            (torch.randn(2, 3, 8), torch.randn(2, 2, 8), "anchor_features"),  # K differs
        ],
    )
    def test_bad_inputs(self, prompts, anchors, match) -> None:
        with pytest.raises(ValueError, match=match):
            PromptAnchor()(prompts, anchors)

    def test_anchors_given_twice_or_never(self) -> None:
        with pytest.raises(TypeError, match="constructor"):
            PromptAnchor(anchor_features=torch.ones(2, 4))(torch.ones(2, 4), torch.ones(2, 4))
        with pytest.raises(TypeError, match="anchor_features="):
            PromptAnchor()(torch.ones(2, 4))

    @pytest.mark.parametrize(
        ("prompts", "anchors", "reduction", "shape"),
        [
            ((5, 3, 8), (5, 8), "none", (5, 3)),
            ((5, 3, 8), (5, 3, 8), "none", (5, 3)),
            ((5, 8), (5, 8), "none", (5, 1)),
            ((5, 3, 8), (5, 8), "mean", ()),
            ((5, 8), (5, 8), "sum", ()),
        ],
    )
    def test_cardinality(self, prompts, anchors, reduction, shape) -> None:
        loss = PromptAnchor(reduction=reduction)(torch.randn(prompts), torch.randn(anchors))
        assert loss.shape == shape

    def test_hand_computed_values(self) -> None:
        # Class 0: prompts at 0 and 45 degrees from anchor [1, 0]; class 1: anti-parallel.
        prompts = torch.tensor([[[2.0, 0.0], [1.0, 1.0]], [[0.0, -3.0], [0.0, -1.0]]])
        anchors = torch.tensor([[5.0, 0.0], [0.0, 1.0]])
        c45 = math.sqrt(0.5)
        cosine = torch.tensor([[0.0, 1 - c45], [2.0, 2.0]])
        torch.testing.assert_close(PromptAnchor(reduction="none")(prompts, anchors), cosine)
        torch.testing.assert_close(PromptAnchor()(prompts, anchors), cosine.mean())
        torch.testing.assert_close(
            PromptAnchor(distance="l2", reduction="none")(prompts, anchors), 2 * cosine
        )
        # L1: |(c45, c45) - (1, 0)| = (1 - c45 + c45) / 2 = 0.5; |(0,-1) - (0,1)| = 2 / 2 = 1.
        l1 = torch.tensor([[0.0, 0.5], [1.0, 1.0]])
        torch.testing.assert_close(
            PromptAnchor(distance="l1", reduction="none")(prompts, anchors), l1
        )
        torch.testing.assert_close(
            PromptAnchor(distance="l1", reduction="sum")(prompts, anchors), l1.sum()
        )

    @pytest.mark.parametrize("distance", ["cosine", "l2", "l1"])
    @pytest.mark.parametrize("anchor_shape", [(4, 8), (4, 3, 8)])
    def test_matches_the_original_expressions(self, distance, anchor_shape) -> None:
        prompts, anchors = torch.randn(4, 3, 8), torch.randn(anchor_shape)
        torch.testing.assert_close(
            PromptAnchor(distance=distance)(prompts, anchors), reference(prompts, anchors, distance)
        )

    def test_kgcoop_single_prompt(self) -> None:
        # KgCoOp: score = 1 - mean(CosineSimilarity(text, old)) over (num_classes, dim).
        text, old = torch.randn(6, 8), torch.randn(6, 8)
        expected = 1 - F.cosine_similarity(text, old, dim=1, eps=1e-7).mean()
        torch.testing.assert_close(PromptAnchor()(text, old), expected)

    def test_no_classes_is_a_connected_zero(self) -> None:
        prompts = torch.randn(0, 3, 8, requires_grad=True)
        loss = PromptAnchor()(prompts, torch.randn(0, 8))
        assert loss.item() == 0.0 and loss.requires_grad

    @pytest.mark.parametrize("distance", ["cosine", "l2", "l1"])
    def test_gradcheck(self, distance) -> None:
        prompts = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
        anchors = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda p, a: PF.prompt_anchor_loss(p, a, distance=distance), (prompts, anchors)
        )

    @pytest.mark.parametrize(
        "kwargs", [{}, {"distance": "l2"}, {"distance": "l1", "reduction": "none"}]
    )
    def test_module_equals_functional(self, kwargs) -> None:
        prompts, anchors = torch.randn(3, 4, 8), torch.randn(3, 8)
        expected = PF.prompt_anchor_loss(prompts, anchors, **kwargs)
        torch.testing.assert_close(PromptAnchor(**kwargs)(prompts, anchors), expected)
        stored = PromptAnchor(**kwargs, anchor_features=anchors)
        torch.testing.assert_close(stored(prompts), expected)

    def test_stored_anchors_are_a_non_persistent_buffer(self) -> None:
        anchors = torch.randn(3, 8)
        module = PromptAnchor(anchor_features=anchors)
        assert module.inputs == ("subprompt_features",)
        assert PromptAnchor().inputs == ("subprompt_features", "anchor_features")
        assert "anchor_features" not in module.state_dict()
        assert module.to(torch.float64).anchor_features.dtype == torch.float64
        anchors.zero_()  # a copy is stored
        assert module.anchor_features.abs().sum() > 0

    def test_gradient_pulls_toward_the_anchor(self) -> None:
        prompts = torch.tensor([[[1.0, 1.0, 0.0]]], requires_grad=True)
        anchors = torch.tensor([[1.0, 0.0, 0.0]])
        before = PromptAnchor()(prompts, anchors)
        before.backward()
        with torch.no_grad():
            after = PromptAnchor()(prompts - 0.1 * prompts.grad, anchors)
        assert after < before

    @pytest.mark.parametrize("distance", ["cosine", "l2", "l1"])
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_precision_finite(self, distance, dtype) -> None:
        # TCP's fp16 NaN: CosineSimilarity's eps=1e-7 rounds to 0 in float16; a zero prompt
        # then divides 0 by 0. Zero vectors are in here on purpose.
        prompts32 = torch.randn(4, 3, 8)
        prompts32[0, 0] = 0
        anchors = torch.randn(4, 8)
        anchors[1] = 0
        prompts = prompts32.to(dtype).requires_grad_()
        loss = PromptAnchor(distance=distance)(prompts, anchors.to(dtype))
        loss.backward()
        assert loss.dtype == dtype
        assert torch.isfinite(loss) and torch.isfinite(prompts.grad).all()
        expected = PromptAnchor(distance=distance)(prompts32, anchors)
        torch.testing.assert_close(loss.float(), expected, atol=2e-2, rtol=0)

    def test_in_the_mixture_loss(self) -> None:
        images, labels = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
        prompts = torch.randn(3, 2, 8, requires_grad=True)
        anchors = torch.randn(3, 8)
        plain = MixtureOfPromptsLoss()(images, prompts, labels)
        by_keyword = MixtureOfPromptsLoss(regularizers={"anchor": (PromptAnchor(), 8.0)})
        stored = MixtureOfPromptsLoss(
            regularizers={"anchor": (PromptAnchor(anchor_features=anchors), 8.0)}
        )
        out = by_keyword(images, prompts, labels, anchor_features=anchors)
        torch.testing.assert_close(out["anchor"], PF.prompt_anchor_loss(prompts, anchors))
        torch.testing.assert_close(out["loss"], plain["loss"] + 8.0 * out["anchor"])
        torch.testing.assert_close(stored(images, prompts, labels)["loss"], out["loss"])
        with pytest.raises(TypeError, match="anchor_features="):
            by_keyword(images, prompts, labels)


@pytest.mark.compile
def test_torch_compile_matches_eager() -> None:
    dynamo = pytest.importorskip("torch._dynamo")
    if not dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this platform")
    prompts = torch.randn(3, 4, 8, requires_grad=True)
    anchors = torch.randn(3, 8)
    for distance in ("cosine", "l1"):
        module = PromptAnchor(distance=distance, anchor_features=anchors)
        compiled = torch.compile(module, backend="aot_eager")
        value = compiled(prompts)
        (grad,) = torch.autograd.grad(value, prompts)
        (eager_grad,) = torch.autograd.grad(module(prompts), prompts)
        torch.testing.assert_close(value, module(prompts))
        torch.testing.assert_close(grad, eager_grad)


# ----------------------------------------------------------------------------- properties


@given(prompts_and_anchors())
def test_property_never_negative_and_bounded(arrays) -> None:
    prompts, anchors = map(torch.from_numpy, arrays)
    for distance, bound in (("cosine", 2.0), ("l2", 4.0), ("l1", 2.0)):
        loss = PF.prompt_anchor_loss(prompts, anchors, distance=distance, reduction="none")
        assert torch.isfinite(loss).all()
        assert (loss >= -1e-6).all() and (loss <= bound + 1e-5).all()


@given(prompts_and_anchors(), st.floats(1 / 8, 8.0))
def test_property_identical_gives_zero(arrays, scale) -> None:
    prompts, _ = map(torch.from_numpy, arrays)
    assume(bool((prompts.norm(dim=-1) > 1e-2).all()))
    for distance in ("cosine", "l2", "l1"):
        loss = PF.prompt_anchor_loss(prompts, prompts * scale, distance=distance)
        assert abs(loss.item()) < 1e-5


@given(st.integers(1, 4), st.integers(1, 4), st.integers(2, 6), st.data())
def test_property_orthogonal_gives_one(c, k, d, data) -> None:
    axis = data.draw(st.integers(0, d - 1))
    other = (axis + data.draw(st.integers(1, d - 1))) % d
    scales = data.draw(hnp.arrays(np.float32, (c, k, 1), elements=st.floats(0.125, 8.0, width=32)))
    prompts = torch.from_numpy(scales) * torch.eye(d)[axis]
    anchors = torch.eye(d)[other].expand(c, d)
    loss = PF.prompt_anchor_loss(prompts, anchors)
    assert abs(loss.item() - 1.0) < 1e-6
