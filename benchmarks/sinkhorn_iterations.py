"""How many rounds bring every class's usage within 1 % of its target?

The evidence for the defaults of `promptmix.functional.sinkhorn` (`DEFAULT_SINKHORN_ITERATIONS`
Sinkhorn rounds, then `DEFAULT_NEWTON_STEPS` Newton steps). For each `scale / tau`, over every
case (K, images per class, how the scores look, the usage target) and seed, prints the worst
relative column error of: plain Sinkhorn for the rounds that its bisection finds it needs, the
defaults, and fewer rounds/steps; then the time of one call at the defaults.

    PYTHONPATH=src python benchmarks/sinkhorn_iterations.py

Cases, with 4 classes per batch, cosines drawn as CLIP's are (0.3 +- 0.03 within a class):
- `clip`: no sub-prompt favoured;
- `winner`: sub-prompt 0 beats the best other by 0.05 on every image (the collapsed start);
- `winner-far`: the same by 0.2 (a softmax at `scale / tau = 333` underflows to exact 0/1);
- `prior`: `clip` scores towards a skewed usage prior `(0.55, 0.25, 0.15, 0.05, ...)`.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from promptmix.functional import sinkhorn
from promptmix.functional._common import _dense_groups, _group_sums
from promptmix.functional.estep import DEFAULT_NEWTON_STEPS, DEFAULT_SINKHORN_ITERATIONS

CASES = ("clip", "winner", "winner-far", "prior")


def problem(case: str, k: int, per_class: int, ratio: float, seed: int, classes: int = 4):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    cosine = 0.3 + 0.03 * torch.randn(classes * per_class, k, generator=generator)
    if case.startswith("winner"):
        cosine[:, 0] = cosine.max(dim=1).values + (0.05 if case == "winner" else 0.2)
    prior = None
    if case == "prior":
        weights = torch.tensor([0.55, 0.25, 0.15, 0.05] + [0.05] * (k - 4))[:k]
        prior = (weights / weights.sum()).expand(classes, k).contiguous()
    return cosine * ratio, labels, prior


def error(scores, labels, prior, rounds: int, newton: int) -> float:
    """Worst relative gap between a class's usage and its target."""
    q = sinkhorn(
        scores, labels, prior, sinkhorn_iterations=rounds, newton_steps=newton
    ).double()
    groups = _dense_groups(labels, len(labels), labels.device)
    counts = _group_sums(q.new_ones(len(labels)), groups, len(labels))
    if prior is None:
        target = (counts / scores.shape[1]).unsqueeze(1).expand(-1, scores.shape[1])
    else:
        target = _group_sums(prior.double()[labels], groups, len(labels))
    mass = _group_sums(q, groups, len(labels))
    positive = target > 0
    return ((mass - target).abs()[positive] / target[positive]).max().item()


def rounds_needed(scores, labels, prior, tol: float, maximum: int) -> int:
    """Plain Sinkhorn (no Newton step): the fewest rounds that reach `tol` (bisection)."""
    low, high = 1, maximum
    if error(scores, labels, prior, high, 0) > tol:
        return maximum + 1
    while low < high:  # the error falls with the rounds in every case measured
        middle = (low + high) // 2
        if error(scores, labels, prior, middle, 0) <= tol:
            high = middle
        else:
            low = middle + 1
    return low


def all_cases(ratio: float, seeds: int):
    for case in CASES:
        for k in (4, 8, 16) if case == "prior" else (2, 4, 8, 16):
            for per_class in (2, 4, 8, 16, 32):
                for seed in range(seeds):
                    yield (case, k, per_class, seed), problem(case, k, per_class, ratio, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[100.0, 100 / 0.3, 100 / 0.05])
    parser.add_argument("--tol", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--maximum", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, Python {platform.python_version()}, CPU, 1 thread")
    defaults = (DEFAULT_SINKHORN_ITERATIONS, DEFAULT_NEWTON_STEPS)
    settings = [defaults, (10, 5), (20, 0), (60, 0)]
    for ratio in args.ratios:
        worst_plain, plain_case = 0, None
        worst = dict.fromkeys(settings, 0.0)
        for name, (scores, labels, prior) in all_cases(ratio, args.seeds):
            needed = rounds_needed(scores, labels, prior, args.tol, args.maximum)
            if needed > worst_plain:
                worst_plain, plain_case = needed, name
            for rounds, newton in settings:
                value = error(scores, labels, prior, rounds, newton)
                worst[rounds, newton] = max(worst[rounds, newton], value)
        print(f"scale/tau {ratio:7.1f}: plain Sinkhorn needs {worst_plain} rounds for "
              f"{args.tol:.0%} in its worst case {plain_case}")
        for (rounds, newton), value in worst.items():
            mark = " (defaults)" if (rounds, newton) == defaults else ""
            print(f"    {rounds:3d} rounds + {newton:2d} Newton steps: worst {value:.5f}{mark}")
    scores, labels, _ = problem("clip", 8, 8, 100 / 0.3, 0, classes=32)
    repeats = 20
    start = time.perf_counter()
    for _ in range(repeats):
        sinkhorn(scores, labels)
    per_call = (time.perf_counter() - start) / repeats
    print(
        f"one call at the defaults ({DEFAULT_SINKHORN_ITERATIONS} rounds + {DEFAULT_NEWTON_STEPS} "
        f"Newton steps), batch 256 = 32 classes x 8 images, K = 8: {per_call * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
