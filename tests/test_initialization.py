"""`initialize_from_kmeans`: offsets set exactly, contexts fitted, fallbacks and errors."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from promptmix import MixtureOfPrompts, OffsetMixtureOfPrompts, initialize_from_kmeans
from promptmix import functional as PF

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = ["cat", "red panda", "Rolls-Royce Phantom Drophead Coupe"]


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )


def _images(labels: list[int], dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(len(labels), dim, generator=generator), torch.tensor(labels)


def test_offset_learner_starts_exactly_at_the_centroids(model, tokenizer) -> None:
    prompts = OffsetMixtureOfPrompts(model, tokenizer, NAMES, n_subprompts=2, share_looks=False)
    images, labels = _images([0, 1, 2] * 5)
    centroids = initialize_from_kmeans(
        prompts, images, labels, generator=torch.Generator().manual_seed(0)
    )
    expected = PF.kmeans_subprompts(
        images, labels, num_classes=3, n_subprompts=2, generator=torch.Generator().manual_seed(0)
    )
    assert torch.allclose(centroids, expected)
    assert torch.allclose(prompts(), expected, atol=1e-5)
    assert list(prompts.state_dict()) == ["offsets", "num_images"]
    assert prompts.num_images.item() == 15


def test_classes_without_images_keep_their_sub_prompts(model, tokenizer) -> None:
    prompts = OffsetMixtureOfPrompts(model, tokenizer, NAMES, n_subprompts=2, share_looks=False)
    before = prompts().detach().clone()
    images, labels = _images([0, 0, 1, 1])
    centroids = initialize_from_kmeans(prompts, images, labels)
    assert (centroids[2] == 0).all()
    assert torch.equal(prompts()[2], before[2])
    assert not torch.allclose(prompts()[0], before[0])


def test_fallback_duplicates_are_moved_apart(model, tokenizer) -> None:
    prompts = OffsetMixtureOfPrompts(model, tokenizer, NAMES, n_subprompts=3, share_looks=False)
    images, labels = _images([0, 1, 1, 1, 2, 2, 2])  # class 0 has one image for K = 3
    initialize_from_kmeans(prompts, images, labels, generator=torch.Generator().manual_seed(1))
    cosine = PF.pairwise_cosine(prompts().detach())[0]
    off_diagonal = cosine[~torch.eye(3, dtype=torch.bool)]
    assert (off_diagonal < 1 - 1e-4).all()  # distinct, so training can tell them apart
    assert (off_diagonal > 0.9).all()  # but all near the class's one image
    assert F.cosine_similarity(prompts()[0, 0], images[0], dim=0) > 0.99


def test_mixture_learner_context_is_fitted_towards_the_centroids(model, tokenizer) -> None:
    prompts = MixtureOfPrompts(model, tokenizer, NAMES, n_subprompts=2, chunk_size=None)
    images, labels = _images([0, 1, 2] * 4)
    with torch.no_grad():
        start = prompts()
    centroids = initialize_from_kmeans(prompts, images, labels, fit_steps=60, fit_lr=0.05)
    with torch.no_grad():
        end = prompts()
    before = F.cosine_similarity(start, centroids, dim=-1).mean()
    after = F.cosine_similarity(end, centroids, dim=-1).mean()
    assert after > before + 0.3
    assert not any(p.requires_grad for p in model.parameters())


def test_fit_steps_zero_leaves_a_generic_learner_alone() -> None:
    class Free(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Parameter(torch.randn(3, 2, 16))

        def forward(self) -> torch.Tensor:
            return F.normalize(self.features, dim=-1)

    learner = Free()
    before = learner.features.detach().clone()
    images, labels = _images([0, 1, 2] * 4)
    initialize_from_kmeans(learner, images, labels, fit_steps=0)
    assert torch.equal(learner.features, before)
    centroids = initialize_from_kmeans(learner, images, labels, fit_steps=200, fit_lr=0.05)
    assert F.cosine_similarity(learner(), centroids, dim=-1).min() > 0.99


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(fit_steps=-1), ValueError, "fit_steps must be >= 0"),
        (dict(fit_lr=0.0), ValueError, "fit_lr must be in"),
        (dict(restarts=0), ValueError, "restarts must be >= 1"),
    ],
)
def test_bad_arguments(model, tokenizer, kwargs: dict, error: type, match: str) -> None:
    prompts = OffsetMixtureOfPrompts(model, tokenizer, NAMES, n_subprompts=2, share_looks=False)
    images, labels = _images([0, 1, 2] * 2)
    with pytest.raises(error, match=match):
        initialize_from_kmeans(prompts, images, labels, **kwargs)


def test_wrong_feature_dimension_names_the_argument(model, tokenizer) -> None:
    prompts = OffsetMixtureOfPrompts(model, tokenizer, NAMES, n_subprompts=2, share_looks=False)
    images, labels = _images([0, 1, 2], dim=8)
    with pytest.raises(ValueError, match="image_features must have dim 16"):
        initialize_from_kmeans(prompts, images, labels)


@pytest.mark.parametrize("share_looks", [True, False])
def test_inputs_are_checked_before_the_learner_changes(model, tokenizer, share_looks) -> None:
    prompts = OffsetMixtureOfPrompts(
        model, tokenizer, NAMES, n_subprompts=2, share_looks=share_looks
    )
    before = {name: p.detach().clone() for name, p in prompts.state_dict().items()}
    images, labels = _images([0, 1, 2] * 2)
    with pytest.raises(TypeError, match=r"labels must be an integer torch\.Tensor but is a list"):
        initialize_from_kmeans(prompts, images, labels.tolist())
    nan_images = images.clone()
    nan_images[1, 3] = float("nan")
    with pytest.raises(ValueError, match="image_features must be finite"):
        initialize_from_kmeans(prompts, nan_images, labels)
    zero_images = images.clone()
    zero_images[labels == 2] = 0.0  # a class of all-zero features is not a class without images
    with pytest.raises(ValueError, match=r"image_features must have no zero rows"):
        initialize_from_kmeans(prompts, zero_images, labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        initialize_from_kmeans(prompts, images, labels + 1)
    for name, value in prompts.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_shared_looks_start_from_the_shared_look_estimate(model, tokenizer) -> None:
    prompts = OffsetMixtureOfPrompts(model, tokenizer, NAMES, n_subprompts=2)
    images, labels = _images([0, 1, 2] * 4)
    features = initialize_from_kmeans(
        prompts, images, labels, prior_count=2.0, generator=torch.Generator().manual_seed(0)
    )
    text = torch.nn.functional.normalize(prompts.text_features.mean(1), dim=-1)
    start = PF.shared_look_start(
        images,
        labels,
        text,
        n_subprompts=2,
        prior_count=2.0,
        generator=torch.Generator().manual_seed(0),
    )
    expected = prompts.text_features + (
        start.class_offsets[:, None] + start.shared_offsets[None] + start.subprompt_offsets
    )
    torch.testing.assert_close(features, torch.nn.functional.normalize(expected, dim=-1))
    torch.testing.assert_close(prompts(), features)
    assert prompts.num_images.item() == 12


def test_a_shrunk_start_stays_nearer_the_text_with_fewer_images(model, tokenizer) -> None:
    # The same images, repeated: more images behind each estimate moves the start further from
    # the text (the prior's share falls), fewer keeps it near the text.
    images, labels = _images([0, 1, 2] * 2)
    cosines = []
    for copies in (1, 4, 16):
        prompts = OffsetMixtureOfPrompts(model, tokenizer, NAMES, n_subprompts=2)
        initialize_from_kmeans(
            prompts,
            images.repeat(copies, 1),
            labels.repeat(copies),
            generator=torch.Generator().manual_seed(0),
        )
        assert prompts.class_offsets is not None
        text = prompts.text_features.mean(1)
        class_part = torch.nn.functional.cosine_similarity(text + prompts.class_offsets, text)
        cosines.append(class_part.mean().item())
    assert cosines[0] > cosines[1] > cosines[2]


@pytest.mark.parametrize("share_looks", [True, False])
def test_no_images_is_an_error_not_a_start(model, tokenizer, share_looks) -> None:
    # Without the check the per-class learner kept its offsets and set num_images to 0, so
    # prior_loss() became NaN at the first step.
    prompts = OffsetMixtureOfPrompts(
        model, tokenizer, NAMES, n_subprompts=2, share_looks=share_looks
    )
    before = {name: value.clone() for name, value in prompts.state_dict().items()}
    with pytest.raises(ValueError, match="at least one training image"):
        initialize_from_kmeans(prompts, torch.empty(0, 16), torch.empty(0, dtype=torch.long))
    for name, value in prompts.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_shared_looks_need_k_images_and_labels_are_checked_on_every_device(
    model, tokenizer, monkeypatch
) -> None:
    prompts = OffsetMixtureOfPrompts(model, tokenizer, NAMES, n_subprompts=3)
    images, labels = _images([0, 1])
    with pytest.raises(ValueError, match="at least K = 3 images"):
        initialize_from_kmeans(prompts, images, labels)
    from promptmix import _validation

    monkeypatch.setattr(_validation, "HOST_CHECKS", False)  # the path a GPU takes
    images, labels = _images([0, 1, 3, 2])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\] \(the prompts' classes\)"):
        initialize_from_kmeans(prompts, images, labels)
