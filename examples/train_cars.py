"""Few-shot Stanford Cars with a mixture of prompts per class (promptmix's public API).

Run it::

    # a tour in under a minute on a synthetic dataset and a tiny CLIP, no download: the
    # uncured mixture and promptmix's defaults side by side
    python examples/train_cars.py --demo
    # ... and write its log, table and pictures into the docs (docs/cars.md includes them)
    python examples/train_cars.py --demo --write-docs docs/cars

    # the real thing (Stanford Cars on local disk, open_clip weights in the cache or a file):
    python examples/train_cars.py --config examples/configs/stanford_cars.yaml \\
        --data-root /data/stanford_cars model.n_subprompts=4 train.shots=16

    # several GPUs: the same command under torchrun
    torchrun --nproc_per_node=4 examples/train_cars.py --config ... --data-root ...

    # continue an interrupted run (from OUTPUT_DIR/checkpoints/last.pt)
    python examples/train_cars.py --config ... --data-root ... --resume

    # evaluate learned prompts without training, e.g. base-to-new's new classes
    python examples/train_cars.py --config ... --data-root ... \\
        --evaluate BASE_RUN/checkpoints/last.pt data.subsample_classes=new

The protocols of the field (few-shot grid, base-to-new) run with ``examples/cars_grid.py``.

Settings are in ``examples/configs/default.yaml`` (every key, documented); trailing ``key=value``
arguments override them. A run writes ``config.yaml``, ``train.log``, ``metrics.jsonl``,
``checkpoints/last.pt`` and ``plots/*.png`` under ``output.output_dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from cars_config import ConfigError, load_config
from cars_data import DatasetNotFoundError
from cars_demo import demo_runs, pretrain_tiny_clip, results_table, write_synthetic_cars
from cars_distributed import Runtime, setup_runtime, teardown
from cars_engine import NonFiniteLossError
from cars_plots import compare_galleries
from cars_run import Run, run_paths
from omegaconf import DictConfig
from tqdm.contrib.logging import logging_redirect_tqdm

logger = logging.getLogger("train_cars")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
EXIT_OK, EXIT_NONFINITE, EXIT_USAGE = 0, 1, 2


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line: flags, then ``key=value`` config overrides."""
    parser = argparse.ArgumentParser(
        description="Train a mixture of prompts on few-shot Stanford Cars.",
        epilog="Example overrides: model.n_subprompts=4 train.epochs=2 train.shots=8",
    )
    parser.add_argument("--config", type=Path, help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--data-root", type=Path, help="Stanford Cars folder (sets data.root)")
    parser.add_argument("--output-dir", type=Path, help="where to write (output.output_dir)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/last.pt"
    )
    parser.add_argument(
        "--resume-from", type=Path, metavar="CHECKPOINT", help="continue from this checkpoint file"
    )
    parser.add_argument(
        "--evaluate",
        type=Path,
        metavar="CHECKPOINT",
        help="evaluate the prompts of CHECKPOINT on this config's test classes, without training",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="synthetic data and a tiny CLIP pre-trained on it: the uncured mixture and "
        "promptmix's defaults side by side; no dataset, no download",
    )
    parser.add_argument(
        "--write-docs",
        type=Path,
        metavar="DIR",
        help="with --demo: write its log, table and pictures into DIR (docs/cars for the docs)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    # Intermixed: overrides may come before, between or after the flags.
    return parser.parse_intermixed_args(argv)


@contextlib.contextmanager
def _logging(rank: int, log_file: Path | None) -> Iterator[None]:
    """Log to stderr (and ``train.log`` on the main process) for the duration of one run."""
    root = logging.getLogger()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None and rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    previous_level = root.level
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(_quiet_libraries)
        root.addHandler(handler)
    try:
        with logging_redirect_tqdm():
            yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(previous_level)


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """Drop the INFO chatter libraries send to the root logger (open_clip's tokenizer notes)."""
    return record.name != "root" or record.levelno >= logging.WARNING


def _resume_path(args: argparse.Namespace, cfg: DictConfig) -> Path | None:
    """The checkpoint to resume from, checked before anything is loaded or encoded."""
    if args.resume_from is not None:
        path, flag = args.resume_from, f"--resume-from {args.resume_from}"
    elif args.resume:
        path, flag = run_paths(cfg)["checkpoint"], "--resume"
    else:
        return None
    if not path.is_file():
        raise ConfigError(
            f"{flag}: there is no checkpoint {path} to continue from; leave out --resume to "
            "start a new run, or pass --output-dir of the run to continue."
        )
    return path


def _check_flags(args: argparse.Namespace) -> None:
    if args.evaluate is not None and (args.resume or args.resume_from is not None):
        raise ConfigError("--evaluate trains nothing: leave out --resume and --resume-from.")
    if args.evaluate is not None and not args.evaluate.is_file():
        raise ConfigError(f"--evaluate {args.evaluate}: no such checkpoint file.")
    if args.write_docs is not None and not args.demo:
        raise ConfigError("--write-docs writes the demo's output: use it with --demo.")
    if args.demo:
        if args.data_root is not None:
            raise ConfigError("--demo builds its own dataset: leave out --data-root.")
        if args.resume or args.resume_from is not None or args.evaluate is not None:
            raise ConfigError("--demo starts from scratch: leave out --resume and --evaluate.")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``train_cars.py``; returns the exit status (0 done, 1 non-finite loss, 2 bad input)."""
    args = parse_args(argv)
    config = args.config or CONFIG_DIR / ("demo.yaml" if args.demo else "default.yaml")
    try:
        _check_flags(args)
        if args.demo:
            return run_demo(config, args.overrides, args.output_dir, args.write_docs)
        extra = {
            key: str(value)
            for key, value in (
                ("data.root", args.data_root),
                ("output.output_dir", args.output_dir),
            )
            if value is not None
        }
        cfg = load_config(config, args.overrides, extra=extra)
        if cfg.data.root is None:
            raise ConfigError("Where is Stanford Cars? Pass --data-root PATH (or --demo).")
        resume = _resume_path(args, cfg)
        runtime = setup_runtime(cfg.train.device)
        try:
            with _logging(runtime.rank, run_paths(cfg)["root"] / "train.log"):
                return _train(cfg, runtime, resume, args.evaluate)
        finally:
            teardown(runtime)
    except (ConfigError, DatasetNotFoundError, FileNotFoundError) as error:
        print(f"train_cars.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE


def _train(
    cfg: DictConfig, runtime: Runtime, resume: Path | None, evaluate: Path | None = None
) -> int:
    run = Run(cfg, runtime, resume=resume)
    try:
        if evaluate is not None:
            run.evaluate_checkpoint(evaluate)
            return EXIT_OK
        run.train()
        run.draw()
    except NonFiniteLossError as error:
        logger.error("%s", error)
        return EXIT_NONFINITE
    finally:
        run.close()
    return EXIT_OK


def run_demo(
    config: Path, overrides: Sequence[str], output_dir: Path | None, docs_dir: Path | None
) -> int:
    """``--demo``: pre-train the tiny CLIP, then train the uncured mixture and the defaults.

    Writes each run under ``OUTPUT_DIR/<run>/``, and ``OUTPUT_DIR/results.md`` (the table),
    ``OUTPUT_DIR/galleries.png`` (both runs' galleries side by side) and ``OUTPUT_DIR/demo.log``;
    with ``docs_dir`` also the log, the table and the pictures that ``docs/cars.md`` shows.
    """
    # The tiny model's ops are too small to gain from several threads; on a busy machine
    # idle-spinning OpenMP threads make them many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="promptmix_cars_demo_") as folder:
            classnames = write_synthetic_cars(folder)
            first = load_config(config, overrides, extra={"data.root": folder})
            output = Path(output_dir or first.output.output_dir)
            runtime = setup_runtime(first.train.device)
            try:
                if runtime.distributed:
                    raise ConfigError("--demo runs in one process: start it without torchrun.")
                with _logging(0, output / "demo.log"), _docs_log(docs_dir, folder):
                    logger.info("demo: synthetic Stanford Cars (devkit layout) in %s", folder)
                    weights = pretrain_tiny_clip(
                        output / "tiny_clip.pt", len(classnames), device=runtime.device
                    )
                    return _demo_runs(config, overrides, folder, output, weights, runtime, docs_dir)
            finally:
                teardown(runtime)
    finally:
        torch.set_num_threads(threads)


def _demo_runs(
    config: Path,
    overrides: Sequence[str],
    data_root: str,
    output: Path,
    weights: Path,
    runtime: Runtime,
    docs_dir: Path | None,
) -> int:
    results: dict[str, dict] = {}
    runs: dict[str, Run] = {}
    for name, settings in demo_runs().items():
        logger.info("demo run '%s': %s", name, " ".join(f"{k}={v}" for k, v in settings.items()))
        cfg = load_config(
            config,
            [*(f"{key}={value}" for key, value in settings.items()), *overrides],
            extra={
                "data.root": data_root,
                "output.output_dir": str(output / name),
                "model.pretrained": str(weights),
            },
        )
        run = Run(cfg, runtime)
        try:
            run.train()
            run.draw()
            results[name] = run.result()
        except NonFiniteLossError as error:
            logger.error("%s", error)
            return EXIT_NONFINITE
        finally:
            run.close()
        runs[name] = run
    table = results_table(results)
    (output / "results.md").write_text(table)
    logger.info("demo results (also in %s):\n%s", output / "results.md", table)
    first = next(iter(runs.values()))
    pictures = [
        compare_galleries(
            [
                (name, run.train_samples, results[name]["responsibilities"])
                for name, run in runs.items()
            ],
            class_ids=list(first.cfg.output.plot_classes)[:2],
            classnames=first.classnames,
            top_n=first.cfg.output.plot_top_images,
            path=output / "galleries.png",
        )
    ]
    logger.info("side-by-side galleries: %s", pictures[0])
    if docs_dir is not None:
        docs_dir.mkdir(parents=True, exist_ok=True)
        (docs_dir / "demo_results.md").write_text(table)
        shutil.copy(pictures[0], docs_dir / "galleries.png")
        for name in runs:
            for picture in ("training_curves.png", "similarity.png"):
                shutil.copy(output / name / "plots" / picture, docs_dir / f"{name}_{picture}")
        logger.info("docs: wrote the demo's table, log and pictures into %s", docs_dir)
    return EXIT_OK


class _DocsFormatter(logging.Formatter):
    """Log lines for the docs: no time stamps, and the temporary folder's path shortened."""

    def __init__(self, replacements: dict[str, str]):
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self.replacements = replacements

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for old, new in self.replacements.items():
            text = text.replace(old, new)
        return text


@contextlib.contextmanager
def _docs_log(docs_dir: Path | None, data_root: str) -> Iterator[None]:
    """With ``docs_dir``: also log into ``docs_dir/demo.log`` (for the docs to include)."""
    if docs_dir is None:
        yield
        return
    docs_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(docs_dir / "demo.log", mode="w", encoding="utf-8")
    handler.setFormatter(_DocsFormatter({data_root: "/tmp/promptmix_cars_demo_…"}))
    handler.setLevel(logging.INFO)
    handler.addFilter(_quiet_libraries)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


if __name__ == "__main__":
    sys.exit(main())
