"""DiversityLoss / functional.diversity_loss: the kornia grid plus hypothesis properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import promptmix.functional as PF
from promptmix import DiversityLoss

pytestmark = pytest.mark.usefixtures("single_thread")

SQRT_HALF = math.sqrt(0.5)

# Entries are exact zeros or magnitudes in [1/64, 10]: squares stay normal floats even in
# float16 (a float16-subnormal vector's direction, and so its gradient, is not representable),
# and no norm overflows.
moderate = st.one_of(
    st.just(0.0), st.floats(1 / 64, 10.0, width=32), st.floats(-10.0, -1 / 64, width=32)
)


@st.composite
def subprompt_arrays(draw, min_k: int = 1, max_k: int = 5) -> np.ndarray:
    c = draw(st.integers(1, 3))
    k = draw(st.integers(min_k, max_k))
    d = draw(st.integers(2, 6))
    return draw(hnp.arrays(np.float32, (c, k, d), elements=moderate))


def nonzero(array: np.ndarray) -> torch.Tensor:
    """The tensor of ``array``, rejecting examples with a near-zero vector (cosine undefined)."""
    tensor = torch.from_numpy(array)
    assume(bool((tensor.norm(dim=-1) > 1e-2).all()))
    return tensor


class TestDiversityLoss:
    def test_smoke(self) -> None:
        features = torch.randn(4, 3, 8, requires_grad=True)
        loss = DiversityLoss()(features)
        assert loss.shape == ()
        assert 0 < loss.item() < 1
        loss.backward()
        assert features.grad is not None and features.grad.abs().sum() > 0

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"power": 0.5}, ValueError, "power"),
            ({"power": 0}, ValueError, "power"),
            ({"power": "2"}, TypeError, "power"),
            ({"margin": 1.0}, ValueError, "margin"),
            ({"margin": -0.1}, ValueError, "margin"),
            ({"reduction": "avg"}, ValueError, "reduction"),
        ],
    )
    def test_bad_constructor_arguments(self, kwargs, error, match) -> None:
        with pytest.raises(error, match=match):
            DiversityLoss(**kwargs)

    @pytest.mark.parametrize(
        ("features", "error"),
        [
            (torch.randn(8), ValueError),  # rank 1
            (torch.randn(2, 3, 4, 8), ValueError),  # rank 4
            (torch.ones(2, 3, 4, dtype=torch.long), TypeError),  # integer dtype
            (torch.randn(2, 0, 4), ValueError),  # K < 1
        ],
    )
    def test_bad_inputs(self, features, error) -> None:
        with pytest.raises(error, match="subprompt_features"):
            DiversityLoss()(features)

    def test_not_a_tensor(self) -> None:
        with pytest.raises(TypeError, match="subprompt_features"):
            DiversityLoss()([[[1.0, 0.0]]])

    @pytest.mark.parametrize(("reduction", "shape"), [("mean", ()), ("sum", ()), ("none", (5,))])
    def test_cardinality(self, reduction, shape) -> None:
        assert DiversityLoss(reduction=reduction)(torch.randn(5, 3, 8)).shape == shape

    def test_hand_computed_values(self) -> None:
        # Class 0: t0=[1,0], t1=[1,1]/sqrt2, t2=[0,1]: cos = (0.7071, 0, 0.7071), cos^2 mean = 1/3.
        # Class 1: three copies of one direction (at different norms): cos^2 = 1.
        features = torch.tensor(
            [
                [[1.0, 0.0], [3.0, 3.0], [0.0, 2.0]],
                [[1.0, 2.0], [2.0, 4.0], [0.5, 1.0]],
            ]
        )
        per_class = DiversityLoss(reduction="none")(features)
        torch.testing.assert_close(per_class, torch.tensor([1 / 3, 1.0]))
        torch.testing.assert_close(DiversityLoss()(features), torch.tensor(2 / 3))
        torch.testing.assert_close(DiversityLoss(reduction="sum")(features), torch.tensor(4 / 3))
        # margin 0.5, power 1: relu(|cos| - 0.5) = (0.2071, 0, 0.2071) for class 0.
        loss = DiversityLoss(power=1.0, margin=0.5, reduction="none")(features)
        torch.testing.assert_close(loss, torch.tensor([2 * (SQRT_HALF - 0.5) / 3, 0.5]))

    def test_anti_parallel_counts_as_duplicate(self) -> None:
        # The penalty is on |cos| (cos^2 by default): t and -t are the same direction to CLIP.
        features = torch.tensor([[[1.0, 0.0], [-2.0, 0.0]]])
        torch.testing.assert_close(DiversityLoss()(features), torch.tensor(1.0))

    def test_single_subprompt_is_a_connected_zero(self) -> None:
        features = torch.randn(3, 1, 8, requires_grad=True)
        loss = DiversityLoss()(features)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.equal(features.grad, torch.zeros_like(features))
        assert DiversityLoss(reduction="none")(features).shape == (3,)

    def test_no_classes_is_a_connected_zero(self) -> None:
        features = torch.randn(0, 3, 8, requires_grad=True)
        loss = DiversityLoss()(features)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert features.grad.shape == (0, 3, 8)

    @pytest.mark.parametrize(
        "kwargs", [{}, {"power": 1.5, "margin": 0.05}, {"power": 3.0, "reduction": "sum"}]
    )
    def test_gradcheck(self, kwargs) -> None:
        features = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: PF.diversity_loss(x, **kwargs), (features,))

    @pytest.mark.parametrize(
        "kwargs",
        [{}, {"power": 1.0}, {"margin": 0.2}, {"reduction": "none"}, {"reduction": "sum"}],
    )
    def test_module_equals_functional(self, kwargs) -> None:
        features = torch.randn(3, 4, 8)
        torch.testing.assert_close(
            DiversityLoss(**kwargs)(features), PF.diversity_loss(features, **kwargs)
        )

    def test_gradient_separates_duplicates(self) -> None:
        # One gradient-descent step on the loss must lower the cosine of two near-duplicates.
        features = torch.tensor([[[1.0, 0.1, 0.0], [1.0, 0.0, 0.1]]], requires_grad=True)
        before = PF.pairwise_cosine(features)[0, 0, 1].item()
        DiversityLoss()(features).backward()
        with torch.no_grad():
            after = PF.pairwise_cosine(features - 0.1 * features.grad)[0, 0, 1].item()
        assert after < before

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_precision_finite(self, dtype) -> None:
        reference = torch.randn(3, 4, 8)
        features = reference.to(dtype).requires_grad_()
        loss = DiversityLoss()(features)
        loss.backward()
        assert loss.dtype == dtype
        assert torch.isfinite(loss) and torch.isfinite(features.grad).all()
        torch.testing.assert_close(loss.float(), DiversityLoss()(reference), atol=2e-2, rtol=0)


# ----------------------------------------------------------------------------- properties


@given(subprompt_arrays())
def test_property_bounds(array) -> None:
    features = torch.from_numpy(array)
    loss = PF.diversity_loss(features, reduction="none")
    assert torch.isfinite(loss).all()
    assert (loss >= 0).all() and (loss <= 1 + 1e-5).all()


@given(subprompt_arrays(), st.data())
def test_property_invariant_to_positive_rescaling(array, data) -> None:
    features = nonzero(array)
    scales = data.draw(
        hnp.arrays(np.float32, (*features.shape[:2], 1), elements=st.floats(1 / 64, 64.0, width=32))
    )
    rescaled = features * torch.from_numpy(scales)
    torch.testing.assert_close(
        PF.diversity_loss(rescaled, reduction="none"),
        PF.diversity_loss(features, reduction="none"),
        atol=1e-5,
        rtol=1e-4,
    )


@given(subprompt_arrays(min_k=2), st.randoms(use_true_random=False))
def test_property_invariant_to_permuting_subprompts(array, rng) -> None:
    features = nonzero(array)
    order = list(range(features.shape[1]))
    rng.shuffle(order)
    torch.testing.assert_close(
        PF.diversity_loss(features[:, order], reduction="none"),
        PF.diversity_loss(features, reduction="none"),
        atol=1e-6,
        rtol=1e-5,
    )


@given(
    st.integers(2, 6).flatmap(
        lambda d: st.tuples(
            st.integers(1, d),
            hnp.arrays(np.float64, (d, d), elements=st.floats(-1, 1, allow_subnormal=False)),
            hnp.arrays(np.float64, (d,), elements=st.floats(0.1, 10.0)),
        )
    )
)
def test_property_orthogonal_gives_zero(args) -> None:
    k, matrix, scales = args
    # QR gives an orthonormal basis whatever the draw (it is rank-deficient only in R).
    basis, _ = torch.linalg.qr(torch.from_numpy(matrix) + 3 * torch.eye(len(matrix)))
    features = (basis.T * torch.from_numpy(scales)[:, None])[:k].unsqueeze(0)
    assert PF.diversity_loss(features).item() == pytest.approx(0.0, abs=1e-12)


@given(
    hnp.arrays(np.float32, (5,), elements=moderate),
    hnp.arrays(np.float32, (4,), elements=st.floats(1 / 64, 64.0, width=32)),
    st.booleans(),
)
def test_property_identical_gives_one(vector, scales, flip) -> None:
    direction = nonzero(vector)
    factors = torch.from_numpy(scales)
    if flip:
        factors[1] = -factors[1]
    features = (factors[:, None] * direction).unsqueeze(0)
    assert PF.diversity_loss(features).item() == pytest.approx(1.0, abs=1e-5)


@given(subprompt_arrays(min_k=2), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_property_finite_gradients_with_zero_vectors_and_half_precision(array, dtype) -> None:
    features = torch.from_numpy(array)
    features[0, 0] = 0.0  # a zero sub-prompt: cosine undefined, loss and gradient must stay finite
    features = features.to(dtype).requires_grad_()
    loss = PF.diversity_loss(features)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(features.grad).all()


def test_class_mask_selects_classes_and_is_validated() -> None:
    features = torch.stack([torch.ones(3, 4), torch.eye(3, 4)])  # collapsed, then diverse
    loss = DiversityLoss()
    assert loss(features, torch.tensor([True, False])).item() == pytest.approx(1.0)
    assert loss(features, torch.tensor([False, True])).item() == pytest.approx(0.0)
    assert loss(features, torch.tensor([True, True])).item() == pytest.approx(0.5)
    assert DiversityLoss(reduction="sum")(features, torch.tensor([True, True])).item() == 1.0
    empty = loss(features, torch.tensor([False, False]))
    assert empty.item() == 0.0
    for bad in (torch.tensor([True]), torch.tensor([1, 0]), torch.tensor([[True, False]])):
        with pytest.raises(ValueError, match="class_mask must be a bool tensor of shape"):
            loss(features, bad)
