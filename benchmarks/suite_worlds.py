"""Synthetic worlds of the benchmark suite: classes that look several ways, with known looks.

An image of class `y` in look `m` is

    x = normalize(a_s g + a_c c_y + a_l u_{y,m} + a_n noise)

with `g` a direction every image shares (CLIP's image cone, at `gap_cosine` from the mean text
direction: the modality gap), `c_y` the class direction (half of it the class-specific part of
the class's text feature, so the text is a weak zero-shot classifier), `u_{y,m}` the look
direction and `noise` mostly inside a low-rank subspace shared with the class and look directions.
A look is class-specific (`shared_looks=0`) or partly common to all classes
(`u_{y,m} = normalize(sqrt(r) v_m + sqrt(1 - r) w_{y,m})` with a global `v_m`: a colour or a
viewpoint that every car model has). Looks can be unequally frequent (`look_frequencies`, the
order drawn per class, so each class has its own most common look), and the training set is
split over looks in exactly those proportions (largest remainder), the test set too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class WorldSpec:
    """One world of the suite: its name, the data and the learners' K."""

    name: str
    num_classes: int = 16
    n_looks: int = 4
    n_subprompts: int = 4
    dim: int = 128
    shots: int = 32
    test_per_class: int = 64
    look_frequencies: tuple[float, ...] | None = None  # None: equal
    shared_looks: float = 0.0
    # Squared weights of the shared, class, look and noise parts (sum to 1).
    weights: tuple[float, float, float, float] = (0.30, 0.07, 0.25, 0.38)
    intrinsic_rank: int = 32
    isotropic_noise: float = 0.5
    gap_cosine: float = 0.3
    text_share: float = 0.5
    learners: tuple[str, ...] = ("free", "offset")
    note: str = ""

    def frequencies(self) -> tuple[float, ...]:
        freq = self.look_frequencies or (1.0,) * self.n_looks
        total = sum(freq)
        return tuple(f / total for f in freq)


@dataclass
class Samples:
    """Image features `(n, dim)`, their labels `(n,)` and true looks `(n,)` (-1: outlier)."""

    features: Tensor
    labels: Tensor
    looks: Tensor


def split_counts(total: int, frequencies: tuple[float, ...]) -> list[int]:
    """`total` split in proportion to `frequencies` by largest remainder (sums to `total`)."""
    exact = [total * f for f in frequencies]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass
class World:
    """The directions of one drawn world, and a sampler."""

    spec: WorldSpec
    shared: Tensor
    class_directions: Tensor
    look_directions: Tensor  # (num_classes, n_looks, dim)
    basis: Tensor
    look_order: Tensor  # (num_classes, n_looks): look index of the i-th frequency
    extra: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def draw(cls, spec: WorldSpec, text_features: Tensor, generator: torch.Generator) -> World:
        text = F.normalize(text_features.detach().float().cpu(), dim=-1)
        num_classes, dim = text.shape
        mean_text = F.normalize(text.mean(dim=0), dim=-1)
        specific = F.normalize(text - (text @ mean_text)[:, None] * mean_text, dim=-1)
        basis = torch.linalg.qr(torch.randn(dim, spec.intrinsic_rank, generator=generator))[0]

        def in_subspace(*shape: int) -> Tensor:
            vectors = torch.randn(*shape, spec.intrinsic_rank, generator=generator) @ basis.T
            vectors = vectors - (vectors @ mean_text)[..., None] * mean_text
            return F.normalize(vectors, dim=-1)

        gap = spec.gap_cosine
        shared = F.normalize(gap * mean_text + math.sqrt(1 - gap**2) * in_subspace(), dim=-1)
        share = spec.text_share
        class_directions = F.normalize(
            share * specific + math.sqrt(1 - share**2) * in_subspace(num_classes), dim=-1
        )
        own_looks = in_subspace(num_classes, spec.n_looks)
        if spec.shared_looks > 0:
            common = in_subspace(spec.n_looks)
            r = spec.shared_looks
            looks = F.normalize(math.sqrt(r) * common + math.sqrt(1 - r) * own_looks, dim=-1)
        else:
            looks = own_looks
        order = torch.stack(
            [torch.randperm(spec.n_looks, generator=generator) for _ in range(num_classes)]
        )
        return cls(spec, shared, class_directions, looks, basis, order)

    def look_centres(self) -> Tensor:
        """The true looks `(num_classes, n_looks, dim)`: noise-free image means, unit norm."""
        a_s, a_c, a_l, _ = (math.sqrt(w) for w in self.spec.weights)
        return F.normalize(
            a_s * self.shared + a_c * self.class_directions[:, None] + a_l * self.look_directions,
            dim=-1,
        )

    def sample(self, per_class: int, generator: torch.Generator) -> Samples:
        """`per_class` images of every class, split over its looks by the look frequencies."""
        spec = self.spec
        counts = split_counts(per_class, spec.frequencies())
        rank_of_image = torch.repeat_interleave(torch.arange(spec.n_looks), torch.tensor(counts))
        labels = torch.arange(spec.num_classes).repeat_interleave(per_class)
        looks = self.look_order[labels, rank_of_image.repeat(spec.num_classes)]
        n, dim = len(labels), self.shared.shape[0]
        structured = F.normalize(torch.randn(n, spec.intrinsic_rank, generator=generator), dim=-1)
        isotropic = F.normalize(torch.randn(n, dim, generator=generator), dim=-1)
        noise = F.normalize(structured @ self.basis.T + spec.isotropic_noise * isotropic, dim=-1)
        a_s, a_c, a_l, a_n = (math.sqrt(w) for w in spec.weights)
        features = (
            a_s * self.shared
            + a_c * self.class_directions[labels]
            + a_l * self.look_directions[labels, looks]
            + a_n * noise
        )
        return Samples(F.normalize(features, dim=-1), labels, looks)


def synthetic_text_features(num_classes: int, dim: int, generator: torch.Generator) -> Tensor:
    """Unit "text features" `(num_classes, dim)` with CLIP-like mutual cosines (0.85-0.97)."""
    common = F.normalize(torch.randn(dim, generator=generator), dim=-1)
    group = F.normalize(torch.randn(4, dim, generator=generator), dim=-1)
    own = F.normalize(torch.randn(num_classes, dim, generator=generator), dim=-1)
    return F.normalize(common + 0.35 * group[torch.arange(num_classes) % 4] + 0.2 * own, dim=-1)


IMBALANCED = (0.4, 0.3, 0.2, 0.1)

WORLDS: dict[str, WorldSpec] = {
    spec.name: spec
    for spec in (
        WorldSpec("balanced", note="4 equally frequent looks per class, K = 4"),
        WorldSpec(
            "imbalanced",
            look_frequencies=IMBALANCED,
            learners=("free", "offset", "mixture"),
            note="looks 40/30/20/10 % (acceptance test)",
        ),
        WorldSpec(
            "shared looks",
            look_frequencies=IMBALANCED,
            shared_looks=0.6,
            note="looks 60 % common to all classes, 40/30/20/10 % (acceptance test)",
        ),
        WorldSpec("K=8 on 4", n_subprompts=8, note="more sub-prompts than looks"),
        WorldSpec("K=2 on 4", n_subprompts=2, note="fewer sub-prompts than looks"),
        WorldSpec("16 shots", shots=16, note="4 images per look"),
        WorldSpec("4 shots", shots=4, note="1 image per look"),
        WorldSpec(
            "CLIP-like",
            dim=512,
            weights=(0.45, 0.07, 0.12, 0.36),
            intrinsic_rank=48,
            note="CLIP ViT-B cosines (image-text ≈ 0.2, image-image 0.44-0.54), dim 512",
        ),
    )
}
