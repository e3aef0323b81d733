"""Synthetic CLIP-like features with known modes, for the collapse benchmark.

Each class is a mixture of ``n_modes`` true modes on the unit sphere. Image features are

    x = normalize(a_s * g + a_c * c_y + a_m * u_{y,m} + a_n * noise)

with ``g`` a direction shared by every image (CLIP's image cone), ``c_y`` the class direction,
``u_{y,m}`` the direction of mode ``m`` of class ``y`` and ``noise`` mostly inside a low-rank
subspace that the class and mode directions share (so classes overlap and modes are not trivially
separable), plus some isotropic noise. The class directions are tied to the *text* features the
sub-prompts start from: ``c_y`` mixes the class-specific part of the class's text feature with a
private direction, and ``g`` has a cosine of ``gap_cosine`` with the mean text direction (CLIP's
"modality gap"). With the default weights, image-text cosines are about 0.19 (other classes) and
0.23 (own class), image-image cosines about 0.44 (other classes) and 0.54 (same class), as for a
real CLIP ViT-B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_MAKES = ("Aurora", "Bexley", "Corvan", "Dunmore", "Elstar", "Fenwick", "Galt", "Harlow")
_BODIES = ("Sedan", "Coupe", "SUV", "Convertible", "Hatchback", "Wagon", "Minivan", "Cab")


def car_classnames(num_classes: int) -> list[str]:
    """Car-like class names; neighbours share a make or a body, so their text features overlap."""
    return [
        f"{_MAKES[index % len(_MAKES)]} M{index} {_BODIES[(index // 2) % len(_BODIES)]} "
        f"{2000 + index % 13}"
        for index in range(num_classes)
    ]


def synthetic_text_features(
    num_classes: int, dim: int, generator: torch.Generator, *, groups: int = 4
) -> Tensor:
    """Unit "text features" ``(num_classes, dim)`` with CLIP-like mutual cosines (0.85-0.97).

    A common text direction, a group direction (classes of one make) and a class direction.
    """
    common = torch.randn(dim, generator=generator)
    group = torch.randn(groups, dim, generator=generator)
    own = torch.randn(num_classes, dim, generator=generator)
    group_of_class = torch.arange(num_classes) % groups
    return F.normalize(
        F.normalize(common, dim=-1)
        + 0.35 * F.normalize(group, dim=-1)[group_of_class]
        + 0.2 * F.normalize(own, dim=-1),
        dim=-1,
    )


@dataclass(frozen=True)
class WorldWeights:
    """Squared weights of the parts of an image feature (they sum to 1)."""

    shared: float = 0.45
    classes: float = 0.07
    modes: float = 0.12
    noise: float = 0.36


@dataclass
class Samples:
    """Image features ``(n, dim)``, their classes ``(n,)`` and true modes ``(n,)``."""

    features: Tensor
    labels: Tensor
    modes: Tensor


class SyntheticWorld:
    """Image features of ``num_classes`` classes, each a mixture of ``n_modes`` true modes.

    Args:
        text_features: ``(num_classes, dim)`` unit text features the sub-prompts start from.
        n_modes: true modes per class.
        generator: random generator for every direction.
        weights: squared weights of the shared, class, mode and noise parts.
        intrinsic_rank: dimension of the subspace that holds class, mode and most noise directions.
        isotropic_noise: weight of isotropic noise relative to the in-subspace noise.
        gap_cosine: cosine between the shared image direction and the mean text direction.
        text_share: how much of the class direction is the class-specific part of its text feature.
    """

    def __init__(
        self,
        text_features: Tensor,
        n_modes: int,
        generator: torch.Generator,
        *,
        weights: WorldWeights | None = None,
        intrinsic_rank: int = 48,
        isotropic_noise: float = 0.5,
        gap_cosine: float = 0.3,
        text_share: float = 0.5,
    ):
        text_features = F.normalize(text_features.detach().float().cpu(), dim=-1)
        self.num_classes, self.dim = text_features.shape
        self.n_modes = n_modes
        self.weights = weights or WorldWeights()
        self.isotropic_noise = isotropic_noise
        mean_text = F.normalize(text_features.mean(dim=0), dim=-1)
        specific = text_features - (text_features @ mean_text)[:, None] * mean_text
        specific = F.normalize(specific, dim=-1)
        self.basis = torch.linalg.qr(torch.randn(self.dim, intrinsic_rank, generator=generator))[0]

        def in_subspace(*shape: int) -> Tensor:
            vectors = torch.randn(*shape, intrinsic_rank, generator=generator) @ self.basis.T
            vectors = vectors - (vectors @ mean_text)[..., None] * mean_text
            return F.normalize(vectors, dim=-1)

        self.shared = F.normalize(
            gap_cosine * mean_text + math.sqrt(1 - gap_cosine**2) * in_subspace(), dim=-1
        )
        self.class_directions = F.normalize(
            text_share * specific + math.sqrt(1 - text_share**2) * in_subspace(self.num_classes),
            dim=-1,
        )
        self.mode_directions = in_subspace(self.num_classes, n_modes)

    def mode_centres(self) -> Tensor:
        """The true mode directions ``(num_classes, n_modes, dim)`` (noise-free image means)."""
        w = self.weights
        return F.normalize(
            math.sqrt(w.shared) * self.shared
            + math.sqrt(w.classes) * self.class_directions[:, None]
            + math.sqrt(w.modes) * self.mode_directions,
            dim=-1,
        )

    def sample(self, per_class: int, generator: torch.Generator) -> Samples:
        """``per_class`` images of every class, spread evenly over its modes."""
        labels = torch.arange(self.num_classes).repeat_interleave(per_class)
        modes = torch.arange(per_class).remainder(self.n_modes).repeat(self.num_classes)
        count, rank = len(labels), self.basis.shape[1]
        structured = F.normalize(torch.randn(count, rank, generator=generator), dim=-1)
        isotropic = F.normalize(torch.randn(count, self.dim, generator=generator), dim=-1)
        noise = F.normalize(structured @ self.basis.T + self.isotropic_noise * isotropic, dim=-1)
        w = self.weights
        features = (
            math.sqrt(w.shared) * self.shared
            + math.sqrt(w.classes) * self.class_directions[labels]
            + math.sqrt(w.modes) * self.mode_directions[labels, modes]
            + math.sqrt(w.noise) * noise
        )
        return Samples(F.normalize(features, dim=-1), labels, modes)
