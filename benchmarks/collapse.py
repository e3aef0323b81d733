"""Mode-collapse benchmark: does each promptmix configuration find the modes the data really has?

Synthetic CLIP-like image features (``collapse_data.py``): every class is a mixture of true modes,
with realistic cosines (image-text about 0.2, a modality gap, overlapping classes). Sub-prompts
start, as in CoOp mixtures, at their class's text feature plus a little noise, and are trained
with :class:`promptmix.MixtureOfPromptsLoss` in two parameterisations:

- ``free``: an ``nn.Parameter`` ``(num_classes, K, dim)`` initialised at synthetic text features;
- ``offset``: :class:`promptmix.OffsetMixtureOfPrompts` on a tiny random-init open_clip
  model, whose text features (of car-like class names) anchor the synthetic image features.

For each configuration and seed it measures, on held-out images: the sub-prompts' mean pairwise
cosine, the dominant sub-prompt's share and the effective number of sub-prompts in use
(:mod:`promptmix.diagnostics`), the share of classes :func:`promptmix.detect_collapse` flags, the
agreement of sub-prompt assignments with the true modes (NMI and ARI, per class, averaged) and the
classification accuracy. It writes ``docs/collapse/results.md`` and ``docs/collapse/*.png``.

Usage::

    python benchmarks/collapse.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/collapse.py --quick    # smoke run (seconds)
    python benchmarks/collapse.py --no-sweep --shots 16 --batch-size 32   # a harder variant

Only the full default run writes into ``docs/collapse``; the others write to ``--out`` or to a
temporary folder (printed at the end).
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from collapse_data import Samples, SyntheticWorld, car_classnames, synthetic_text_features
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import Tensor, nn

import promptmix
from promptmix import (
    AssignmentEntropy,
    DiversityLoss,
    MixtureOfPromptsLoss,
    OffsetMixtureOfPrompts,
    SoftEMAssigner,
    TemperatureSchedule,
    diagnostics,
    objective,
)
from promptmix import functional as PF

DOCS_OUT = Path(__file__).resolve().parents[1] / "docs" / "collapse"
PARAMETERISATIONS = ("free", "offset")
METRICS = ("cosine", "dominant", "effective", "collapsed", "nmi", "ari", "accuracy", "image_cos")


@dataclass(frozen=True)
class Size:
    """Problem and training sizes."""

    num_classes: int = 16
    n_modes: int = 4
    n_subprompts: int = 4
    dim: int = 512
    shots: int = 32
    test_per_class: int = 64
    steps: int = 300
    batch_size: int = 128
    lr: float = 2e-3
    init_noise_std: float = 0.1
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_every: int = 25


QUICK = Size(num_classes=8, shots=16, test_per_class=32, steps=60, seeds=(0,), eval_every=20)


@dataclass(frozen=True)
class Config:
    """One configuration of :class:`promptmix.MixtureOfPromptsLoss` and its temperature."""

    name: str
    diversity_weight: float = 0.1
    entropy_weight: float = 0.01
    entropy_mode: str = "sample"
    assignment: str = "soft"
    tau_start: float = 1.0
    tau_end: float = 0.3
    diversity_margin: float = 0.0

    def describe(self) -> str:
        entropy = (
            "off"
            if self.entropy_weight == 0 or self.assignment == "hard"
            else f"{self.entropy_mode} {self.entropy_weight:g}"
        )
        margin = f" (margin {self.diversity_margin:g})" if self.diversity_margin else ""
        tau = (
            f"{self.tau_end:g} fixed"
            if self.tau_start == self.tau_end
            else f"{self.tau_start:g} → {self.tau_end:g}"
        )
        return f"{self.diversity_weight:g}{margin} | {entropy} | {self.assignment} | {tau}"

    def loss(self, size: Size) -> MixtureOfPromptsLoss:
        return MixtureOfPromptsLoss(
            diversity_weight=self.diversity_weight,
            entropy_weight=self.entropy_weight,
            tau=TemperatureSchedule(self.tau_start, self.tau_end, total_steps=size.steps),
            assigner=SoftEMAssigner(self.assignment),  # type: ignore[arg-type]
            entropy=AssignmentEntropy(
                self.entropy_mode,  # type: ignore[arg-type]
                num_classes=size.num_classes,
                n_subprompts=size.n_subprompts,
            ),
            diversity=DiversityLoss(margin=self.diversity_margin),
        )


DESIGN_NOTE = Config("design-note fix")
# What the sweep below supports (docs/tuning.md): marginal entropy strong enough to keep every
# sub-prompt in use, a softer start of the temperature schedule, and a diversity margin at the
# cosine that a class's true modes have in CLIP space, so the term only acts on near-duplicates.
RECOMMENDED = Config(
    "recommended",
    entropy_weight=0.3,
    entropy_mode="marginal",
    tau_start=3.0,
    diversity_margin=0.8,
)
# What a user gets without choosing: MixtureOfPromptsLoss's default weights and entropy mode,
# with a TemperatureSchedule at its default start and end.
PROMPTMIX_DEFAULTS = Config(
    "promptmix defaults",
    diversity_weight=objective.DEFAULT_DIVERSITY_WEIGHT,
    entropy_weight=objective.DEFAULT_ENTROPY_WEIGHT,
    entropy_mode=objective.DEFAULT_ENTROPY_MODE,
)
CONFIGS = (
    Config("before (design note)", diversity_weight=0.0, entropy_weight=0.0, tau_end=0.05),
    DESIGN_NOTE,
    PROMPTMIX_DEFAULTS,
    replace(DESIGN_NOTE, name="entropy marginal", entropy_mode="marginal"),
    replace(DESIGN_NOTE, name="entropy mutual_information", entropy_mode="mutual_information"),
    replace(DESIGN_NOTE, name="assignment sinkhorn", assignment="sinkhorn"),
    replace(DESIGN_NOTE, name="assignment hard", assignment="hard"),
    RECOMMENDED,
)


def sweep_configs() -> list[Config]:
    """One knob at a time: the design note's tuning advice, then around the recommendation."""
    note = DESIGN_NOTE
    configs = [
        replace(note, name="design-note fix"),
        replace(note, name="loss defaults, fixed τ 0.3", tau_start=0.3),
        replace(note, name="note: diversity 0.2", diversity_weight=0.2),
        replace(note, name="note: diversity 1", diversity_weight=1.0),
        replace(note, name="note: entropy 0.02", entropy_weight=0.02),
        replace(note, name="note: entropy 0.3", entropy_weight=0.3),
        replace(note, name="note: τ end 0.5", tau_end=0.5),
        replace(note, name="note: τ end 1", tau_end=1.0),
    ]
    base = RECOMMENDED
    configs.append(base)
    for weight in (0.01, 0.03, 0.1, 1.0):
        configs.append(replace(base, name=f"marginal {weight:g}", entropy_weight=weight))
    configs.append(replace(base, name="mutual_information 0.3", entropy_mode="mutual_information"))
    configs.append(replace(base, name="sample 0.3", entropy_mode="sample"))
    configs.append(replace(base, name="diversity 0", diversity_weight=0.0))
    configs.append(replace(base, name="diversity 0.3", diversity_weight=0.3))
    for margin in (0.0, 0.5):
        configs.append(replace(base, name=f"margin {margin:g}", diversity_margin=margin))
    configs.append(replace(base, name="fixed τ 0.3", tau_start=0.3))
    for tau_start in (1.0, 10.0):
        configs.append(replace(base, name=f"τ start {tau_start:g}", tau_start=tau_start))
    for tau_end in (0.05, 1.0):
        configs.append(replace(base, name=f"τ end {tau_end:g}", tau_end=tau_end))
    configs.append(replace(base, name="sinkhorn", assignment="sinkhorn"))
    configs.append(replace(base, name="hard", assignment="hard"))
    return configs


class FreeSubprompts(nn.Module):
    """Free sub-prompt feature vectors ``(num_classes, K, dim)``, started at the text features."""

    def __init__(
        self,
        text_features: Tensor,
        n_subprompts: int,
        init_noise_std: float,
        generator: torch.Generator,
    ):
        super().__init__()
        num_classes, dim = text_features.shape
        noise = torch.randn(num_classes, n_subprompts, dim, generator=generator)
        start = text_features[:, None] + noise * (init_noise_std / math.sqrt(dim))
        self.features = nn.Parameter(start)

    def forward(self) -> Tensor:
        return F.normalize(self.features, dim=-1)


@dataclass
class Setup:
    """One seed's world, data and untrained sub-prompts (copied for every configuration)."""

    world: SyntheticWorld
    train: Samples
    test: Samples
    subprompts: nn.Module


def tiny_clip(dim: int) -> nn.Module:
    """A random-init open_clip CLIP small enough for CPU, with ``dim``-dimensional features."""
    return open_clip.CLIP(
        embed_dim=dim,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    )


def make_setup(parameterisation: str, seed: int, size: Size) -> Setup:
    generator = torch.Generator().manual_seed(seed)
    subprompts: nn.Module
    if parameterisation == "free":
        text = synthetic_text_features(size.num_classes, size.dim, generator)
        subprompts = FreeSubprompts(text, size.n_subprompts, size.init_noise_std, generator)
    else:
        torch.manual_seed(seed)
        subprompts = OffsetMixtureOfPrompts(
            tiny_clip(size.dim),
            open_clip.get_tokenizer("ViT-B-32"),
            car_classnames(size.num_classes),
            n_subprompts=size.n_subprompts,
            init_noise_std=size.init_noise_std,
            generator=generator,
        )
        text = subprompts.text_features[:, 0]
    world = SyntheticWorld(text, size.n_modes, generator)
    train = world.sample(size.shots, generator)
    test = world.sample(size.test_per_class, generator)
    return Setup(world, train, test, subprompts)


def per_class_agreement(
    score: Callable[[np.ndarray, np.ndarray], float], assigned: Tensor, samples: Samples
) -> float:
    """``score(true modes, assigned sub-prompts)`` within each class, averaged over classes."""
    values = []
    for label in samples.labels.unique():
        mask = samples.labels == label
        values.append(score(samples.modes[mask].numpy(), assigned[mask].numpy()))
    return float(np.mean(values))


@torch.no_grad()
def evaluate(subprompt_features: Tensor, test: Samples) -> dict[str, float]:
    """Collapse diagnostics, mode agreement and accuracy on held-out images."""
    num_classes, k, _ = subprompt_features.shape
    similarities = PF.subprompt_similarities(test.features, subprompt_features)
    logits = PF.class_logits(similarities)  # logsumexp over sub-prompts, CLIP's logit scale
    own = similarities[torch.arange(len(test.labels)), test.labels]
    assigned = own.argmax(dim=-1)  # the sub-prompt that claims each image
    hard = F.one_hot(assigned, k).float()
    usage = diagnostics.subprompt_usage(hard, test.labels, num_classes)
    report = promptmix.detect_collapse(subprompt_features, hard, test.labels)
    return {
        "cosine": diagnostics.mean_pairwise_cosine(subprompt_features).mean().item(),
        "dominant": diagnostics.dominant_share(usage).mean().item(),
        "effective": diagnostics.effective_subprompts(usage).mean().item(),
        "collapsed": len(report.collapsed_classes) / num_classes,
        "nmi": per_class_agreement(normalized_mutual_info_score, assigned, test),
        "ari": per_class_agreement(adjusted_rand_score, assigned, test),
        "accuracy": (logits.argmax(dim=-1) == test.labels).float().mean().item(),
        "image_cos": own.max(dim=-1).values.mean().item(),
    }


@dataclass
class Run:
    """One training run: final metrics, a curve and the final held-out assignments.

    ``curve`` holds the metrics every ``eval_every`` steps; ``assigned`` is the sub-prompt that
    claims each held-out image at the end.
    """

    final: dict[str, float]
    curve: list[tuple[int, dict[str, float]]]
    assigned: Tensor


def train(config: Config, setup: Setup, size: Size, seed: int) -> Run:
    subprompts = copy.deepcopy(setup.subprompts)
    loss_fn = config.loss(size)
    optimizer = torch.optim.Adam(subprompts.parameters(), lr=size.lr)
    generator = torch.Generator().manual_seed(10_000 + seed)
    images, labels = setup.train.features, setup.train.labels
    curve = []
    for step in range(size.steps):
        if step % size.eval_every == 0:
            curve.append((step, evaluate(subprompts().detach(), setup.test)))
        batch = torch.randperm(len(labels), generator=generator)[: size.batch_size]
        out = loss_fn(images[batch], subprompts(), labels[batch])
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        loss_fn.schedule.step()  # type: ignore[union-attr]
    features = subprompts().detach()
    final = evaluate(features, setup.test)
    curve.append((size.steps, final))
    own = PF.own_class_similarities(setup.test.features, features, setup.test.labels)
    return Run(final, curve, own.argmax(dim=-1))


def reference_runs(setup: Setup, size: Size, seed: int) -> dict[str, dict[str, float]]:
    """Metrics of the untrained sub-prompts, k-means per class, and the true mode centres."""
    kmeans_centres = []
    for label in range(size.num_classes):
        images = setup.train.features[setup.train.labels == label].numpy()
        kmeans = KMeans(size.n_subprompts, n_init=10, random_state=seed).fit(images)
        kmeans_centres.append(torch.as_tensor(kmeans.cluster_centers_, dtype=torch.float32))
    with torch.no_grad():
        initial = setup.subprompts()
    return {
        "initialisation (zero-shot)": evaluate(initial, setup.test),
        "k-means per class (reference)": evaluate(torch.stack(kmeans_centres), setup.test),
        "true mode centres (upper bound)": evaluate(setup.world.mode_centres(), setup.test),
    }


def summarise(values: Sequence[dict[str, float]]) -> dict[str, tuple[float, float]]:
    return {
        metric: (
            float(np.mean([v[metric] for v in values])),
            float(np.std([v[metric] for v in values])),
        )
        for metric in METRICS
    }


def _cell(stats: dict[str, tuple[float, float]], metric: str, seeds: int) -> str:
    mean, std = stats[metric]
    percent = metric in ("collapsed", "accuracy")
    if percent:
        mean, std = 100 * mean, 100 * std
    text = f"{mean:.0f}" if percent else f"{mean:.2f}"
    if seeds > 1:
        text += f" ± {std:.0f}" if percent else f" ± {std:.2f}"
    return text


HEADER = (
    "| configuration | diversity | entropy | assignment | τ | mean cos | dominant share "
    "| effective K | collapsed % | NMI | ARI | accuracy % | image cos |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)
REFERENCE_HEADER = (
    "| reference | mean cos | dominant share | effective K | collapsed % | NMI | ARI "
    "| accuracy % | image cos |\n|---|---|---|---|---|---|---|---|---|\n"
)


def table(rows: Sequence[tuple[Config, dict[str, tuple[float, float]]]], seeds: int) -> str:
    lines = [HEADER]
    for config, stats in rows:
        cells = " | ".join(_cell(stats, m, seeds) for m in METRICS)
        lines.append(f"| {config.name} | {config.describe()} | {cells} |\n")
    return "".join(lines)


def reference_table(rows: dict[str, dict[str, tuple[float, float]]], seeds: int) -> str:
    lines = [REFERENCE_HEADER]
    for name, stats in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(stats, m, seeds) for m in METRICS) + " |\n")
    return "".join(lines)


def write_results(
    out: Path,
    size: Size,
    main: dict[str, list[tuple[Config, dict[str, tuple[float, float]]]]],
    references: dict[str, dict[str, dict[str, tuple[float, float]]]],
    sweep: list[tuple[Config, dict[str, tuple[float, float]]]],
) -> Path:
    seeds = len(size.seeds)
    balanced = 1 / size.n_subprompts
    text = [
        "<!-- Generated by `python benchmarks/collapse.py`; do not edit by hand. -->\n\n",
        f"{size.num_classes} classes × {size.n_modes} true modes, K = {size.n_subprompts} "
        f"sub-prompts, dim {size.dim}, {size.shots} training images per class "
        f"({size.shots // size.n_modes} per mode), {size.test_per_class} held-out per class; "
        f"{size.steps} Adam steps (lr {size.lr:g}, batch {size.batch_size}), linear τ schedule, "
        f"E-step scale 100, logit scale 100. Mean ± std over {seeds} seed(s) "
        f"{list(size.seeds)}. Balanced usage is a dominant share of {balanced:.2f} and an "
        f"effective K of {size.n_subprompts}; collapsed % is the share of classes "
        "`detect_collapse` flags (cosine > 0.9 or dominant share > 0.9); NMI and ARI compare "
        "each held-out image's sub-prompt (argmax) with its true mode, per class, averaged; "
        "image cos is the mean cosine of an image to its best sub-prompt.\n\n",
    ]
    titles = {
        "free": "Free feature vectors (`nn.Parameter (C, K, D)`)",
        "offset": "`OffsetMixtureOfPrompts` on a tiny random-init open_clip model",
    }
    for parameterisation, rows in main.items():
        text.append(f"#### {titles[parameterisation]}\n\n")
        text.append(table(rows, seeds))
        text.append("\n")
        text.append(reference_table(references[parameterisation], seeds))
        text.append("\n")
    if sweep:
        text.append("#### Sweep (free feature vectors, one knob at a time)\n\n")
        text.append(table(sweep, seeds))
    path = out / "results.md"
    path.write_text("".join(text))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.md and plots")
    parser.add_argument("--no-sweep", action="store_true", help="skip the hyper-parameter sweep")
    parser.add_argument("--shots", type=int, help="training images per class (default 32)")
    parser.add_argument("--batch-size", type=int, help="images per step (default 128)")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else Size()
    if args.shots is not None:
        size = replace(size, shots=args.shots)
    if args.batch_size is not None:
        size = replace(size, batch_size=args.batch_size)
    # Only the full default run replaces the table and plots in the docs.
    variant = args.quick or args.no_sweep or size != Size()
    out = args.out or (Path(tempfile.gettempdir()) / "promptmix-collapse" if variant else DOCS_OUT)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_flush_denormal(True)  # tiny softmax tails otherwise slow the CPU several-fold
    # The tensors are small: one thread is as fast, and far steadier on a busy machine.
    torch.set_num_threads(1)

    import collapse_plots  # matplotlib only when running

    start = time.perf_counter()
    main_rows: dict[str, list[tuple[Config, dict[str, tuple[float, float]]]]] = {}
    references: dict[str, dict[str, dict[str, tuple[float, float]]]] = {}
    curves: dict[str, list[list[tuple[int, dict[str, float]]]]] = {}
    assignments: dict[str, tuple[Tensor, Samples]] = {}
    setups: dict[tuple[str, int], Setup] = {}
    finished: dict[tuple[Config, int], dict[str, float]] = {}
    for parameterisation in PARAMETERISATIONS:
        phase = time.perf_counter()
        runs: dict[str, list[Run]] = {config.name: [] for config in CONFIGS}
        reference_values: dict[str, list[dict[str, float]]] = {}
        for seed in size.seeds:
            setup = setups[parameterisation, seed] = make_setup(parameterisation, seed, size)
            for name, values in reference_runs(setup, size, seed).items():
                reference_values.setdefault(name, []).append(values)
            for config in CONFIGS:
                run = train(config, setup, size, seed)
                runs[config.name].append(run)
                if parameterisation == "free":
                    finished[replace(config, name=""), seed] = run.final
        main_rows[parameterisation] = [
            (config, summarise([run.final for run in runs[config.name]])) for config in CONFIGS
        ]
        references[parameterisation] = {
            name: summarise(values) for name, values in reference_values.items()
        }
        if parameterisation == "free":
            curves = {name: [run.curve for run in group] for name, group in runs.items()}
            test = setups["free", size.seeds[0]].test
            assignments = {name: (group[0].assigned, test) for name, group in runs.items()}
        print(
            f"{parameterisation}: {len(CONFIGS)} configurations × {len(size.seeds)} seeds "
            f"in {time.perf_counter() - phase:.1f} s",
            flush=True,
        )
        print(table(main_rows[parameterisation], len(size.seeds)), flush=True)

    sweep_rows: list[tuple[Config, dict[str, tuple[float, float]]]] = []
    if not args.no_sweep:
        phase = time.perf_counter()
        configs = sweep_configs()
        for config in configs:
            finals = []
            for seed in size.seeds:
                key = (replace(config, name=""), seed)
                if key not in finished:  # training is deterministic: reuse the main table's runs
                    finished[key] = train(config, setups["free", seed], size, seed).final
                finals.append(finished[key])
            sweep_rows.append((config, summarise(finals)))
        print(
            f"sweep: {len(configs)} configurations × {len(size.seeds)} seeds "
            f"in {time.perf_counter() - phase:.1f} s",
            flush=True,
        )
        print(table(sweep_rows, len(size.seeds)), flush=True)

    results = write_results(out, size, main_rows, references, sweep_rows)
    plots = collapse_plots.plot_all(out, size, main_rows, curves, assignments, sweep_rows)
    print(f"wrote {results} and {', '.join(str(p) for p in plots)}")
    threads = torch.get_num_threads()
    print(f"wall time {time.perf_counter() - start:.1f} s (torch on {threads} thread)")


if __name__ == "__main__":
    main()
