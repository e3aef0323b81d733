"""Fine-grained few-shot worlds of the benchmark suite, shaped like Stanford Cars on a real CLIP.

Many classes (makes × models) whose text features sit close together (cosine 0.7-0.9), image-text
cosines near 0.3 at logit scale 100, and a few *looks* (a colour, a viewpoint) that are mostly
common to every class and unequally frequent. An image of class `y` in look `m` is

    x = normalize(a_s g + a_c c_y + a_l u_{y,m} + a_n noise),
    u_{y,m} = normalize(sqrt(r) v_m + sqrt(1 - r) w_{y,m})

with `g` the image cone every image shares (at `gap` from the mean text: the modality gap), `c_y`
the class direction (classes of one make share part of it), `v_m` the look common to all classes,
`w_{y,m}` its class-specific part and `noise` mostly inside a low-rank subspace with the rest.
The text of a class sees the class as its images look on average: its class-specific part is the
frequency-weighted mean of the class's image centres, mixed with text-only noise (`text_share`),
so zero-shot is well above chance and far from perfect. Training sets can flip a share of the
labels to another class or replace a share of the images by outliers that belong to no class.

`pretrained_clip` trains a tiny open_clip text tower on captions of one drawn world ("a photo of a
{name}." → the class's text feature, "{look} photo of a {name}." → that text moved toward the
look), so that `MixtureOfPrompts` learns its context through a tower whose words mean something.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from suite_worlds import Samples, split_counts
from torch import Tensor, nn

from promptmix.text_tower import TextTower

SYLLABLES = ("ar", "bel", "cor", "dun", "el", "fen", "gal", "har", "ix", "jor", "kel", "lum", "mor")
BODIES = ("Sedan", "Coupe", "SUV", "Wagon", "Hatchback", "Convertible", "Cab", "Van")
LOOK_WORDS = ("red", "white", "side", "night", "black", "rear")


def unit(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1)


@dataclass(frozen=True)
class FineSpec:
    """One fine-grained world: its classes, looks, shots and the corruption of its training set."""

    name: str
    makes: int = 32
    models: int = 4
    n_looks: int = 4
    n_subprompts: int = 4
    shots: int = 16
    test_per_class: int = 20
    look_frequencies: tuple[float, ...] = (0.4, 0.3, 0.2, 0.1)
    shared_looks: float = 0.7  # share of a look's direction common to all classes
    common_text: float = 0.75  # text cosine of two classes before their own parts
    make_image: float = 0.3  # share of a class direction common to its make
    text_share: float = 0.9  # cosine of a class's own text part with its mean image
    # Squared weights of the image cone, class, look and noise parts (sum to 1).
    weights: tuple[float, float, float, float] = (0.30, 0.18, 0.30, 0.22)
    gap: float = 0.3
    dim: int = 128
    intrinsic_rank: int = 32
    isotropic_noise: float = 0.5
    flipped_labels: float = 0.0
    outliers: float = 0.0
    learners: tuple[str, ...] = ("offset",)
    note: str = ""

    @property
    def num_classes(self) -> int:
        return self.makes * self.models

    def frequencies(self) -> tuple[float, ...]:
        total = sum(self.look_frequencies)
        return tuple(f / total for f in self.look_frequencies)


def classnames(spec: FineSpec) -> list[str]:
    """`makes × models` car-like names: the models of a make share its first word."""
    makes = [
        (SYLLABLES[i % 13] + SYLLABLES[(i // 13 + 3 * i) % 13]).capitalize()
        for i in range(spec.makes)
    ]
    return [
        f"{makes[c // spec.models]} M{c % spec.models + 1} {BODIES[c % len(BODIES)]}"
        for c in range(spec.num_classes)
    ]


class FineWorld:
    """The directions of one drawn fine-grained world, and a sampler."""

    def __init__(self, spec: FineSpec, seed: int):
        self.spec = s = spec
        generator = torch.Generator().manual_seed(seed)
        num_classes, dim = s.num_classes, s.dim
        self.make_of = torch.arange(num_classes) // s.models
        basis = torch.linalg.qr(torch.randn(dim, s.intrinsic_rank, generator=generator))[0]
        self.basis = basis
        common_text = unit(torch.randn(dim, generator=generator))

        def in_subspace(*shape: int) -> Tensor:
            vectors = torch.randn(*shape, s.intrinsic_rank, generator=generator) @ basis.T
            vectors = vectors - (vectors @ common_text)[..., None] * common_text
            return unit(vectors)

        makes = in_subspace(s.makes)
        m = s.make_image
        self.class_directions = unit(
            math.sqrt(m) * makes[self.make_of] + math.sqrt(1 - m) * in_subspace(num_classes)
        )
        self.common_looks = in_subspace(s.n_looks)
        r = s.shared_looks
        self.look_directions = unit(
            math.sqrt(r) * self.common_looks
            + math.sqrt(1 - r) * in_subspace(num_classes, s.n_looks)
        )
        # Each class has its own most common look.
        self.look_order = torch.stack(
            [torch.randperm(s.n_looks, generator=generator) for _ in range(num_classes)]
        )
        frequency = torch.zeros(num_classes, s.n_looks)
        shares = torch.tensor(s.frequencies()).expand(num_classes, -1).clone()
        frequency.scatter_(1, self.look_order, shares)
        # The text sees a class as its images look on average: the class-specific part of the
        # frequency-weighted mean image, mixed with text-only noise.
        _, a_c, a_l, _ = (math.sqrt(w) for w in s.weights)
        mean_image = a_c * self.class_directions + a_l * torch.einsum(
            "cm,cmd->cd", frequency, self.look_directions
        )
        own = mean_image - mean_image.mean(dim=0)
        own = unit(own - (own @ common_text)[:, None] * common_text)
        text_noise = unit(torch.randn(num_classes, dim, generator=generator))
        own = unit(s.text_share * own + math.sqrt(1 - s.text_share**2) * text_noise)
        a = s.common_text
        self.text_features = unit(math.sqrt(a) * common_text + math.sqrt(1 - a) * own)
        mean_text = unit(self.text_features.mean(dim=0))
        self.cone = unit(s.gap * mean_text + math.sqrt(1 - s.gap**2) * in_subspace())

    def look_centres(self) -> Tensor:
        """The true looks `(num_classes, n_looks, dim)`: noise-free image means, unit norm."""
        a_s, a_c, a_l, _ = (math.sqrt(w) for w in self.spec.weights)
        return unit(
            a_s * self.cone + a_c * self.class_directions[:, None] + a_l * self.look_directions
        )

    def _noise(self, n: int, generator: torch.Generator) -> Tensor:
        structured = unit(torch.randn(n, self.spec.intrinsic_rank, generator=generator))
        isotropic = unit(torch.randn(n, self.spec.dim, generator=generator))
        return unit(structured @ self.basis.T + self.spec.isotropic_noise * isotropic)

    def sample(self, per_class: int, generator: torch.Generator, *, corrupt: bool) -> Samples:
        """`per_class` images of every class, split over its looks by the look frequencies.

        With `corrupt=True` (training sets) a share `flipped_labels` of the labels moves to
        another class drawn uniformly, and a share `outliers` of the images is replaced by an
        image of the domain that belongs to no class (its look is -1).
        """
        s = self.spec
        counts = split_counts(per_class, s.frequencies())
        rank = torch.repeat_interleave(torch.arange(s.n_looks), torch.tensor(counts))
        labels = torch.arange(s.num_classes).repeat_interleave(per_class)
        looks = self.look_order[labels, rank.repeat(s.num_classes)]
        a_s, a_c, a_l, a_n = (math.sqrt(w) for w in s.weights)
        features = unit(
            a_s * self.cone
            + a_c * self.class_directions[labels]
            + a_l * self.look_directions[labels, looks]
            + a_n * self._noise(len(labels), generator)
        )
        if corrupt and s.flipped_labels > 0:
            flip = torch.rand(len(labels), generator=generator) < s.flipped_labels
            shift = torch.randint(1, s.num_classes, (len(labels),), generator=generator)
            labels = torch.where(flip, (labels + shift) % s.num_classes, labels)
        if corrupt and s.outliers > 0:
            out = torch.rand(len(labels), generator=generator) < s.outliers
            n = int(out.sum())
            structured = unit(torch.randn(n, s.intrinsic_rank, generator=generator) @ self.basis.T)
            junk = unit(
                a_s * self.cone
                + math.sqrt(a_c**2 + a_l**2) * structured
                + a_n * self._noise(n, generator)
            )
            features = features.clone()
            features[out] = junk
            looks = torch.where(out, torch.full_like(looks, -1), looks)
        return Samples(features, labels, looks)


def tiny_clip(dim: int) -> nn.Module:
    """A small open_clip CLIP (the image tower is never used) with `dim`-dimensional features."""
    return open_clip.CLIP(
        embed_dim=dim,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=1, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=1),
    )


def pretrained_clip(
    world: FineWorld, names: list[str], *, name_weight: float = 100.0, seed: int = 0
) -> tuple[nn.Module, float]:
    """A tiny CLIP whose text side was fitted to the captions of `world`; returns it and its fit.

    Captions and targets: "a photo of a {name}." → the class's text feature; "{look} photo of a
    {name}." → that feature moved toward the image look common to all classes (one look word of
    `LOOK_WORDS` per look). The transformer keeps its random weights; its text projection is the
    weighted ridge regression of the targets on the pooled caption features (name captions weigh
    `name_weight`), so a learned context that says a look word moves the feature toward that look.
    The fit is the mean cosine of the tower's "a photo of a {name}." features to the world's text.
    """
    torch.manual_seed(seed)
    model = tiny_clip(world.spec.dim)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    text = world.text_features
    captions = [f"a photo of a {name}." for name in names]
    targets = [text]
    for look, word in zip(world.common_looks, LOOK_WORDS, strict=False):
        captions += [f"{word} photo of a {name}." for name in names]
        targets.append(unit(text + 0.5 * look))
    goal = torch.cat(targets)
    weights = torch.ones(len(captions))
    weights[: len(names)] = name_weight
    model.requires_grad_(False).eval()
    with torch.no_grad():
        width = model.text_projection.shape[0]
        tower = TextTower(model)
        tower.text_projection = None  # the pooled features before the projection
        tokens = tokenizer(captions)
        positions = tower.pool_positions(tokens)
        tokens = tokens[:, : int(positions.max()) + 1]  # the causal mask: later tokens never matter
        pooled = tower.encode_embeddings(tower.token_embeddings(tokens), positions)  # (n, width)
        root = weights.sqrt()[:, None]
        design, response = root * pooled, root * goal
        gram = design.T @ design + 1e-4 * torch.eye(width)
        projection = torch.linalg.solve(gram, design.T @ response)
        model.text_projection.copy_(projection)
        features = unit(pooled[: len(names)] @ projection)
        fit = (features * text).sum(dim=-1).mean().item()
    return model, fit
