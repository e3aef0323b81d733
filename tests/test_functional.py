"""The remaining pure functions of promptmix.functional, and the torch.compile equivalence check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import promptmix.functional as PF
from promptmix import DiversityLoss

pytestmark = pytest.mark.usefixtures("single_thread")

AGGREGATIONS = ("logsumexp", "max", "mean", "responsibility")


class TestConnectedZero:
    def test_is_zero_and_in_the_graph(self) -> None:
        a = torch.randn(3, requires_grad=True)
        b = torch.randn(2, 2, requires_grad=True)
        zero = PF.connected_zero(a, b)
        assert zero.shape == () and zero.item() == 0.0 and zero.requires_grad
        zero.backward()
        assert torch.equal(a.grad, torch.zeros(3)) and torch.equal(b.grad, torch.zeros(2, 2))


class TestPairwiseCosine:
    def test_hand_values(self) -> None:
        features = torch.tensor([[[2.0, 0.0], [1.0, 1.0], [0.0, 0.0]]])
        s = math.sqrt(0.5)
        expected = torch.tensor([[[1.0, s, 0.0], [s, 1.0, 0.0], [0.0, 0.0, 0.0]]])
        torch.testing.assert_close(PF.pairwise_cosine(features), expected)

    @pytest.mark.parametrize(
        ("features", "error"),
        [
            (torch.randn(4), ValueError),
            (torch.ones(1, 2, 3, dtype=torch.int32), TypeError),
            (torch.randn(2, 0, 3), ValueError),
        ],
    )
    def test_bad_inputs(self, features, error) -> None:
        with pytest.raises(error, match="subprompt_features"):
            PF.pairwise_cosine(features)

    def test_gradcheck(self) -> None:
        features = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(PF.pairwise_cosine, (features,))


class TestSimilarities:
    def test_shapes_and_values(self) -> None:
        images = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
        prompts = torch.tensor([[[1.0, 0.0], [0.0, 5.0]], [[-1.0, 0.0], [1.0, 1.0]]])
        s = math.sqrt(0.5)
        expected = torch.tensor([[[1.0, 0.0], [-1.0, s]], [[s, s], [-s, 1.0]]])
        similarities = PF.subprompt_similarities(images, prompts)
        assert similarities.shape == (2, 2, 2)
        torch.testing.assert_close(similarities, expected)
        labels = torch.tensor([1, 0])
        own = PF.own_class_similarities(images, prompts, labels)
        torch.testing.assert_close(own, expected[torch.arange(2), labels])
        torch.testing.assert_close(PF.own_class_similarities(images, prompts[labels]), own)

    @pytest.mark.parametrize(
        ("images", "prompts", "match"),
        [
            (torch.randn(4), torch.randn(2, 3, 4), "image_features"),
            (torch.randn(5, 4), torch.randn(4), "subprompt_features"),
            (torch.randn(5, 4), torch.randn(2, 3, 5), "share the last dimension"),
            (torch.randn(5, 4), torch.randn(2, 0, 4), "subprompt_features"),
        ],
    )
    def test_bad_inputs(self, images, prompts, match) -> None:
        with pytest.raises(ValueError, match=match):
            PF.subprompt_similarities(images, prompts)
        with pytest.raises(ValueError, match=match):
            PF.own_class_similarities(images, prompts, torch.zeros(len(images), dtype=torch.long))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_zero_vectors_give_zero_cosine_and_zero_gradient(self, dtype) -> None:
        # A zero vector has no direction: cosine 0 and gradient 0 (F.normalize's eps clamp gave
        # NaN in float16 and a gradient of 1/eps = 1e12 in float32).
        images = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]], dtype=dtype, requires_grad=True)
        prompts = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 1.0, 0.0]]], dtype=dtype)
        prompts.requires_grad_()
        similarities = PF.subprompt_similarities(images, prompts)
        assert torch.equal(similarities[0], torch.zeros(1, 2, dtype=dtype))
        assert torch.equal(similarities[:, :, 0], torch.zeros(2, 1, dtype=dtype))
        (similarities * 50).sum().backward()
        assert torch.equal(images.grad[0], torch.zeros(3, dtype=dtype))
        assert torch.equal(prompts.grad[0, 0], torch.zeros(3, dtype=dtype))
        assert torch.isfinite(prompts.grad).all() and prompts.grad[0, 1].abs().sum() > 0

    def test_mixed_dtypes_follow_the_images(self) -> None:
        images = torch.randn(3, 4, dtype=torch.float64)
        similarities = PF.subprompt_similarities(images, torch.randn(2, 2, 4))
        assert similarities.dtype == torch.float64


class TestClassLogits:
    SIMS = torch.tensor([[[0.5, 0.5], [0.1, 0.3]]])

    def test_hand_values(self) -> None:
        e = math.e
        expected = {
            "logsumexp": [5.0, math.log((e**1 + e**3) / 2)],
            "max": [5.0, 3.0],
            "mean": [5.0, 2.0],
            # weights softmax(10 * (0.1, 0.3) / 1) = (1, e^2) / (1 + e^2)
            "responsibility": [5.0, 10 * (0.1 + 0.3 * e**2) / (1 + e**2)],
        }
        for aggregation, values in expected.items():
            logits = PF.class_logits(
                self.SIMS,
                logit_scale=10.0,
                aggregation=aggregation,
                tau=1.0,
                assignment_logit_scale=10.0,
            )
            torch.testing.assert_close(logits, torch.tensor([values]), msg=aggregation)

    def test_responsibility_weights_are_constants(self) -> None:
        similarities = self.SIMS.clone().requires_grad_()
        logits = PF.class_logits(
            similarities,
            logit_scale=10.0,
            aggregation="responsibility",
            tau=1.0,
            assignment_logit_scale=10.0,
        )
        logits[0, 1].backward()
        weights = torch.softmax(torch.tensor([1.0, 3.0]), dim=0)
        torch.testing.assert_close(similarities.grad[0, 1], 10.0 * weights)

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"aggregation": "sum"}, ValueError, "aggregation"),
            ({"logit_scale": 0.0}, ValueError, "logit_scale"),
            ({"logit_scale": -100.0}, ValueError, "logit_scale"),
            ({"aggregation": "responsibility", "tau": 0.0}, ValueError, "tau"),
        ],
    )
    def test_bad_arguments(self, kwargs, error, match) -> None:
        with pytest.raises(error, match=match):
            PF.class_logits(self.SIMS, **kwargs)

    @pytest.mark.parametrize("similarities", [torch.randn(2, 3), torch.randn(2, 3, 0)])
    def test_bad_inputs(self, similarities) -> None:
        with pytest.raises(ValueError, match="similarities"):
            PF.class_logits(similarities)

    @pytest.mark.parametrize("aggregation", AGGREGATIONS)
    def test_single_subprompt_is_scaled_cosine(self, aggregation) -> None:
        similarities = torch.rand(4, 3, 1) * 2 - 1
        logits = PF.class_logits(similarities, logit_scale=100.0, aggregation=aggregation)
        assert logits.shape == (4, 3)
        torch.testing.assert_close(logits, 100.0 * similarities[..., 0])

    @pytest.mark.parametrize("aggregation", ["logsumexp", "max", "mean"])
    def test_gradcheck(self, aggregation) -> None:
        similarities = torch.rand(3, 2, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda s: PF.class_logits(s, logit_scale=7.0, aggregation=aggregation),
            (similarities,),
        )


class TestClassMeanResponsibilities:
    def test_hand_values_and_gradient(self) -> None:
        gamma = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], requires_grad=True)
        classes, means, counts = PF.class_mean_responsibilities(gamma, torch.tensor([3, 3, 1]))
        assert classes.tolist() == [1, 3] and counts.tolist() == [1.0, 2.0]
        torch.testing.assert_close(means, torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
        means[1, 0].backward()
        torch.testing.assert_close(gamma.grad[:, 0], torch.tensor([0.5, 0.5, 0.0]))

    def test_no_labels_is_one_class(self) -> None:
        gamma = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        classes, means, counts = PF.class_mean_responsibilities(gamma)
        assert classes.tolist() == [0] and counts.tolist() == [2.0]
        torch.testing.assert_close(means, torch.tensor([[0.5, 0.5]]))


@given(
    hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 6)),
        elements=st.floats(-1, 1, allow_subnormal=False),
    ),
    st.floats(0.5, 100.0),
)
def test_property_logsumexp_lies_between_mean_and_max(similarities, logit_scale) -> None:
    # log((1/K) sum exp) is a soft maximum: at least the mean (Jensen), at most the max.
    sims = torch.from_numpy(similarities)
    soft = PF.class_logits(sims, logit_scale=logit_scale)
    mean = PF.class_logits(sims, logit_scale=logit_scale, aggregation="mean")
    hard = PF.class_logits(sims, logit_scale=logit_scale, aggregation="max")
    assert (mean <= soft + 1e-9).all() and (soft <= hard + 1e-9).all()


@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(2, 5)),
        # Exact zeros, or magnitudes whose squares stay normal floats (1e-21 would not).
        elements=st.one_of(
            st.just(0.0), st.floats(1 / 64, 5.0, width=32), st.floats(-5.0, -1 / 64, width=32)
        ),
    )
)
def test_property_pairwise_cosine_is_symmetric_and_bounded(features) -> None:
    cosine = PF.pairwise_cosine(torch.from_numpy(features))
    torch.testing.assert_close(cosine, cosine.transpose(1, 2))
    assert (cosine.abs() <= 1 + 1e-5).all()
    diagonal = cosine.diagonal(dim1=1, dim2=2)
    nonzero = torch.from_numpy(features).norm(dim=-1) > 0
    torch.testing.assert_close(diagonal[nonzero], torch.ones_like(diagonal[nonzero]))
    assert (diagonal[~nonzero] == 0).all()


@pytest.mark.compile
def test_torch_compile_matches_eager() -> None:
    """DiversityLoss and the soft/sinkhorn responsibilities compile to the same numbers.

    ``aot_eager`` traces forward and backward graphs exactly as inductor would but skips code
    generation: measured on 2 cores, ~3 s here against ~25 s for a cold inductor compile.
    """
    dynamo = pytest.importorskip("torch._dynamo")
    if not dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this platform")
    features = torch.randn(3, 4, 8, requires_grad=True)
    images = torch.randn(6, 8, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])

    loss = DiversityLoss(margin=0.1)
    compiled_loss = torch.compile(loss, backend="aot_eager")
    (eager_grad,) = torch.autograd.grad(loss(features), features)
    compiled_value = compiled_loss(features)
    (compiled_grad,) = torch.autograd.grad(compiled_value, features)
    torch.testing.assert_close(compiled_value, loss(features))
    torch.testing.assert_close(compiled_grad, eager_grad)

    compiled_responsibilities = torch.compile(PF.responsibilities, backend="aot_eager")
    for mode in ("soft", "sinkhorn"):
        expected = PF.responsibilities(
            images, features, labels, tau=0.5, logit_scale=10.0, mode=mode
        )
        actual = compiled_responsibilities(
            images, features, labels, tau=0.5, logit_scale=10.0, mode=mode
        )
        torch.testing.assert_close(actual, expected)
    weights = torch.linspace(-1, 1, 4)
    soft = compiled_responsibilities(images, features, labels, tau=0.5, logit_scale=10.0)
    compiled_grads = torch.autograd.grad((soft * weights).sum(), (images, features))
    eager = PF.responsibilities(images, features, labels, tau=0.5, logit_scale=10.0)
    eager_grads = torch.autograd.grad((eager * weights).sum(), (images, features))
    for actual, expected in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(actual, expected)
