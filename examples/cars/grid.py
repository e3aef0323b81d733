"""The field's evaluation protocols on Stanford Cars: a grid of `train_cars.py` runs, aggregated.

Run it::

    # few-shot (CoOp): 1, 2, 4, 8, 16 shots x seeds 1, 2, 3 on all 196 classes
    python examples/cars/grid.py few-shot --config examples/configs/stanford_cars.yaml \\
        --data-root PATH --output-dir runs/grid

    # base-to-new (CoCoOp): train on the base half, test on base and on the new half, 3 seeds
    python examples/cars/grid.py base-to-new --config examples/configs/stanford_cars.yaml \\
        --data-root PATH --output-dir runs/grid --shots 16

    # only the table, from runs already on disk
    python examples/cars/grid.py few-shot --output-dir runs/grid --aggregate-only

Each run is a normal ``train_cars.py`` run in its own folder (``few_shot/shots16_seed1/``,
``base_to_new/shots16_seed1/base/``, and the evaluation of its prompts on the new classes in
``.../new/``); a finished run is skipped, so an interrupted grid continues where it stopped.
Trailing ``key=value`` arguments go to every run. The table (``few_shot.md`` or ``base_to_new.md``
in the output folder) gives mean ± standard deviation over the seeds, beside the published
figures of other methods (``published_stanford_cars.json``), each labelled with its source.

Base-to-new needs prompts that carry over to classes they were not trained on, so its runs use
``MixtureOfPrompts`` with one context shared by all classes (``model.learner=mixture
model.class_specific=false``), as CoCoOp's CoOp baseline does: the offset learner's parts belong
to their classes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import `cars` and `train_cars` from examples/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from cars import UsageError
from cars.files import read_records

PROTOCOLS = ("few-shot", "base-to-new")
PUBLISHED_FILE = Path(__file__).resolve().parents[1] / "configs" / "published_stanford_cars.json"


def _numbers(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got '{text}'"
        ) from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line: the protocol, the grid, the ``train_cars.py`` flags, overrides."""
    parser = argparse.ArgumentParser(description="Run and aggregate a Stanford Cars protocol.")
    parser.add_argument("protocol", choices=PROTOCOLS)
    parser.add_argument("--config", type=Path, help="train_cars.py config for every run")
    parser.add_argument("--data-root", type=Path, help="Stanford Cars folder")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/grid"))
    parser.add_argument(
        "--shots",
        type=_numbers,
        help="comma-separated; few-shot: 1,2,4,8,16 (default), base-to-new: 16",
    )
    parser.add_argument("--seeds", type=_numbers, default=[1, 2, 3], help="default: 1,2,3")
    parser.add_argument(
        "--aggregate-only", action="store_true", help="train nothing: tabulate the runs on disk"
    )
    parser.add_argument("--published", type=Path, default=PUBLISHED_FILE)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    if args.shots is None:
        args.shots = [1, 2, 4, 8, 16] if args.protocol == "few-shot" else [16]
    return args


def final_accuracy(run_dir: Path) -> float | None:
    """The test accuracy of a finished run or evaluation (``None``: not finished)."""
    if (run_dir / "eval.json").exists():
        return float(json.loads((run_dir / "eval.json").read_text())["test_accuracy"])
    final = [r for r in read_records(run_dir / "metrics.jsonl") if r["event"] == "final"]
    return float(final[-1]["test_accuracy"]) if final else None


def _train_cars(args: argparse.Namespace, output: Path, *extra: str) -> None:
    import train_cars  # the grid drives the script, as a shell loop would

    if final_accuracy(output) is not None:
        return
    argv = [*(["--config", str(args.config)] if args.config else [])]
    argv += ["--data-root", str(args.data_root), "--output-dir", str(output)]
    if (output / "checkpoints" / "last.pt").exists():  # a run the grid started: continue it
        argv.append("--resume")
    status = train_cars.main([*argv, *extra, *args.overrides])
    if status != train_cars.EXIT_OK:
        raise SystemExit(status)


def run_grid(args: argparse.Namespace) -> None:
    """Every run of the protocol that is not on disk yet."""
    if args.data_root is None:
        raise UsageError("--data-root: expected the Stanford Cars folder, got none (or pass "
                         "--aggregate-only)")
    for shots in args.shots:
        for seed in args.seeds:
            grid = [f"train.shots={shots}", f"train.seed={seed}"]
            if args.protocol == "few-shot":
                _train_cars(args, run_folder(args, shots, seed), *grid)
                continue
            folder = run_folder(args, shots, seed)
            shared = ["model.learner=mixture", "model.class_specific=false", *grid]
            _train_cars(args, folder / "base", *shared, "data.subsample_classes=base")
            checkpoint = folder / "base" / "checkpoints" / "last.pt"
            _train_cars(
                args,
                folder / "new",
                *shared,
                "data.subsample_classes=new",
                "--evaluate",
                str(checkpoint),
            )


def run_folder(args: argparse.Namespace, shots: int, seed: int) -> Path:
    """Where one cell of the grid writes."""
    protocol = args.protocol.replace("-", "_")
    return args.output_dir / protocol / f"shots{shots}_seed{seed}"


def mean_std(values: Sequence[float]) -> str:
    """``"mean ± std"`` over seeds (sample standard deviation; 0 for one seed)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def harmonic_mean(base: float, new: float) -> float:
    """CoCoOp's H = 2·B·N / (B + N), taken over the seed means of B and N."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def _published_rows(published: dict[str, Any], protocol: str, columns: list[str]) -> list[str]:
    rows = []
    for entry in published.get(protocol, []):
        figures = entry.get("figures") or {}
        cells = [
            f"{figures[column]:.2f}" if figures.get(column) is not None else "–"
            for column in columns
        ]
        label = f"{entry['method']} (published: {entry['source']})"
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def aggregate(args: argparse.Namespace) -> str:
    """The protocol's Markdown table: this repo's runs (mean ± std), then published figures."""
    published = json.loads(args.published.read_text()) if args.published.exists() else {}
    seeds = ", ".join(map(str, args.seeds))
    if args.protocol == "few-shot":
        columns = [f"{shots} shots" for shots in args.shots]
        cells = []
        for shots in args.shots:
            values = [final_accuracy(run_folder(args, shots, seed)) for seed in args.seeds]
            done = [v for v in values if v is not None]
            missing = len(values) - len(done)
            cells.append(
                (mean_std(done) if done else "–") + (f" ({missing} missing)" if missing else "")
            )
        ours = [f"| promptmix (this run, seeds {seeds}) | " + " | ".join(cells) + " |"]
        table_columns = columns
    else:
        table_columns = ["base", "new", "H"]
        ours = []
        for shots in args.shots:
            base = [final_accuracy(run_folder(args, shots, s) / "base") for s in args.seeds]
            new = [final_accuracy(run_folder(args, shots, s) / "new") for s in args.seeds]
            pairs = [
                (b, n) for b, n in zip(base, new, strict=True) if b is not None and n is not None
            ]
            if pairs:
                b_values, n_values = [b for b, _ in pairs], [n for _, n in pairs]
                h = harmonic_mean(statistics.mean(b_values), statistics.mean(n_values))
                cells = [mean_std(b_values), mean_std(n_values), f"{h:.2f}"]
            else:
                cells = ["–", "–", "–"]
            missing = len(args.seeds) - len(pairs)
            label = f"promptmix ({shots} shots, seeds {seeds}" + (
                f", {missing} missing)" if missing else ")"
            )
            ours.append(f"| {label} | " + " | ".join(cells) + " |")
        columns = ["base", "new", "H"]
    header = "| method | " + " | ".join(table_columns) + " |"
    rule = "| --- |" + " --- |" * len(table_columns)
    rows = [header, rule, *ours, *_published_rows(published, args.protocol, columns)]
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the grid (unless ``--aggregate-only``) and write the protocol's table."""
    args = parse_args(argv)
    try:
        if not args.aggregate_only:
            run_grid(args)
    except UsageError as error:
        for message in error.messages:
            print(f"grid.py: error: {message}", file=sys.stderr)
        return 2
    except SystemExit as stop:
        return int(stop.code or 0)
    table = aggregate(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"{args.protocol.replace('-', '_')}.md"
    path.write_text(table)
    print(table, end="")
    print(f"(written to {path})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
