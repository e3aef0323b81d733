"""InterClassDispersion / ImagePrototypeLoss (DAPT): the kornia grid plus properties."""

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
from promptmix import ImagePrototypeLoss, InterClassDispersion, MixtureOfPromptsLoss

pytestmark = pytest.mark.usefixtures("single_thread")

moderate = st.one_of(st.floats(1 / 64, 10.0, width=32), st.floats(-10.0, -1 / 64, width=32))


def dapt_text(text_features: torch.Tensor, t: float) -> torch.Tensor:
    """DAPT's text dispersion (trainers/dapt.py) on normalised features."""
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return torch.pdist(text_features.to(torch.float), p=2).pow(2.0).mul(-t).exp().mean()


class TestInterClassDispersion:
    def test_smoke(self) -> None:
        prompts = torch.randn(5, 3, 8, requires_grad=True)
        loss = InterClassDispersion()(prompts)
        assert loss.shape == () and 0 < loss.item() < 1
        loss.backward()
        assert prompts.grad.abs().sum() > 0

    @pytest.mark.parametrize(
        ("kwargs", "error"), [({"bandwidth": 0.0}, ValueError), ({"bandwidth": "2"}, TypeError)]
    )
    def test_bad_constructor_arguments(self, kwargs, error) -> None:
        with pytest.raises(error, match="bandwidth"):
            InterClassDispersion(**kwargs)

    @pytest.mark.parametrize(
        "features", [torch.randn(8), torch.randn(2, 3, 4, 8), torch.randn(2, 0, 8)]
    )
    def test_bad_inputs(self, features) -> None:
        with pytest.raises(ValueError, match="subprompt_features"):
            InterClassDispersion()(features)

    def test_hand_computed_values(self) -> None:
        # Three classes at 0, 90 and 180 degrees: squared distances 2, 4 and 2.
        features = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-2.0, 0.0]])
        expected = (2 * math.exp(-2 * 2.0) + math.exp(-4 * 2.0)) / 3
        torch.testing.assert_close(InterClassDispersion()(features), torch.tensor(expected))

    def test_matches_dapt(self) -> None:
        text = torch.randn(7, 16)
        torch.testing.assert_close(InterClassDispersion()(text), dapt_text(text, 2.0))

    def test_own_subprompt_pairs_are_left_out(self) -> None:
        # Class 0's two sub-prompts coincide (cost 1 if counted); every other pair is orthogonal.
        features = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]] * 2])
        torch.testing.assert_close(
            InterClassDispersion(bandwidth=1.0)(features), torch.tensor(math.exp(-2))
        )

    def test_single_class_is_a_connected_zero(self) -> None:
        features = torch.randn(1, 3, 8, requires_grad=True)
        loss = InterClassDispersion()(features)
        assert loss.item() == 0.0 and loss.requires_grad

    def test_gradcheck(self) -> None:
        features = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: PF.dispersion_loss(x, bandwidth=1.5), (features,))

    def test_module_equals_functional(self) -> None:
        features = torch.randn(4, 3, 8)
        torch.testing.assert_close(
            InterClassDispersion(bandwidth=0.5)(features),
            PF.dispersion_loss(features, bandwidth=0.5),
        )

    def test_gradient_spreads_the_classes(self) -> None:
        features = torch.tensor([[1.0, 0.1, 0.0], [1.0, 0.0, 0.1]], requires_grad=True)
        before = F.cosine_similarity(features[0], features[1], dim=0).item()
        InterClassDispersion()(features).backward()
        with torch.no_grad():
            moved = features - 0.1 * features.grad
        assert F.cosine_similarity(moved[0], moved[1], dim=0).item() < before

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_precision_finite(self, dtype) -> None:
        reference = torch.randn(5, 3, 8)
        reference[0, 0] = 0
        features = reference.to(dtype).requires_grad_()
        loss = InterClassDispersion()(features)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(features.grad).all()
        torch.testing.assert_close(
            loss.float(), InterClassDispersion()(reference), atol=2e-2, rtol=0
        )

    def test_in_the_mixture_loss(self) -> None:
        images, labels = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
        prompts = torch.randn(3, 2, 8)
        loss_fn = MixtureOfPromptsLoss(regularizers={"dispersion": (InterClassDispersion(), 0.1)})
        out = loss_fn(images, prompts, labels)
        torch.testing.assert_close(out["dispersion"], PF.dispersion_loss(prompts))


class TestImagePrototypeLoss:
    def test_prototypes_and_value_match_dapt(self) -> None:
        frozen, labels = torch.randn(9, 8), torch.tensor([0, 1, 2] * 3)
        prototypes = PF.class_prototypes(frozen, labels, num_classes=4)
        normed = F.normalize(frozen, dim=-1)
        for c in range(3):
            torch.testing.assert_close(prototypes[c], normed[labels == c].mean(0))
        assert prototypes[3].abs().sum() == 0  # a class without images
        images = torch.randn(5, 8, requires_grad=True)
        batch_labels = torch.tensor([0, 1, 2, 3, 0])
        loss = ImagePrototypeLoss(prototypes=prototypes)(images, batch_labels)
        expected = F.mse_loss(F.normalize(images, dim=-1), prototypes[batch_labels])
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(ImagePrototypeLoss()(images, batch_labels, prototypes), expected)

    def test_bad_inputs(self) -> None:
        with pytest.raises(ValueError, match="prototypes"):
            ImagePrototypeLoss()(torch.randn(2, 8), torch.tensor([0, 1]), torch.randn(2, 4))
        with pytest.raises(ValueError, match="labels"):
            ImagePrototypeLoss()(torch.randn(2, 8), torch.tensor([0, 5]), torch.randn(2, 8))
        with pytest.raises(TypeError, match="prototypes="):
            ImagePrototypeLoss()(torch.randn(2, 8), torch.tensor([0, 1]))
        assert ImagePrototypeLoss().inputs == ("image_features", "labels", "prototypes")

    def test_gradcheck_and_half_precision(self) -> None:
        images = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        prototypes, labels = torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
        assert torch.autograd.gradcheck(
            lambda x: PF.image_prototype_loss(x, labels, prototypes), (images,)
        )
        for dtype in (torch.float16, torch.bfloat16):
            half = images.detach().to(dtype).requires_grad_()
            loss = PF.image_prototype_loss(half, labels, prototypes.to(dtype))
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(half.grad).all()

    def test_empty_batch_is_a_connected_zero(self) -> None:
        images = torch.randn(0, 8, requires_grad=True)
        loss = PF.image_prototype_loss(images, torch.zeros(0, dtype=torch.long), torch.randn(3, 8))
        assert loss.item() == 0.0 and loss.requires_grad


# ----------------------------------------------------------------------------- properties


@given(st.integers(2, 4), st.integers(1, 3), st.integers(2, 6), st.data())
def test_property_bounded(c, k, d, data) -> None:
    features = torch.from_numpy(data.draw(hnp.arrays(np.float32, (c, k, d), elements=moderate)))
    bandwidth = data.draw(st.floats(0.25, 4.0))
    loss = PF.dispersion_loss(features, bandwidth=bandwidth).item()
    assert math.exp(-4 * bandwidth) - 1e-5 <= loss <= 1 + 1e-5


@given(hnp.arrays(np.float32, st.integers(2, 6), elements=moderate), st.floats(1 / 8, 8.0))
def test_property_anti_parallel_counts_as_far_apart(vector, scale) -> None:
    """Two classes at t and -t cost the least possible, e^{-4t}; DiversityLoss would say 1."""
    direction = torch.from_numpy(vector)
    assume(bool(direction.norm() > 1e-2))
    features = torch.stack([direction, -scale * direction])
    loss = PF.dispersion_loss(features, bandwidth=2.0)
    assert abs(loss.item() - math.exp(-8.0)) < 1e-6
    orthogonal = torch.stack([torch.eye(2)[0], torch.eye(2)[1]])
    assert loss < PF.dispersion_loss(orthogonal, bandwidth=2.0)


def test_class_prototypes_check_num_classes_and_labels() -> None:
    images = torch.randn(4, 6)
    with pytest.raises(ValueError, match="num_classes must be >= 1 but is 0"):
        PF.class_prototypes(images, torch.zeros(4, dtype=torch.long), num_classes=0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\] but ranges over \[0, 2\]"):
        PF.class_prototypes(images, torch.tensor([0, 1, 2, 0]), num_classes=2)
    with pytest.raises(TypeError, match=r"labels must be an integer torch\.Tensor but is a list"):
        PF.class_prototypes(images, [0, 1, 0, 1], num_classes=2)


def test_a_label_beyond_the_prototypes_is_nan_off_the_cpu(monkeypatch) -> None:
    from promptmix import _validation

    prototypes, images = torch.randn(2, 6), torch.randn(3, 6)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        PF.image_prototype_loss(images, torch.tensor([0, 1, 2]), prototypes)
    monkeypatch.setattr(_validation, "HOST_CHECKS", False)  # the path a GPU takes
    assert torch.isnan(PF.image_prototype_loss(images, torch.tensor([0, 1, 2]), prototypes))
    assert torch.isfinite(PF.image_prototype_loss(images, torch.tensor([0, 1, 1]), prototypes))


def test_dispersion_weighs_pairs_instead_of_masking_them() -> None:
    """Pairs of one class's own sub-prompts are left out; the mean is over the others."""
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[-1.0, 0.0], [-1.0, 0.0]]])
    # Every between-class pair is anti-parallel: exp(-2 * 4) each; own pairs (cost 1) left out.
    torch.testing.assert_close(PF.dispersion_loss(features), torch.tensor(math.exp(-8.0)))
