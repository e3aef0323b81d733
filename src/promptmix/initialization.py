"""Data-driven initialisation: start each sub-prompt at a look its class's images really have."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from promptmix import functional as PF
from promptmix._validation import (
    check_int,
    check_label_range,
    check_labels,
    check_positive,
    check_rank,
)
from promptmix.prompts import OffsetMixtureOfPrompts

__all__ = ["initialize_from_kmeans"]


def _separate_duplicates(
    centroids: Tensor, noise_std: float, generator: torch.Generator | None
) -> Tensor:
    """Add noise of expected norm `noise_std` to every centroid that repeats an earlier one."""
    k, dim = centroids.shape[1], centroids.shape[2]
    same = PF.pairwise_cosine(centroids) > 1 - 1e-6  # (C, K, K)
    earlier = torch.ones(k, k, dtype=torch.bool, device=centroids.device).tril(-1)
    repeated = (same & earlier).any(dim=-1) & (centroids.norm(dim=-1) > 0)  # (C, K)
    if not bool(repeated.any()) or noise_std == 0:
        return centroids
    noise = torch.randn(centroids.shape, generator=generator, dtype=torch.float32)
    noise = noise.to(centroids) * (noise_std / math.sqrt(dim))
    return centroids + noise * repeated.unsqueeze(-1)


def _start_shared_looks(
    prompts: OffsetMixtureOfPrompts,
    image_features: Tensor,
    labels: Tensor,
    prior_count: float,
    iterations: int,
    restarts: int,
    generator: torch.Generator | None,
) -> Tensor:
    """Set the class parts, shared looks and corrections from `shared_look_start`."""
    text = F.normalize(prompts.text_features.mean(dim=1), dim=-1)
    start = PF.shared_look_start(
        image_features.to(text.device),
        labels.to(text.device),
        text,
        n_subprompts=prompts.n_subprompts,
        prior_count=prior_count,
        iterations=iterations,
        restarts=restarts,
        generator=generator,
    )
    assert prompts.class_offsets is not None and prompts.shared_offsets is not None
    dtype = prompts.offsets.dtype
    prompts.class_offsets.copy_(start.class_offsets.to(dtype))
    prompts.shared_offsets.copy_(start.shared_offsets.to(dtype))
    prompts.offsets.copy_(start.subprompt_offsets.to(dtype))
    prompts.num_images.fill_(float(labels.shape[0]))
    return prompts()


def initialize_from_kmeans(
    prompts: nn.Module,
    image_features: Tensor,
    labels: Tensor,
    *,
    iterations: int = 30,
    restarts: int = 4,
    fit_steps: int = 100,
    fit_lr: float = 0.01,
    prior_count: float = 4.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Start a prompt learner from its few-shot training images: the recipe's one init call.

    - `OffsetMixtureOfPrompts` with `share_looks=True` (its default): the class parts, the looks
      shared by all classes and the per-class corrections start at
      `promptmix.functional.shared_look_start` of the images (a spherical k-means of what the
      class parts leave, pooled over all classes; every part a mean shrunk toward zero by the
      images behind it, `prior_count` pseudo-images of prior), and `num_images` is set to the
      number of images, which weighs the learner's `prior_loss()`. One shot per class stays near
      its text; the looks are found from every class's images.
    - `OffsetMixtureOfPrompts` with `share_looks=False`: each sub-prompt *is* its class's k-means
      centroid, $\mathrm{offset}_{ck} = \mu_{ck} - t_{ck}$ (exact), from
      `promptmix.functional.kmeans_subprompts` (one cluster per sub-prompt, largest first).
    - any other learner whose `forward()` returns `(num_classes, K, dim)` unit features, such as
      `MixtureOfPrompts`: a short fit of its parameters (Adam, `fit_steps` steps at `fit_lr`) that
      minimises $\frac{1}{CK}\sum_{ck} (1 - \cos(t_{ck}, \mu_{ck}))$ toward the per-class
      centroids, so each sub-prompt's context learns to say its look before the real training.

    Classes without an image (no label of theirs in `labels`) keep their initial sub-prompts. A
    class with fewer images than K starts from its images, repeated (the fallback of
    `kmeans_subprompts`), and the repeats are moved apart by noise of expected norm
    `init_noise_std` of the learner (0.1 if it has none). Everything is checked before the
    learner changes: NaN, inf or zero image features raise (k-means reads them on the host).

    Args:
        prompts: the learner, e.g. `OffsetMixtureOfPrompts` or `MixtureOfPrompts`.
        image_features: `(n, dim)` training image features.
        labels: `(n,)` integer classes in `[0, num_classes)`.
        iterations: Lloyd rounds of the k-means.
        restarts: k-means seedings per class.
        fit_steps: Adam steps of the fit (learners other than the offset one), `>= 0`.
        fit_lr: Adam learning rate of the fit.
        prior_count: the shrinkage of the shared-look start, in pseudo-images, `>= 0`.
        generator: random generator for the k-means seeds and the separating noise.

    Returns:
        `(num_classes, K, dim)`: with shared looks, the learner's new sub-prompt features;
        otherwise the centroids the sub-prompts were moved to (zero rows for classes without
        images).

    Raises:
        TypeError: If `labels` is not an integer tensor.
        ValueError: On no image features (fewer than K with shared looks), image features of
            another dimension than the prompts', with NaN, inf or zero rows, or labels outside
            `[0, num_classes)` (read on the host on every device, as k-means does).

    Examples:
        >>> import open_clip, torch
        >>> from promptmix import OffsetMixtureOfPrompts
        >>> model = open_clip.CLIP(
        ...     embed_dim=16,
        ...     vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=32),
        ...     text_cfg=dict(width=32, heads=2, layers=1),
        ... )
        >>> prompts = OffsetMixtureOfPrompts(
        ...     model, open_clip.get_tokenizer("ViT-B-32"), ["cat", "dog"], n_subprompts=2
        ... )
        >>> images, labels = torch.randn(12, 16), torch.arange(2).repeat(6)
        >>> centroids = initialize_from_kmeans(prompts, images, labels)
        >>> torch.allclose(prompts(), centroids, atol=1e-5)
        True
    """
    check_rank("image_features", image_features, (2,), "(n, dim)")
    if image_features.shape[0] == 0:
        raise ValueError(
            "image_features must hold at least one training image (n >= 1) to start from but "
            f"has shape {tuple(image_features.shape)}."
        )
    labels = check_labels("labels", labels, image_features.shape[0], None)
    check_int("fit_steps", fit_steps, minimum=0)
    check_positive("fit_lr", fit_lr)
    check_positive("prior_count", prior_count, allow_zero=True)
    if not isinstance(prompts, nn.Module):
        raise TypeError(
            f"prompts must be a prompt learner (nn.Module) but is {type(prompts).__name__}."
        )
    with torch.no_grad():
        current = prompts()
    check_rank("prompts()", current, (3,), "(num_classes, K, dim)")
    num_classes, k, dim = current.shape
    if image_features.shape[1] != dim:
        raise ValueError(
            f"image_features must have dim {dim} (the prompts' feature dimension) but has "
            f"shape {tuple(image_features.shape)}."
        )
    # Set-up reads the host anyway (k-means does): the label range is checked on every device.
    check_label_range("labels", labels, num_classes, " (the prompts' classes)")
    if isinstance(prompts, OffsetMixtureOfPrompts) and prompts.share_looks:
        if labels.shape[0] < k:
            raise ValueError(
                f"image_features must hold at least K = {k} images (the looks are found among "
                f"them) but holds {labels.shape[0]}."
            )
        with torch.no_grad():
            return _start_shared_looks(
                prompts, image_features, labels, prior_count, iterations, restarts, generator
            )
    centroids = PF.kmeans_subprompts(
        image_features.to(current.device, torch.float32),
        labels.to(current.device),
        num_classes=num_classes,
        n_subprompts=k,
        iterations=iterations,
        restarts=restarts,
        generator=generator,
    )
    noise_std = float(getattr(prompts, "init_noise_std", 0.1))
    targets = _separate_duplicates(centroids, noise_std, generator)
    # From the labels, not from the centroids' norms: k-means has rejected zero features, and a
    # class is "without images" only when no label names it.
    has_images = torch.bincount(labels.cpu(), minlength=num_classes)[:num_classes] > 0
    has_images = has_images.to(centroids.device)
    if isinstance(prompts, OffsetMixtureOfPrompts):
        with torch.no_grad():
            prompts.num_images.fill_(float(labels.shape[0]))
            offsets = targets.to(prompts.offsets.dtype) - prompts.text_features
            prompts.offsets[has_images] = offsets[has_images]
        return centroids.to(current.dtype)

    parameters = [p for p in prompts.parameters() if p.requires_grad]
    if fit_steps and parameters and bool(has_images.any()):
        optimizer = torch.optim.Adam(parameters, lr=fit_lr)
        goal = F.normalize(targets[has_images], dim=-1)
        for _ in range(fit_steps):
            features = prompts()[has_images]
            cosine = (F.normalize(features.float(), dim=-1) * goal).sum(dim=-1)
            loss = (1 - cosine).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return centroids.to(current.dtype)
