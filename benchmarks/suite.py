"""Benchmark suite: does a mixture of prompts pay for itself on classes that look several ways?

Synthetic worlds (`suite_worlds.py`) × seeds × learners. In every world and for every learner the
suite trains a few recipes of `promptmix.MixtureOfPromptsLoss` and measures them beside the
references: one prompt per class, the uncured mixture (τ 1 → 0.05, no regularisers, sub-prompts
at the class text feature + noise), per-class spherical k-means of the training images (the
target) and the true look centres (the upper bound). On held-out images it measures accuracy
(with the loss's own `logits()`), the agreement of each image's sub-prompt with its true look
(NMI, per class, averaged), the dominant sub-prompt's share, the share of classes
`promptmix.detect_collapse` flags, and the sub-prompts' mean pairwise cosine.

Usage:

    python benchmarks/suite.py                 # the table and plots in docs/suite (~5 min)
    python benchmarks/suite.py --levers        # plus one lever at a time on the acceptance worlds
    python benchmarks/suite.py --quick         # one world, one seed, short training (seconds)
    python benchmarks/suite.py --worlds imbalanced --seeds 0 --recipes "defaults, text init"

Only full runs (all worlds, seeds 0 1 2) write into docs/suite; others write to `--out` or a
temporary folder.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score
from suite_worlds import WORLDS, Samples, World, WorldSpec, split_counts, synthetic_text_features
from torch import Tensor, nn

import promptmix
from promptmix import (
    AssignmentEntropy,
    DiversityLoss,
    MixtureOfPrompts,
    MixtureOfPromptsLoss,
    OffsetMixtureOfPrompts,
    SoftEMAssigner,
    SubpromptReviver,
    TemperatureSchedule,
    UsageEstimate,
    UsageFloor,
    diagnostics,
    initialize_from_kmeans,
)
from promptmix import functional as PF

DOCS_OUT = Path(__file__).resolve().parents[1] / "docs" / "suite"
LEARNERS = ("free", "offset", "mixture")
MAKES = ("Aurora", "Bexley", "Corvan", "Dunmore", "Elstar", "Fenwick", "Galt", "Harlow")
BODIES = ("Sedan", "Coupe", "SUV", "Convertible", "Hatchback", "Wagon", "Minivan", "Cab")


@dataclass(frozen=True)
class Training:
    """Optimiser settings shared by every recipe."""

    steps: int = 300
    batch_size: int = 128
    lr: float = 2e-3
    mixture_steps: int = 150  # the text-tower learner is ~20x slower per step
    init_noise_std: float = 0.1


@dataclass(frozen=True)
class Recipe:
    """A configuration of `MixtureOfPromptsLoss` and of the learner's initialisation.

    `None` takes the library's default, so the "defaults" recipes follow the library.
    """

    name: str
    init: str = "kmeans"  # "kmeans" (data-driven) or "text" (class text feature + noise)
    k: int | None = None  # None: the world's K
    mixture_weight: float | None = None
    diversity_weight: float | None = None
    diversity_margin: float | None = None
    entropy_weight: float | None = None
    entropy_mode: str | None = None
    assignment: str | None = None
    scale: float | None = None
    tau_start: float | None = None
    tau_end: float | None = None
    floor: float = 0.0  # UsageFloor weight (0: off)
    revive_every: int = 0  # steps between SubpromptReviver splits (0: off)

    def loss(self, num_classes: int, k: int, steps: int) -> MixtureOfPromptsLoss:
        schedule = TemperatureSchedule(total_steps=steps)
        start = self.tau_start if self.tau_start is not None else schedule.start
        end = self.tau_end if self.tau_end is not None else schedule.end
        assigner = SoftEMAssigner()
        mode = self.entropy_mode or AssignmentEntropy().mode
        entropy = AssignmentEntropy(mode=mode)  # type: ignore[arg-type]
        usage = None if mode == "sample" else UsageEstimate(num_classes=num_classes, n_subprompts=k)
        diversity = DiversityLoss()
        # A weight left as None keeps the loss's own default.
        weights = {
            name: value
            for name, value in (
                ("mixture_weight", self.mixture_weight),
                ("diversity_weight", self.diversity_weight),
                ("entropy_weight", self.entropy_weight),
            )
            if value is not None
        }
        return MixtureOfPromptsLoss(
            **weights,
            tau=TemperatureSchedule(start=start, end=end, total_steps=steps),
            assigner=SoftEMAssigner(
                mode=self.assignment or assigner.mode,  # type: ignore[arg-type]
                logit_scale=self.scale if self.scale is not None else assigner.logit_scale,
            ),
            entropy=entropy,
            usage_estimate=usage,
            diversity=DiversityLoss(
                margin=self.diversity_margin
                if self.diversity_margin is not None
                else diversity.margin
            ),
            regularizers={
                "usage": (UsageFloor(), self.floor)
            }
            if self.floor
            else None,
        )


UNCURED = Recipe(
    "uncured mixture",
    init="text",
    mixture_weight=1.0,
    diversity_weight=0.0,
    entropy_weight=0.0,
    tau_start=1.0,
    tau_end=0.05,
)
ONE_PROMPT = Recipe("one prompt per class", k=1)
DEFAULTS = Recipe("defaults, k-means init")
DEFAULTS_TEXT = Recipe("defaults, text init", init="text")
RECIPES = (ONE_PROMPT, UNCURED, DEFAULTS_TEXT, DEFAULTS)
#: The worlds the levers run on: the issue's acceptance tests, and K above the looks.
ACCEPTANCE = ("imbalanced", "shared looks", "K=8 on 4")


def lever_recipes() -> list[Recipe]:
    """One knob at a time from the recommendation (the defaults; k-means start unless "text")."""
    d, t = DEFAULTS, DEFAULTS_TEXT
    previous = dict(diversity_weight=0.1, entropy_weight=0.3, mixture_weight=1.0)
    return [
        replace(d, name="previous defaults (div 0.1, ent 0.3, mix 1)", **previous),
        replace(t, name="previous defaults, text init", **previous),
        replace(UNCURED, name="uncured, k-means init", init="kmeans"),
        replace(d, name="mixture weight 1", mixture_weight=1.0),
        replace(t, name="text init, mixture weight 1", mixture_weight=1.0),
        replace(d, name="entropy 0", entropy_weight=0.0),
        replace(t, name="text init, entropy 0.3", entropy_weight=0.3),
        replace(t, name="text init, entropy 3", entropy_weight=3.0),
        replace(d, name="diversity 0.1", diversity_weight=0.1),
        replace(t, name="text init, τ end 0.05", tau_end=0.05),
        replace(t, name="text init, τ start 3", tau_start=3.0),
        replace(d, name="E-step scale 30", scale=30.0),
        replace(t, name="text init, Sinkhorn E-step", assignment="sinkhorn"),
        replace(t, name="text init, entropy 0, usage floor 1", entropy_weight=0.0, floor=1.0),
        replace(t, name="text init, revive every 50", revive_every=50),
        replace(
            t, name="text init, entropy 0, revive every 50", entropy_weight=0.0, revive_every=50
        ),
    ]


# --------------------------------------------------------------------------- learners


class FreeSubprompts(nn.Module):
    """Free sub-prompt features `(num_classes, K, dim)`, started at the text features + noise."""

    def __init__(self, text: Tensor, k: int, noise_std: float, generator: torch.Generator):
        super().__init__()
        num_classes, dim = text.shape
        noise = torch.randn(num_classes, k, dim, generator=generator) * (noise_std / dim**0.5)
        self.features = nn.Parameter(text[:, None] + noise)
        self.init_noise_std = noise_std

    def forward(self) -> Tensor:
        return F.normalize(self.features, dim=-1)


def classnames(num_classes: int) -> list[str]:
    """Car-like class names; neighbours share a make or a body, so their text overlaps."""
    return [
        f"{MAKES[i % len(MAKES)]} M{i} {BODIES[(i // 2) % len(BODIES)]} {2000 + i % 13}"
        for i in range(num_classes)
    ]


def tiny_clip(dim: int) -> nn.Module:
    """A random-init open_clip CLIP small enough for CPU, with `dim`-dimensional features."""
    return open_clip.CLIP(
        embed_dim=dim,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=1, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=min(dim, 128), heads=2, layers=1),
    )


def make_learner(
    learner: str, spec: WorldSpec, k: int, seed: int, training: Training, model: nn.Module | None
) -> nn.Module:
    generator = torch.Generator().manual_seed(1000 * seed + k)
    if learner == "free":
        text = synthetic_text_features(
            spec.num_classes, spec.dim, torch.Generator().manual_seed(seed)
        )
        return FreeSubprompts(text, k, training.init_noise_std, generator)
    assert model is not None
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    names = classnames(spec.num_classes)
    if learner == "offset":
        return OffsetMixtureOfPrompts(
            model,
            tokenizer,
            names,
            n_subprompts=k,
            init_noise_std=training.init_noise_std,
            generator=generator,
        )
    return MixtureOfPrompts(
        model,
        tokenizer,
        names,
        n_subprompts=k,
        init_noise_std=training.init_noise_std,
        chunk_size=None,
        generator=generator,
    )


@dataclass
class Setup:
    """One seed of one world for one learner: the data and a model to build learners from."""

    spec: WorldSpec
    learner: str
    seed: int
    world: World
    train: Samples
    test: Samples
    model: nn.Module | None


def make_setup(spec: WorldSpec, learner: str, seed: int, training: Training) -> Setup:
    model = None
    if learner != "free":
        torch.manual_seed(seed)
        model = tiny_clip(spec.dim)
    anchor = make_learner(learner, spec, 1, seed, training, model)
    with torch.no_grad():
        text = anchor()[:, 0]
    generator = torch.Generator().manual_seed(seed)
    world = World.draw(spec, text, generator)
    return Setup(
        spec,
        learner,
        seed,
        world,
        world.sample(spec.shots, generator),
        world.sample(spec.test_per_class, generator),
        model,
    )


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    subprompt_features: Tensor, test: Samples, loss_fn: MixtureOfPromptsLoss
) -> dict[str, float]:
    """Accuracy (the loss's own `logits()`), NMI with the true looks, usage and collapse."""
    num_classes, k, _ = subprompt_features.shape
    logits = loss_fn.logits(test.features, subprompt_features)
    own = PF.own_class_similarities(test.features, subprompt_features, test.labels)
    assigned = own.argmax(dim=-1)
    hard = F.one_hot(assigned, k).float()
    usage = diagnostics.subprompt_usage(hard, test.labels, num_classes=num_classes)
    shares = diagnostics.dominant_share(usage)
    cosine = diagnostics.mean_pairwise_cosine(subprompt_features)
    report = promptmix.detect_collapse(subprompt_features, hard, test.labels)
    nmi = [
        normalized_mutual_info_score(
            test.looks[test.labels == c].numpy(), assigned[test.labels == c].numpy()
        )
        for c in range(num_classes)
    ]
    many = k > 1
    return {
        "accuracy": (logits.argmax(dim=-1) == test.labels).float().mean().item(),
        "nmi": float(np.mean(nmi)),
        "dominant": shares.mean().item(),
        "collapsed": len(report.collapsed_classes) / num_classes if many else float("nan"),
        "share_collapsed": (shares > 0.9).float().mean().item() if many else float("nan"),
        "cosine": cosine.mean().item() if many else float("nan"),
        "max_cosine": cosine.max().item() if many else float("nan"),
    }


def train(recipe: Recipe, setup: Setup, training: Training) -> dict[str, float]:
    """Train one recipe's learner on one setup; the held-out metrics at the end."""
    spec = setup.spec
    k = recipe.k or spec.n_subprompts
    steps = training.mixture_steps if setup.learner == "mixture" else training.steps
    learner = make_learner(setup.learner, spec, k, setup.seed, training, setup.model)
    if recipe.init == "kmeans":
        initialize_from_kmeans(
            learner,
            setup.train.features,
            setup.train.labels,
            generator=torch.Generator().manual_seed(setup.seed),
        )
    loss_fn = recipe.loss(spec.num_classes, k, steps)
    parameters = [p for p in learner.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=training.lr)
    generator = torch.Generator().manual_seed(10_000 + setup.seed)
    images, labels = setup.train.features, setup.train.labels
    estimate = loss_fn.usage_estimate
    reviver = SubpromptReviver(estimate) if recipe.revive_every and estimate else None
    for step in range(steps):
        batch = torch.randperm(len(labels), generator=generator)[: training.batch_size]
        features = learner()
        out = loss_fn(images[batch], features, labels[batch])
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        loss_fn.schedule.step()  # type: ignore[union-attr]
        if reviver is not None and (step + 1) % recipe.revive_every == 0 and step + 1 < steps:
            reviver.revive_(parameters[0], generator=generator)  # the loss's usage estimate
    with torch.no_grad():
        features = learner()
    return evaluate(features, setup.test, loss_fn)


def references(setup: Setup) -> dict[str, dict[str, float]]:
    """Per-class k-means of the training images (untrained) and the true look centres."""
    spec = setup.spec
    loss_fn = MixtureOfPromptsLoss()
    centroids = PF.kmeans_subprompts(
        setup.train.features,
        setup.train.labels,
        num_classes=spec.num_classes,
        n_subprompts=spec.n_subprompts,
        generator=torch.Generator().manual_seed(setup.seed),
    )
    return {
        KMEANS: evaluate(centroids, setup.test, loss_fn),
        TRUE: evaluate(setup.world.look_centres(), setup.test, loss_fn),
    }


# --------------------------------------------------------------------------- report

KMEANS = "k-means per class (target)"
TRUE = "true look centres (upper bound)"
METRICS = ("accuracy", "nmi", "dominant", "collapsed", "share_collapsed", "cosine", "max_cosine")
Stats = dict[str, tuple[float, float]]


def summarise(values: Sequence[dict[str, float]]) -> Stats:
    return {
        m: (
            float(np.nanmean([v[m] for v in values]))
            if not all(math.isnan(v[m]) for v in values)
            else float("nan"),
            float(np.std([v[m] for v in values])),
        )
        for m in METRICS
    }


def fmt(stats: Stats | None, metric: str, std: bool = False) -> str:
    if stats is None:
        return "–"
    mean, spread = stats[metric]
    if math.isnan(mean):
        return "–"
    if metric in ("accuracy", "collapsed", "share_collapsed"):
        text = f"{100 * mean:.1f}" if metric == "accuracy" else f"{100 * mean:.0f}"
        return text + (f" ± {100 * spread:.1f}" if std and metric == "accuracy" else "")
    return f"{mean:.2f}"


def checks(
    results: dict[tuple[str, str, str], Stats], worlds: Sequence[str], learners: Sequence[str]
) -> list[tuple[str, str, list[str]]]:
    """The issue's targets per world and learner: (world, learner, [verdict strings])."""
    rows = []
    for world in worlds:
        spec = WORLDS[world]
        for learner in learners:
            cured = results.get((world, learner, DEFAULTS.name))
            if cured is None:
                continue
            kmeans = results.get((world, "free", KMEANS))
            uncured = results[world, learner, UNCURED.name]
            text = results[world, learner, DEFAULTS_TEXT.name]
            acc = cured["accuracy"][0]
            verdicts = []
            if kmeans is not None:
                gap = 100 * (acc - kmeans["accuracy"][0])
                verdicts.append(f"{'pass' if gap >= -1 else 'FAIL'} {gap:+.1f} vs k-means")
            margin = 100 * (acc - uncured["accuracy"][0])
            need = 1.0 if uncured["accuracy"][0] < 0.98 else 0.0
            verdicts.append(f"{'pass' if margin >= need else 'FAIL'} {margin:+.1f} vs uncured")
            per_look = min(split_counts(spec.shots, spec.frequencies()))
            if spec.n_subprompts == spec.n_looks and per_look >= 8:
                nmi = cured["nmi"][0]
                verdicts.append(f"{'pass' if nmi >= 0.85 else 'FAIL'} NMI {nmi:.2f}")
            share = cured["share_collapsed"][0]
            verdicts.append(
                f"{'pass' if share == 0 else 'FAIL'} {100 * share:.0f} % share-collapsed"
            )
            text_margin = 100 * (text["accuracy"][0] - uncured["accuracy"][0])
            verdicts.append(f"{'pass' if text_margin > 0 else 'FAIL'} text init {text_margin:+.1f}")
            rows.append((world, learner, verdicts))
    return rows


def world_line(spec: WorldSpec) -> str:
    freq = "/".join(f"{100 * f:.0f}" for f in spec.frequencies())
    return (
        f"{spec.num_classes} classes × {spec.n_looks} looks ({freq} %), K = {spec.n_subprompts}, "
        f"{spec.shots} shots, dim {spec.dim}"
        + (
            f", looks {100 * spec.shared_looks:.0f} % shared across classes"
            if spec.shared_looks
            else ""
        )
        + f": {spec.note}"
    )


def write_markdown(
    out: Path,
    results: dict[tuple[str, str, str], Stats],
    worlds: Sequence[str],
    learners: Sequence[str],
    lever_rows: Sequence[tuple[str, str, Stats]],
    training: Training,
    seeds: Sequence[int],
    command: str,
) -> Path:
    lines = [
        f"<!-- Generated by `{command}`; do not edit by hand. -->\n\n",
        f"Mean over seeds {list(seeds)}. Training: {training.steps} Adam steps (lr "
        f"{training.lr:g}, batch {training.batch_size}; `MixtureOfPrompts`: "
        f"{training.mixture_steps} steps), τ linear from its start to its end, logit scale 100. "
        "Accuracy from the loss's own `logits()` (logsumexp over sub-prompts) on 64 held-out "
        "images per class; NMI: each held-out image's best sub-prompt against its true look, "
        "per class, averaged; dominant: the most used sub-prompt's share (argmax), averaged over "
        "classes; collapsed: share of classes `detect_collapse` flags (mean sub-prompt cosine "
        "> 0.9 or dominant share > 0.9); cos: the sub-prompts' mean pairwise cosine. "
        "The references (k-means, true looks) use no training and no learner.\n\n",
        "### Targets (recommended: the library's defaults with `initialize_from_kmeans`)\n\n",
        "| world | learner | checks |\n|---|---|---|\n",
    ]
    for world, learner, verdicts in checks(results, worlds, learners):
        lines.append(f"| {world} | {learner} | {' · '.join(verdicts)} |\n")
    lines.append("\n")
    for learner in learners:
        more = results.get(("K=8 on 4", learner, DEFAULTS.name))
        equal = results.get(("balanced", learner, DEFAULTS.name))
        if more and equal:
            gap = 100 * (more["accuracy"][0] - equal["accuracy"][0])
            lines.append(
                f"- {'pass' if gap >= 0 else 'FAIL'} K = 8 against K = 4 on the same 4 looks "
                f"({learner}): {gap:+.1f} points.\n"
            )
    true_rows = [(w, results[w, "free", TRUE]) for w in worlds if (w, "free", TRUE) in results]
    if true_rows:
        flagged = max(stats["collapsed"][0] for _, stats in true_rows)
        highest = max(stats["max_cosine"][0] for _, stats in true_rows)
        lines.append(
            f"- {'pass' if flagged == 0 else 'FAIL'} `detect_collapse` flags {100 * flagged:.0f} "
            f"% of the true look centres' classes in the worst world; the highest per-class mean "
            f"cosine of true looks is {highest:.2f} (threshold 0.9).\n"
        )
    lines.append("\n### Results\n\n")
    contenders = [KMEANS, TRUE, *(r.name for r in RECIPES)]
    for world in worlds:
        spec = WORLDS[world]
        lines.append(f"#### {world}\n\n{world_line(spec)}.\n\n")
        header = "| contender | " + " | ".join(
            f"{learner} acc % | NMI | dominant" for learner in spec.learners if learner in learners
        )
        lines.append(header + " | collapsed % (free) | cos (free) |\n")
        count = 3 * len([x for x in spec.learners if x in learners]) + 2
        lines.append("|---" * (count + 1) + "|\n")
        for name in contenders:
            cells = []
            for learner in spec.learners:
                if learner not in learners:
                    continue
                stats = results.get((world, learner, name)) or (
                    results.get((world, "free", name)) if name in (KMEANS, TRUE) else None
                )
                if name in (KMEANS, TRUE) and learner != "free":
                    stats = None  # learner-independent: shown once
                cells += [
                    fmt(stats, "accuracy", std=True),
                    fmt(stats, "nmi"),
                    fmt(stats, "dominant"),
                ]
            free = results.get((world, "free", name))
            cells += [fmt(free, "collapsed"), fmt(free, "cosine")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |\n")
        lines.append("\n")
    if lever_rows:
        lines.append("### Levers (free vectors, one knob at a time from the recommendation)\n\n")
        lever_worlds = list(dict.fromkeys(w for w, _, _ in lever_rows))
        lines.append(
            "| lever | " + " | ".join(f"{w}: acc % | NMI | dominant" for w in lever_worlds) + " |\n"
        )
        lines.append("|---" * (1 + 3 * len(lever_worlds)) + "|\n")
        names = list(dict.fromkeys(n for _, n, _ in lever_rows))
        table = {(w, n): s for w, n, s in lever_rows}
        for name in names:
            cells = []
            for w in lever_worlds:
                stats = table.get((w, name))
                cells += [
                    fmt(stats, "accuracy", std=True),
                    fmt(stats, "nmi"),
                    fmt(stats, "dominant"),
                ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |\n")
        lines.append("\n")
    path = out / "results.md"
    path.write_text("".join(lines))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one world, one seed, short runs")
    parser.add_argument("--levers", action="store_true", help="also one knob at a time")
    parser.add_argument("--worlds", nargs="*", default=None, choices=list(WORLDS))
    parser.add_argument("--learners", nargs="*", default=None, choices=LEARNERS)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="*", default=None, help="names of recipes to run")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.md and plots")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)  # tiny softmax tails otherwise slow the CPU several-fold
    torch.set_num_threads(1)  # small tensors: one thread is as fast and steadier when shared
    training = Training(steps=60, mixture_steps=10) if args.quick else Training()
    worlds = args.worlds or (["imbalanced"] if args.quick else list(WORLDS))
    seeds = [0] if args.quick else args.seeds
    learners = args.learners or (["free"] if args.quick else list(LEARNERS))
    full = (
        not args.quick
        and args.worlds is None
        and args.learners is None
        and (args.recipes is None and seeds == [0, 1, 2])
    )
    out = args.out or (DOCS_OUT if full else Path(tempfile.gettempdir()) / "promptmix-suite")
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.recipes) if args.recipes else None
    start = time.perf_counter()
    results: dict[tuple[str, str, str], Stats] = {}
    lever_rows: list[tuple[str, str, Stats]] = []
    levers = lever_recipes() if args.levers else []
    for world in worlds:
        spec = WORLDS[world]
        for learner in spec.learners:
            if learner not in learners:
                continue
            phase = time.perf_counter()
            runs: dict[str, list[dict[str, float]]] = {}
            lever_runs: dict[str, list[dict[str, float]]] = {}
            for seed in seeds:
                setup = make_setup(spec, learner, seed, training)
                if learner == "free":
                    for name, values in references(setup).items():
                        runs.setdefault(name, []).append(values)
                for recipe in RECIPES:
                    if learner == "mixture" and recipe is ONE_PROMPT:
                        continue  # the slow learner: only the mixtures it is there to test
                    if wanted is None or recipe.name in wanted:
                        runs.setdefault(recipe.name, []).append(train(recipe, setup, training))
                if learner == "free" and world in ACCEPTANCE:
                    for recipe in levers:
                        if wanted is None or recipe.name in wanted:
                            lever_runs.setdefault(recipe.name, []).append(
                                train(recipe, setup, training)
                            )
            for name, values in runs.items():
                results[world, learner, name] = stats = summarise(values)
                print(
                    f"{world:13s} {learner:7s} {name:34s} "
                    + "  ".join(f"{m} {fmt(stats, m)}" for m in METRICS),
                    flush=True,
                )
            for name, values in lever_runs.items():
                lever_rows.append((world, name, summarise(values)))
                print(
                    f"{world:13s} lever   {name:34s} "
                    + "  ".join(f"{m} {fmt(lever_rows[-1][2], m)}" for m in METRICS),
                    flush=True,
                )
            print(f"  ({time.perf_counter() - phase:.1f} s)", flush=True)

    import suite_plots  # matplotlib only when running

    command = "python benchmarks/suite.py" + (" --levers" if args.levers else "")
    path = write_markdown(out, results, worlds, learners, lever_rows, training, seeds, command)
    contenders = [KMEANS, UNCURED.name, ONE_PROMPT.name, DEFAULTS_TEXT.name, DEFAULTS.name]
    plots = [
        suite_plots.contenders_by_world(
            out / f"{learner}.png",
            {
                key if key[2] not in (KMEANS, TRUE) else (key[0], learner, key[2]): value
                for key, value in results.items()
                if key[1] in (learner, "free") and (key[1] == learner or key[2] in (KMEANS, TRUE))
            },
            [w for w in worlds if learner in WORLDS[w].learners],
            learner,
            contenders,
            f"{learner}: mean over seeds {seeds}",
        )
        for learner in learners
        if any(key[1] == learner for key in results)
    ]
    if lever_rows:
        plots.append(
            suite_plots.levers(
                out / "levers.png",
                lever_rows,
                list(dict.fromkeys(w for w, _, _ in lever_rows)),
                "levers, free vectors",
            )
        )
    print(f"wrote {path} and {', '.join(str(p) for p in plots)}")
    print(f"wall time {time.perf_counter() - start:.1f} s (torch on 1 thread)")


if __name__ == "__main__":
    main()
