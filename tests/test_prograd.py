"""ProGrad's projection and its two-backward helper, against the original's update rule."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from promptmix import prograd_backward, project_conflicting_gradients

pytestmark = pytest.mark.usefixtures("single_thread")


def original(a_grad: torch.Tensor, b_grad: torch.Tensor, lambda_: float) -> torch.Tensor:
    """The update of prograd_backward_and_update (Dassl.ProGrad.pytorch trainer.py)."""
    b_grad_norm = b_grad / torch.linalg.norm(b_grad)
    a_grad_norm = a_grad / torch.linalg.norm(a_grad)
    if torch.dot(a_grad_norm.flatten(), b_grad_norm.flatten()) < 0:
        return a_grad - lambda_ * torch.dot(a_grad.flatten(), b_grad_norm.flatten()) * b_grad_norm
    return a_grad


class TestProjection:
    def test_hand_computed(self) -> None:
        g, r = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 2.0])
        (projected,), cosines = project_conflicting_gradients([g], [r])
        torch.testing.assert_close(projected, torch.tensor([1.0, 0.0]))
        torch.testing.assert_close(cosines, torch.tensor([-(0.5**0.5)]))
        (half,), _ = project_conflicting_gradients([g], [r], strength=0.5)
        torch.testing.assert_close(half, torch.tensor([1.0, -0.5]))
        (agreeing,), _ = project_conflicting_gradients([g], [-r])
        torch.testing.assert_close(agreeing, g)

    @pytest.mark.parametrize("strength", [0.5, 1.0])
    def test_matches_the_original_per_parameter(self, strength) -> None:
        grads = [torch.randn(4, 3), torch.randn(5), torch.randn(2, 2)]
        refs = [-grads[0] + 0.1 * torch.randn(4, 3), grads[1], torch.randn(2, 2)]
        projected, cosines = project_conflicting_gradients(grads, refs, strength=strength)
        assert cosines.shape == (3,) and cosines[0] < 0 and cosines[1] > 0.99
        for ours, g, r in zip(projected, grads, refs, strict=True):
            torch.testing.assert_close(ours, original(g, r, strength))

    def test_global_projection_is_over_the_concatenation(self) -> None:
        grads, refs = [torch.randn(3), torch.randn(2, 2)], [torch.randn(3), torch.randn(2, 2)]
        flat = original(
            torch.cat([g.flatten() for g in grads]), -torch.cat([r.flatten() for r in refs]), 1.0
        )
        projected, cosines = project_conflicting_gradients(
            grads, [-r for r in refs], per_parameter=False
        )
        assert cosines.shape == (1,)
        torch.testing.assert_close(torch.cat([p.flatten() for p in projected]), flat)

    def test_result_is_orthogonal_to_a_conflicting_reference(self) -> None:
        g, r = torch.randn(10), torch.randn(10)
        r = r if torch.dot(g, r) < 0 else -r
        (projected,), _ = project_conflicting_gradients([g], [r])
        assert abs(torch.dot(projected, r).item()) < 1e-5

    def test_none_and_zero_gradients(self) -> None:
        g = torch.randn(3)
        projected, cosines = project_conflicting_gradients([None, g, g], [g, None, torch.zeros(3)])
        assert projected[0] is None and projected[1] is g
        torch.testing.assert_close(projected[2], g)
        torch.testing.assert_close(cosines, torch.zeros(1))

    @pytest.mark.parametrize(
        ("args", "kwargs", "error", "match"),
        [
            (([torch.ones(2)], []), {}, ValueError, "same length"),
            (([torch.ones(2)], [torch.ones(3)]), {}, ValueError, "shape"),
            (([torch.ones(2)], [torch.ones(2)]), {"strength": -1.0}, ValueError, "strength"),
            (([[1.0]], [torch.ones(1)]), {}, TypeError, r"gradients\[0\]"),
            (
                ([torch.tensor([3, -1])], [torch.tensor([0, 2])]),
                {},
                TypeError,
                r"gradients\[0\] must be a floating-point tensor or None but is torch.int64",
            ),
            (
                ([torch.ones(2)], [torch.tensor([0, 2])]),
                {},
                TypeError,
                r"reference_gradients\[0\] must be a floating-point",
            ),
        ],
    )
    def test_bad_arguments(self, args, kwargs, error, match) -> None:
        with pytest.raises(error, match=match):
            project_conflicting_gradients(*args, **kwargs)

    @pytest.mark.parametrize("per_parameter", [True, False])
    @pytest.mark.parametrize("where", ["gradient", "reference"])
    def test_nan_gives_nan_not_an_unchanged_gradient(self, per_parameter, where) -> None:
        g, r = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 2.0])
        bad = torch.tensor([float("nan"), 1.0])
        gradients, references = ([bad], [r]) if where == "gradient" else ([g], [bad])
        (projected,), cosines = project_conflicting_gradients(
            gradients, references, per_parameter=per_parameter
        )
        assert torch.isnan(projected).any() and torch.isnan(cosines).all()

    def test_gradcheck(self) -> None:
        g = torch.randn(6, dtype=torch.float64, requires_grad=True)
        r = -g.detach() + 0.3 * torch.randn(6, dtype=torch.float64)
        assert torch.autograd.gradcheck(
            lambda x: project_conflicting_gradients([x], [r])[0][0], (g,)
        )

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_precision_finite(self, dtype) -> None:
        # fp16 gradients of scaled losses are large: squared norms overflow float16.
        g, r = (300 * torch.randn(64)).to(dtype), (-300 * torch.randn(64)).to(dtype)
        (projected,), cosines = project_conflicting_gradients([g], [r])
        assert projected.dtype == dtype and torch.isfinite(projected).all()
        assert torch.isfinite(cosines).all()


class TestProgradBackward:
    def test_matches_the_original_two_backward_update(self) -> None:
        torch.manual_seed(1)
        a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
        frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
        x = torch.randn(5, 4)
        out = (x @ a + b + frozen).tanh()
        ce, kd = out.pow(2).mean(), -(out[:, 0] * 3).mean()
        (ga, gb) = torch.autograd.grad(ce, (a, b), retain_graph=True)
        (ra, rb) = torch.autograd.grad(kd, (a, b), retain_graph=True)
        cosines = prograd_backward(ce, kd, [a, b, frozen])
        assert cosines.shape == (2,)
        torch.testing.assert_close(a.grad, original(ga, ra, 1.0))
        torch.testing.assert_close(b.grad, original(gb, rb, 1.0))
        assert frozen.grad is None

    def test_accumulates_like_backward(self) -> None:
        weight = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        weight.grad = torch.tensor([10.0, 10.0])
        loss = (weight * torch.tensor([1.0, -1.0])).sum()
        reference = (weight * torch.tensor([0.0, 2.0])).sum()
        prograd_backward(loss, reference, [weight])
        torch.testing.assert_close(weight.grad, torch.tensor([11.0, 10.0]))

    def test_unused_parameter_is_left_alone(self) -> None:
        used, unused = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
        prograd_backward(used.sum(), (used * used).sum(), [used, unused])
        assert unused.grad is None and used.grad is not None

    def test_a_bare_parameter_is_refused_not_iterated(self) -> None:
        weight = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        loss, reference = (weight * 2).sum(), (weight * 3).sum()
        with pytest.raises(TypeError, match=r"not a single tensor .* pass \[parameter\]"):
            prograd_backward(loss, reference, weight)
        assert weight.grad is None
        with pytest.raises(TypeError, match=r"parameters\[0\] must be a leaf tensor"):
            prograd_backward(loss, reference, [weight * 1])
        with pytest.raises(ValueError, match="loss must be a scalar"):
            prograd_backward(weight * 2, reference, [weight])

    def test_no_trainable_parameters(self) -> None:
        frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
        with pytest.raises(ValueError, match="parameters"):
            prograd_backward(torch.ones(()), torch.ones(()), [frozen])


@given(
    hnp.arrays("float64", st.integers(2, 8), elements=st.floats(-10, 10)),
    st.integers(0, 2**16),
    st.floats(0.0, 1.0),
)
def test_property_never_increases_the_conflict(g, seed, strength) -> None:
    """After projection the component along a conflicting reference shrinks by (1 - lambda)."""
    gradient = torch.from_numpy(g)
    reference = torch.randn(
        gradient.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    (projected,), _ = project_conflicting_gradients([gradient], [reference], strength=strength)
    before, after = torch.dot(gradient, reference), torch.dot(projected, reference)
    if before < 0:
        torch.testing.assert_close(after, (1 - strength) * before)
    else:
        torch.testing.assert_close(projected, gradient)
