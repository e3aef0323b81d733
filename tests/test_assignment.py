"""SoftEMAssigner / functional.responsibilities / functional.sinkhorn."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import promptmix.functional as PF
from promptmix import SoftEMAssigner

pytestmark = pytest.mark.usefixtures("single_thread")

MODES = ("soft", "hard", "sinkhorn")
# Exact zeros or magnitudes in [1/64, 4]: squares stay normal even in float16, where the
# direction of a subnormal vector (and so its gradient) is not representable.
moderate = st.one_of(
    st.just(0.0), st.floats(1 / 64, 4.0, width=32), st.floats(-4.0, -1 / 64, width=32)
)


@st.composite
def problems(draw, max_batch: int = 8, max_classes: int = 3, max_k: int = 5):
    """Raw image features ``(B, D)``, sub-prompt table ``(C, K, D)`` and labels ``(B,)``."""
    batch = draw(st.integers(1, max_batch))
    classes = draw(st.integers(1, max_classes))
    k = draw(st.integers(1, max_k))
    dim = draw(st.integers(2, 6))
    images = torch.from_numpy(draw(hnp.arrays(np.float32, (batch, dim), elements=moderate)))
    prompts = torch.from_numpy(draw(hnp.arrays(np.float32, (classes, k, dim), elements=moderate)))
    labels = torch.from_numpy(
        draw(hnp.arrays(np.int64, (batch,), elements=st.integers(0, classes - 1)))
    )
    return images, prompts, labels


def assert_simplex_rows(rows: torch.Tensor, atol: float = 1e-5) -> None:
    assert torch.isfinite(rows).all()
    assert (rows >= 0).all()
    sums = rows.sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=atol, rtol=0)


def make_problem(batch: int = 6, classes: int = 3, k: int = 4, dim: int = 8):
    images = torch.randn(batch, dim)
    prompts = torch.randn(classes, k, dim)
    labels = torch.arange(batch) % classes
    return images, prompts, labels


class TestSoftEMAssigner:
    def test_smoke(self) -> None:
        images, prompts, labels = make_problem()
        images.requires_grad_()
        prompts.requires_grad_()
        gamma = SoftEMAssigner()(images, prompts, labels, tau=0.5)
        assert_simplex_rows(gamma.detach())
        (gamma * torch.arange(4.0)).sum().backward()
        assert images.grad.abs().sum() > 0 and prompts.grad.abs().sum() > 0

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"mode": "em"}, ValueError, "mode"),
            ({"mode": "Soft"}, ValueError, "mode"),
            ({"logit_scale": 0.0}, ValueError, "logit_scale"),
            ({"logit_scale": -1.0}, ValueError, "logit_scale"),
            ({"logit_scale": float("inf")}, ValueError, "logit_scale"),
            ({"sinkhorn_iterations": 0}, ValueError, "sinkhorn_iterations"),
            ({"sinkhorn_iterations": 1.5}, TypeError, "sinkhorn_iterations"),
        ],
    )
    def test_bad_constructor_arguments(self, kwargs, error, match) -> None:
        with pytest.raises(error, match=match):
            SoftEMAssigner(**kwargs)

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize(
        ("change", "error", "match"),
        [
            ({"images": torch.randn(6)}, ValueError, "image_features"),
            ({"images": torch.randn(6, 8, 1)}, ValueError, "image_features"),
            ({"images": torch.ones(6, 8, dtype=torch.long)}, TypeError, "image_features"),
            ({"prompts": torch.randn(8)}, ValueError, "subprompt_features"),
            ({"prompts": torch.randn(3, 4, 7)}, ValueError, "share the last dimension"),
            ({"prompts": torch.randn(3, 0, 8)}, ValueError, "subprompt_features"),  # K < 1
            ({"labels": torch.tensor([0, 1, 2, 3, 0, 1])}, ValueError, "labels"),
            ({"labels": torch.tensor([0, 1, 2, -1, 0, 1])}, ValueError, "labels"),
            ({"labels": torch.zeros(6)}, TypeError, "labels"),
            ({"labels": torch.zeros(5, dtype=torch.long)}, ValueError, "labels"),
            ({"labels": None}, ValueError, "gathered"),  # (C, K, D) with C != B needs labels
            ({"tau": 0.0}, ValueError, "tau"),
            ({"tau": -0.3}, ValueError, "tau"),
            ({"tau": "1"}, TypeError, "tau"),
        ],
    )
    def test_bad_inputs(self, mode, change, error, match) -> None:
        images, prompts, labels = make_problem()
        args = {"images": images, "prompts": prompts, "labels": labels, "tau": 1.0} | change
        with pytest.raises(error, match=match):
            SoftEMAssigner(mode=mode)(
                args["images"], args["prompts"], args["labels"], tau=args["tau"]
            )

    @pytest.mark.parametrize("mode", MODES)
    def test_cardinality_and_gathered_layout(self, mode) -> None:
        images, prompts, labels = make_problem(batch=6, classes=3, k=4)
        assigner = SoftEMAssigner(mode=mode)
        indexed = assigner(images, prompts, labels, tau=0.7)
        assert indexed.shape == (6, 4) and indexed.dtype == images.dtype
        # A (B, K, D) table already gathered per image gives the same rows (sinkhorn: one group).
        gathered = assigner(images, prompts[labels], None, tau=0.7)
        assert gathered.shape == (6, 4)
        if mode != "sinkhorn":
            torch.testing.assert_close(gathered, indexed)

    def test_hand_computed_values(self) -> None:
        images = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
        prompts = torch.eye(2).unsqueeze(0)  # one class, sub-prompts e0 and e1
        labels = torch.tensor([0, 0])
        e = math.e
        soft = SoftEMAssigner(logit_scale=1.0)(images, prompts, labels, tau=1.0)
        torch.testing.assert_close(
            soft, torch.tensor([[e / (1 + e), 1 / (1 + e)], [1 / (1 + e), e / (1 + e)]])
        )
        sharper = SoftEMAssigner(logit_scale=1.0)(images, prompts, labels, tau=0.5)
        p = e**2 / (1 + e**2)
        torch.testing.assert_close(sharper, torch.tensor([[p, 1 - p], [1 - p, p]]))
        # scale and tau enter only as scale / tau.
        torch.testing.assert_close(
            SoftEMAssigner(logit_scale=2.0)(images, prompts, labels, tau=1.0), sharper
        )
        hard = SoftEMAssigner(mode="hard")(images, prompts, labels)
        torch.testing.assert_close(hard, torch.eye(2))

    def test_sinkhorn_hand_example(self) -> None:
        # All four images prefer sub-prompt 0; balance gives each sub-prompt half the mass.
        scores = torch.tensor([[5.0, 0.0], [4.0, 0.0], [3.0, 0.0], [2.0, 0.0]])
        balanced = PF.sinkhorn(scores, sinkhorn_iterations=50)
        torch.testing.assert_close(balanced.sum(0), torch.tensor([2.0, 2.0]), atol=1e-3, rtol=0)
        assert_simplex_rows(balanced)
        # The ranking is kept: the image that prefers 0 most keeps the most of it.
        assert (balanced[:-1, 0] > balanced[1:, 0]).all()
        assert torch.softmax(scores, -1).sum(0)[0] > 3.5  # the unbalanced start

    def test_sinkhorn_balances_each_class_separately(self) -> None:
        torch.manual_seed(1)
        k = 3
        labels = torch.tensor([0] * 9 + [1] * 6 + [2] * 1)
        images = torch.randn(len(labels), 8)
        prompts = torch.randn(3, k, 8)
        prompts[:, 0] = 0.2 * prompts[:, 0] + images.mean(0)  # every image prefers sub-prompt 0
        soft = SoftEMAssigner(logit_scale=10.0)(images, prompts, labels)
        balanced = SoftEMAssigner(mode="sinkhorn", logit_scale=10.0, sinkhorn_iterations=200)(
            images, prompts, labels
        )
        assert_simplex_rows(balanced)
        for c, n_c in ((0, 9), (1, 6), (2, 1)):
            usage = balanced[labels == c].sum(0)
            torch.testing.assert_close(usage, torch.full((k,), n_c / k), atol=1e-2, rtol=0)
        unbalanced = soft[labels == 0].sum(0)
        assert (unbalanced - 3.0).abs().max() > 0.5  # the test would notice no balancing
        # A class with one image in the batch ends uniform: balance needs several images.
        torch.testing.assert_close(balanced[labels == 2], torch.full((1, k), 1 / k))

    def test_sinkhorn_groups_none_is_one_group(self) -> None:
        scores = torch.randn(6, 3)
        torch.testing.assert_close(
            PF.sinkhorn(scores), PF.sinkhorn(scores, torch.full((6,), 4, dtype=torch.long))
        )
        with pytest.raises(ValueError, match="iterations"):
            PF.sinkhorn(scores, sinkhorn_iterations=0)
        with pytest.raises(ValueError, match="groups"):
            PF.sinkhorn(scores, torch.zeros(5, dtype=torch.long))

    def test_only_soft_mode_carries_gradient(self) -> None:
        images, prompts, labels = make_problem()
        prompts.requires_grad_()
        assert SoftEMAssigner(mode="soft")(images, prompts, labels).requires_grad
        assert not SoftEMAssigner(mode="hard")(images, prompts, labels).requires_grad
        assert not SoftEMAssigner(mode="sinkhorn")(images, prompts, labels).requires_grad

    def test_gradcheck(self) -> None:
        images = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
        prompts = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
        labels = torch.tensor([0, 1, 1, 0, 1])

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return PF.responsibilities(x, t, labels, tau=0.7, logit_scale=3.0)

        assert torch.autograd.gradcheck(fn, (images, prompts))

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("gathered", [False, True])
    def test_module_equals_functional(self, mode, gathered) -> None:
        images, prompts, labels = make_problem()
        if gathered:
            prompts, labels = prompts[labels], None
        assigner = SoftEMAssigner(mode=mode, logit_scale=20.0, sinkhorn_iterations=5)
        expected = PF.responsibilities(
            images, prompts, labels, tau=0.4, logit_scale=20.0, mode=mode, sinkhorn_iterations=5
        )
        torch.testing.assert_close(assigner(images, prompts, labels, tau=0.4), expected)
        similarities = PF.own_class_similarities(images, prompts, labels)
        torch.testing.assert_close(
            assigner.from_similarities(similarities, labels, tau=0.4), expected
        )

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_precision_and_zero_vectors(self, dtype) -> None:
        images, prompts, labels = make_problem()
        images[0] = 0.0
        prompts[1, 2] = 0.0
        images = images.to(dtype).requires_grad_()
        prompts = prompts.to(dtype).requires_grad_()
        for mode in MODES:
            gamma = SoftEMAssigner(mode=mode)(images, prompts, labels, tau=0.5)
            assert gamma.dtype == dtype
            assert_simplex_rows(gamma.detach().float(), atol=1e-2)
        gamma = SoftEMAssigner()(images, prompts, labels, tau=0.5)
        # A zero image has cosine 0 to every sub-prompt: it is assigned uniformly.
        torch.testing.assert_close(gamma[0].float(), torch.full((4,), 0.25), atol=1e-2, rtol=0)
        (gamma * torch.arange(4.0).to(dtype)).sum().backward()
        assert torch.isfinite(images.grad).all() and torch.isfinite(prompts.grad).all()
        assert prompts.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- properties


@given(problems(), st.sampled_from(MODES), st.floats(0.05, 5.0))
def test_property_simplex_rows(problem, mode, tau) -> None:
    images, prompts, labels = problem
    gamma = PF.responsibilities(images, prompts, labels, tau=tau, mode=mode)
    assert gamma.shape == (images.shape[0], prompts.shape[1])
    assert_simplex_rows(gamma)
    if mode == "hard":
        assert torch.equal(gamma.sum(-1), torch.ones(len(gamma)))
        assert set(gamma.unique().tolist()) <= {0.0, 1.0}


@given(problems(), st.data())
def test_property_invariant_to_rescaling_embeddings(problem, data) -> None:
    images, prompts, labels = problem
    assume(bool((images.norm(dim=-1) > 1e-2).all() and (prompts.norm(dim=-1) > 1e-2).all()))
    positive = st.floats(1 / 64, 64.0, width=32)
    image_scales = data.draw(hnp.arrays(np.float32, (len(images), 1), elements=positive))
    prompt_scales = data.draw(hnp.arrays(np.float32, (*prompts.shape[:2], 1), elements=positive))
    rescaled = PF.responsibilities(
        images * torch.from_numpy(image_scales),
        prompts * torch.from_numpy(prompt_scales),
        labels,
        logit_scale=5.0,
    )
    expected = PF.responsibilities(images, prompts, labels, logit_scale=5.0)
    torch.testing.assert_close(rescaled, expected, atol=1e-4, rtol=1e-4)


@given(problems(), st.sampled_from(["soft", "sinkhorn"]), st.randoms(use_true_random=False))
def test_property_permuting_subprompts_permutes_columns(problem, mode, rng) -> None:
    images, prompts, labels = problem
    order = list(range(prompts.shape[1]))
    rng.shuffle(order)
    permuted = PF.responsibilities(images, prompts[:, order], labels, logit_scale=5.0, mode=mode)
    expected = PF.responsibilities(images, prompts, labels, logit_scale=5.0, mode=mode)[:, order]
    torch.testing.assert_close(permuted, expected, atol=1e-5, rtol=1e-4)


@given(problems(), st.floats(0.01, 5.0))
def test_property_hard_is_one_hot_argmax_of_soft(problem, tau) -> None:
    images, prompts, labels = problem
    soft = PF.responsibilities(images, prompts, labels, tau=tau)
    hard = PF.responsibilities(images, prompts, labels, tau=tau, mode="hard")
    chosen = hard.argmax(-1)
    assert torch.equal(hard, torch.nn.functional.one_hot(chosen, soft.shape[1]).float())
    # The chosen sub-prompt has the largest soft responsibility (ties allowed).
    assert torch.equal(soft.gather(1, chosen[:, None]).squeeze(1), soft.max(-1).values)


@given(problems())
def test_property_tau_to_zero_approaches_hard(problem) -> None:
    images, prompts, labels = problem
    cosine = PF.own_class_similarities(images, prompts, labels).double()
    if cosine.shape[1] > 1:
        top2 = cosine.topk(2, dim=-1).values
        assume(bool((top2[:, 0] - top2[:, 1] > 1e-3).all()))
    hard = PF.responsibilities(images, prompts, labels, mode="hard").double()
    distances = [
        (PF.responsibilities_from_similarities(cosine, tau=tau) - hard).abs().max().item()
        for tau in (3.0, 1.0, 0.1, 0.01, 1e-3, 1e-4)
    ]
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(distances)), distances
    assert distances[-1] < 1e-3


@given(problems(max_batch=12, max_classes=2, max_k=4))
def test_property_sinkhorn_balances_usage_per_class(problem) -> None:
    images, prompts, labels = problem
    k = prompts.shape[1]
    gamma = PF.responsibilities(
        images, prompts, labels, logit_scale=4.0, mode="sinkhorn", sinkhorn_iterations=300
    )
    for c in labels.unique():
        members = labels == c
        usage = gamma[members].sum(0)
        torch.testing.assert_close(
            usage, torch.full((k,), members.sum().item() / k), atol=2e-2, rtol=0
        )


@given(problems(), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_property_finite_gradients_with_zero_vectors_and_half_precision(problem, dtype) -> None:
    images, prompts, labels = problem
    images[0] = 0.0
    prompts[0, 0] = 0.0
    images = images.to(dtype).requires_grad_()
    prompts = prompts.to(dtype).requires_grad_()
    gamma = PF.responsibilities(images, prompts, labels, tau=0.3)
    weights = torch.linspace(-1, 1, gamma.shape[1]).to(dtype)
    (gamma * weights).sum().backward()
    assert torch.isfinite(gamma).all()
    assert torch.isfinite(images.grad).all() and torch.isfinite(prompts.grad).all()
