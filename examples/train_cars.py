"""Few-shot Stanford Cars with a mixture of prompts per class (promptmix's public API).

Run it::

    # a 30-second tour on a synthetic dataset and a tiny random CLIP, no download:
    python examples/train_cars.py --demo

    # the real thing (Stanford Cars on local disk, open_clip weights in the cache or a file):
    python examples/train_cars.py --config examples/configs/stanford_cars.yaml \\
        --data-root /data/stanford_cars model.n_subprompts=4 train.shots=16

    # several GPUs: the same command under torchrun
    torchrun --nproc_per_node=4 examples/train_cars.py --config ... --data-root ...

    # continue an interrupted run (from OUTPUT_DIR/checkpoints/last.pt)
    python examples/train_cars.py --config ... --data-root ... --resume

Settings are in ``examples/configs/default.yaml`` (every key, documented); trailing ``key=value``
arguments override them. A run writes ``config.yaml``, ``train.log``, ``metrics.jsonl``,
``checkpoints/last.pt`` and ``plots/*.png`` under ``output.output_dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from cars_config import ConfigError, load_config
from cars_data import DatasetNotFoundError
from cars_demo import write_synthetic_cars
from cars_distributed import Runtime, setup_runtime, teardown
from cars_engine import NonFiniteLossError
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
        "--demo",
        action="store_true",
        help="synthetic data in the devkit layout and a tiny random CLIP: no dataset, no download",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    # Intermixed: overrides may come before, between or after the flags.
    return parser.parse_intermixed_args(argv)


@contextlib.contextmanager
def _data_root(args: argparse.Namespace) -> Iterator[Path | None]:
    """``--data-root``, or with ``--demo`` a temporary synthetic dataset (removed afterwards)."""
    if not args.demo:
        yield args.data_root
        return
    if args.data_root is not None:
        raise ConfigError("--demo builds its own dataset: leave out --data-root.")
    with tempfile.TemporaryDirectory(prefix="promptmix_cars_demo_") as folder:
        write_synthetic_cars(folder)
        yield Path(folder)


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
        root.addHandler(handler)
    try:
        with logging_redirect_tqdm():
            yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(previous_level)


def _resume_path(args: argparse.Namespace, cfg: DictConfig) -> Path | None:
    if args.resume_from is not None:
        return args.resume_from
    return run_paths(cfg)["checkpoint"] if args.resume else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``train_cars.py``; returns the exit status (0 done, 1 non-finite loss, 2 bad input)."""
    args = parse_args(argv)
    config = args.config or CONFIG_DIR / ("demo.yaml" if args.demo else "default.yaml")
    if args.demo:
        # The tiny model's ops are too small to gain from several threads; on a busy machine
        # idle-spinning OpenMP threads make them many times slower.
        torch.set_num_threads(1)
    try:
        with _data_root(args) as data_root:
            extra = {
                key: str(value)
                for key, value in (("data.root", data_root), ("output.output_dir", args.output_dir))
                if value is not None
            }
            cfg = load_config(config, args.overrides, extra=extra)
            if cfg.data.root is None:
                raise ConfigError("Where is Stanford Cars? Pass --data-root PATH (or --demo).")
            runtime = setup_runtime(cfg.train.device)
            try:
                with _logging(runtime.rank, run_paths(cfg)["root"] / "train.log"):
                    if args.demo:
                        logger.info(
                            "demo: synthetic Stanford Cars (devkit layout) in %s", data_root
                        )
                    return _train(args, cfg, runtime)
            finally:
                teardown(runtime)
    except (ConfigError, DatasetNotFoundError, FileNotFoundError) as error:
        print(f"train_cars.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE


def _train(args: argparse.Namespace, cfg: DictConfig, runtime: Runtime) -> int:
    run = Run(cfg, runtime, resume=_resume_path(args, cfg))
    try:
        run.train()
        run.draw()
    except NonFiniteLossError as error:
        logger.error("%s", error)
        return EXIT_NONFINITE
    finally:
        run.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
