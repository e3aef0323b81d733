"""Base-to-new benchmark of the field's regularizers on a synthetic CLIP-like world.

The question each regularizer answers: does it keep what the hand-crafted prompts know about
classes that training never sees? The world is built so that it can:

- a frozen random "text tower" `f(context, class_embedding)` (a 2-layer tanh MLP) plays CLIP's
  text encoder; hand-crafted prompts are M fixed contexts (templates), and their features,
  averaged over templates, are the zero-shot classifier and the anchors;
- each class's images cluster around its hand-crafted text feature plus a class-specific residual
  the text does not predict (so zero-shot accuracy is good, not perfect), with image noise;
- classes are split into base (trained on, few shots) and new (never seen). The learner is a
  CoOp-style mixture: K learned contexts shared by all classes, fed through the frozen tower, so
  what training does to the contexts carries over to the new classes.

Plain training fits the base classes' residuals with the shared contexts and drifts away from
the hand-crafted geometry that the new classes rely on; the regularizers that tie the learned
prompts to the hand-crafted ones (anchor, zero-shot consistency, text-to-text) should keep the
new-class accuracy. Every run trains `MixtureOfPromptsLoss` (K sub-prompts, its defaults) with
one regularizer added through `regularizers=`, at the original paper's weight; ProGrad and prompt
averaging wrap the plain loss.

Usage:

    python benchmarks/regularizers.py            # full run, writes docs/regularizers/results.md
    python benchmarks/regularizers.py --quick    # one seed, fewer steps (seconds)
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import promptmix
from promptmix import (
    GaussianPromptAverage,
    InterClassDispersion,
    MixtureOfPromptsLoss,
    PromptAnchor,
    TextToTextLoss,
    ZeroShotConsistency,
    prograd_backward,
)
from promptmix import functional as PF

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "regularizers" / "results.md"


@dataclass
class World:
    """The frozen tower, the classes and their hand-crafted features."""

    w1: Tensor
    b1: Tensor
    w2: Tensor
    class_embeddings: Tensor  # (C, E)
    template_contexts: Tensor  # (M, n_ctx * E)
    templates: Tensor  # (M, C, D) hand-crafted features per template
    hand_crafted: Tensor  # (C, D) unit template-ensemble mean
    centers: Tensor  # (C, D) unit image-cluster centres
    base: Tensor  # class indices
    new: Tensor

    def text(self, contexts: Tensor, classes: Tensor) -> Tensor:
        """Tower output `(C, K, D)` of `contexts` `(K, n_ctx * E)` for `classes`."""
        embeddings = self.class_embeddings[classes]
        c, k = embeddings.shape[0], contexts.shape[0]
        inputs = torch.cat(
            [contexts.unsqueeze(0).expand(c, k, -1), embeddings.unsqueeze(1).expand(c, k, -1)],
            dim=-1,
        )
        return torch.tanh(inputs @ self.w1 + self.b1) @ self.w2


def make_world(args: argparse.Namespace, seed: int) -> World:
    g = torch.Generator().manual_seed(seed)
    token, n_ctx, dim, hidden = args.token_dim, args.n_ctx, args.dim, args.hidden
    inputs = (n_ctx + 1) * token
    w1 = torch.randn(inputs, hidden, generator=g) / inputs**0.5
    b1 = 0.1 * torch.randn(hidden, generator=g)
    w2 = torch.randn(hidden, dim, generator=g) / hidden**0.5
    classes = args.base_classes + args.new_classes
    class_embeddings = torch.randn(classes, token, generator=g)
    photo_of_a = torch.randn(n_ctx * token, generator=g)
    template_contexts = photo_of_a + args.template_spread * torch.randn(
        args.templates, n_ctx * token, generator=g
    )
    world = World(
        w1,
        b1,
        w2,
        class_embeddings,
        template_contexts,
        None,
        None,
        None,
        None,
        None,  # type: ignore[arg-type]
    )
    everyone = torch.arange(classes)
    world.templates = world.text(template_contexts, everyone).transpose(0, 1)  # (M, C, D)
    world.hand_crafted = F.normalize(F.normalize(world.templates, dim=-1).mean(0), dim=-1)
    # What the images really look like: the tower at a context the templates only approximate
    # (learnable, it helps base and new classes alike), plus a class residual no context
    # predicts (fitting it on few shots is overfitting).
    true_context = photo_of_a + args.context_shift * torch.randn(n_ctx * token, generator=g)
    truth = F.normalize(world.text(true_context.unsqueeze(0), everyone).squeeze(1), dim=-1)
    residual = torch.randn(classes, dim, generator=g) / dim**0.5
    world.centers = F.normalize(truth + args.residual * residual, dim=-1)
    order = torch.randperm(classes, generator=g)
    world.base, world.new = order[: args.base_classes], order[args.base_classes :]
    return world


def sample_images(world: World, classes: Tensor, per_class: int, noise: float, g) -> tuple:
    """`per_class` images of each of `classes`; labels index into `classes`."""
    labels = torch.arange(len(classes)).repeat_interleave(per_class)
    centers = world.centers[classes][labels]
    images = centers + noise * torch.randn(centers.shape, generator=g) / centers.shape[-1] ** 0.5
    return F.normalize(images, dim=-1), labels


class Learner(nn.Module):
    """K learned contexts shared by all classes, started at "a photo of a" plus noise."""

    def __init__(self, world: World, k: int, g: torch.Generator):
        super().__init__()
        start = world.template_contexts.mean(0)
        self.contexts = nn.Parameter(start + 0.1 * torch.randn(k, start.numel(), generator=g))
        self.world = world

    def forward(self, classes: Tensor) -> Tensor:
        return self.world.text(self.contexts, classes)


def accuracy(world: World, learner: Learner | None, classes: Tensor, test) -> float:
    images, labels = test
    with torch.no_grad():
        prompts = world.hand_crafted[classes].unsqueeze(1) if learner is None else learner(classes)
        logits = MixtureOfPromptsLoss().logits(images, prompts)
    return float((logits.argmax(-1) == labels).float().mean())


Method = tuple[str, str, Callable[[World], dict], str]


def methods() -> list[Method]:
    """(name, source and weight, regularizers factory, step kind)."""
    return [
        ("plain", "MixtureOfPromptsLoss defaults", lambda w: {}, "plain"),
        (
            "anchor (cosine)",
            "KgCoOp, w = 8",
            lambda w: {"anchor": (PromptAnchor(anchor_features=w.hand_crafted[w.base]), 8.0)},
            "plain",
        ),
        (
            "anchor (L1)",
            "PromptSRC text term, w = 25",
            lambda w: {
                "anchor": (
                    PromptAnchor(distance="l1", anchor_features=w.hand_crafted[w.base]),
                    25.0,
                )
            },
            "plain",
        ),
        (
            "zero-shot KL",
            "ZeroShotConsistency(), w = 1",
            lambda w: {
                "consistency": (
                    ZeroShotConsistency(zero_shot_text_features=w.hand_crafted[w.base]),
                    1.0,
                )
            },
            "plain",
        ),
        (
            "PromptSRC (KL + L1 text)",
            "average_over_classes, text_weight = 25, w = 1",
            lambda w: {
                "consistency": (
                    ZeroShotConsistency(
                        average_over_classes=True,
                        text_weight=25.0,
                        zero_shot_text_features=w.hand_crafted[w.base],
                    ),
                    1.0,
                )
            },
            "plain",
        ),
        (
            "text-to-text",
            "LASP, w = 5",
            lambda w: {"text": (TextToTextLoss(template_features=w.templates[:, w.base]), 5.0)},
            "plain",
        ),
        (
            "inter-class dispersion",
            "DAPT text term, w = 0.1",
            lambda w: {"dispersion": (InterClassDispersion(), 0.1)},
            "plain",
        ),
        ("ProGrad", "projection against the zero-shot KL, lambda = 1", lambda w: {}, "prograd"),
        ("prompt averaging", "PromptSRC GPA, mu = 0.75 E, sigma = 0.05 E", lambda w: {}, "gpa"),
    ]


def train(world: World, method: Method, args: argparse.Namespace, seed: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed + 1)
    _, _, make_regularizers, kind = method
    train_images, train_labels = sample_images(world, world.base, args.shots, args.noise, g)
    learner = Learner(world, args.k, g)
    loss_fn = MixtureOfPromptsLoss(regularizers=make_regularizers(world))
    consistency = ZeroShotConsistency(zero_shot_text_features=world.hand_crafted[world.base])
    optimizer = torch.optim.Adam(learner.parameters(), lr=args.lr)
    steps_per_epoch = -(-len(train_labels) // args.batch)
    average = None
    if kind == "gpa":
        average = GaussianPromptAverage(
            learner,
            total_epochs=args.epochs,
            mean=0.75 * args.epochs,
            std=max(1.0, 0.05 * args.epochs),
        )
    for _ in range(args.epochs):
        order = torch.randperm(len(train_labels), generator=g)
        for step in range(steps_per_epoch):
            index = order[step * args.batch : (step + 1) * args.batch]
            prompts = learner(world.base)
            out = loss_fn(train_images[index], prompts, train_labels[index])
            optimizer.zero_grad()
            if kind == "prograd":
                logits = loss_fn.logits(train_images[index], prompts)  # with gradient
                reference = consistency(logits, image_features=train_images[index])
                prograd_backward(out["loss"], reference, learner.parameters())
            else:
                out["loss"].backward()
            optimizer.step()
        if average is not None:
            average.update()
    if average is not None:
        average.copy_to()
    base_test = sample_images(world, world.base, args.test_per_class, args.noise, g)
    new_test = sample_images(world, world.new, args.test_per_class, args.noise, g)
    base = accuracy(world, learner, world.base, base_test)
    new = accuracy(world, learner, world.new, new_test)
    drift = float(PF.prompt_anchor_loss(learner(world.new).detach(), world.hand_crafted[world.new]))
    return {"base": base, "new": new, "drift": drift}


def zero_shot(world: World, args: argparse.Namespace, seed: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed + 1)
    sample_images(world, world.base, args.shots, args.noise, g)  # same test draws as training
    Learner(world, args.k, g)
    base_test = sample_images(world, world.base, args.test_per_class, args.noise, g)
    new_test = sample_images(world, world.new, args.test_per_class, args.noise, g)
    return {
        "base": accuracy(world, None, world.base, base_test),
        "new": accuracy(world, None, world.new, new_test),
        "drift": 0.0,
    }


def harmonic(base: float, new: float) -> float:
    return 2 * base * new / (base + new) if base + new else 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer epochs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--base-classes", type=int, default=20)
    parser.add_argument("--new-classes", type=int, default=20)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--k", type=int, default=4, help="sub-prompts per class")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--token-dim", type=int, default=16)
    parser.add_argument("--n-ctx", type=int, default=2)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--templates", type=int, default=4)
    parser.add_argument("--template-spread", type=float, default=0.3)
    parser.add_argument("--context-shift", type=float, default=0.0)
    parser.add_argument("--residual", type=float, default=0.6)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=None, help="table file (default: docs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 1, 10
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows: dict[str, list[dict[str, float]]] = {}
    sources = {"zero-shot (hand-crafted)": "no training"}
    for seed in range(args.seeds):
        world = make_world(args, seed)
        rows.setdefault("zero-shot (hand-crafted)", []).append(zero_shot(world, args, seed))
        for method in methods():
            sources[method[0]] = method[1]
            rows.setdefault(method[0], []).append(train(world, method, args, seed))
    elapsed = time.perf_counter() - start
    header = (
        "| method | source, weight | base acc | new acc | H | new-class drift |\n"
        "|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, results in rows.items():
        base = np.array([r["base"] for r in results]) * 100
        new = np.array([r["new"] for r in results]) * 100
        h = np.array([harmonic(r["base"], r["new"]) for r in results]) * 100
        drift = np.array([r["drift"] for r in results])
        lines.append(
            f"| {name} | {sources[name]} | {base.mean():.1f} ± {base.std():.1f} | "
            f"{new.mean():.1f} ± {new.std():.1f} | {h.mean():.1f} | {drift.mean():.3f} |"
        )
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/regularizers.py", *given])
    footer = (
        f"\nMean ± std over {args.seeds} seed(s); {args.base_classes} base / {args.new_classes} "
        f"new classes, {args.shots} shots, K = {args.k}, {args.epochs} epochs. Accuracy in %, "
        "base classes among base, new among new; H is the harmonic mean; drift is the mean "
        "cosine distance of the learned new-class prompts to their hand-crafted features. "
        f"`{command}`: {elapsed:.0f} s on CPU ({platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, promptmix {promptmix.__version__}).\n"
    )
    table = header + "\n".join(lines) + "\n" + footer
    print(table)
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
