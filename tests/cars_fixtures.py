"""Helpers for the tests of ``examples/train_cars.py``: imports and Stanford Cars on disk.

The example is a script with its package ``cars`` beside it, so ``examples/`` goes on
``sys.path`` (as ``python examples/train_cars.py`` does).

The datasets are written in the real file layouts: the devkit's ``.mat`` files with
``scipy.io.savemat`` in the struct layout torchvision's ``StanfordCars`` reads, CoOp's split JSON,
and class folders, all holding the same small JPEGs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

# The example's modules, for the tests to import from here (after the sys.path insertion above).
import train_cars  # noqa: E402
from cars import UsageError  # noqa: E402
from cars import clip as cars_clip  # noqa: E402
from cars import config as cars_config  # noqa: E402
from cars import data as cars_data  # noqa: E402
from cars import demo as cars_demo  # noqa: E402
from cars import distributed as cars_distributed  # noqa: E402
from cars import files as cars_files  # noqa: E402
from cars import grid as cars_grid  # noqa: E402
from cars import plots as cars_plots  # noqa: E402
from cars.data import load_stanford_cars  # noqa: E402
from cars.demo import write_synthetic_cars  # noqa: E402
from cars.files import read_records  # noqa: E402

__all__ = [
    "CLASSNAMES",
    "EXAMPLES",
    "UsageError",
    "cars_clip",
    "cars_config",
    "cars_data",
    "cars_demo",
    "cars_distributed",
    "cars_files",
    "cars_grid",
    "cars_plots",
    "old_config",
    "one_torch_thread",
    "run",
    "step_records",
    "train_cars",
    "write_coop",
    "write_folders",
    "write_original",
]

#: Fixture class names in devkit order, with a real name holding "/" (it cannot be a folder name)
#: and an order that is not alphabetical (so a sorted folder listing would mislabel them).
CLASSNAMES = (
    "Ram C/V Cargo Van Minivan 2012",
    "AM General Hummer SUV 2000",
    "Acura TL Sedan 2012",
    "Volvo 240 Sedan 1993",
)


def write_original(
    root: Path,
    *,
    train_per_class: int = 6,
    test_per_class: int = 2,
    classnames: Sequence[str] = CLASSNAMES,
) -> Path:
    """The devkit layout under ``root/stanford_cars`` (torchvision's root is ``root``)."""
    base = root / "stanford_cars"
    write_synthetic_cars(
        base, train_per_class=train_per_class, test_per_class=test_per_class, classnames=classnames
    )
    return base


def write_coop(original_base: Path, root: Path) -> Path:
    """CoOp's layout: ``split_zhou_StanfordCars.json`` with image paths relative to ``root``.

    Like CoOp's own split, a part of the training images is held out as ``"val"``.
    """
    splits = load_stanford_cars(original_base, layout="original")
    entries: dict[str, list[list[Any]]] = {"train": [], "val": [], "test": []}
    for part, samples in (("train", splits.train), ("test", splits.test)):
        for index, sample in enumerate(samples):
            relative = Path(part) / f"{sample.label:03d}_{sample.path.name}"
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(sample.path, root / relative)
            name = "val" if part == "train" and index % 5 == 4 else part
            entries[name].append(
                [relative.as_posix(), sample.label, splits.classnames[sample.label]]
            )
    (root / "split_zhou_StanfordCars.json").write_text(json.dumps(entries))
    return root


def write_folders(original_base: Path, root: Path, *, with_devkit: bool) -> Path:
    """Class folders ``train/<class>/`` and ``test/<class>/`` ("/" in a name becomes "-").

    With ``with_devkit``, ``devkit/cars_meta.mat`` is copied too, which fixes the class order.
    """
    splits = load_stanford_cars(original_base, layout="original")
    for part, samples in (("train", splits.train), ("test", splits.test)):
        for sample in samples:
            folder = root / part / splits.classnames[sample.label].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(sample.path, folder / sample.path.name)
    if with_devkit:
        (root / "devkit").mkdir(parents=True, exist_ok=True)
        shutil.copy(original_base / "devkit" / "cars_meta.mat", root / "devkit" / "cars_meta.mat")
    return root


def old_config(path: Path, **train: Any) -> Path:
    """A config written before the regularisers existed: no diversity, entropy or tau keys, no
    learner (the schema's: the offset learner of promptmix's recipe)."""
    lines = [
        "model:",
        "  clip_name: tiny-random",
        "  pretrained: null",
        "  n_subprompts: 2",
        "  ctx_init: a photo of a",
        "train:",
        "  shots: 4",
        "  epochs: 2",
        "  batch_size: 8",
        "  optimizer: adamw",
        "  lr: 0.01",
        "  warmup_epochs: 0.5",
        "  num_workers: 0",
        *(f"  {key}: {value}" for key, value in train.items()),
        "output:",
        "  progress_bar: false",
        "  log_every: 1",
        "  plot_classes: [0, 1]",
        "  plot_top_images: 2",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: the tiny model's ops are too small to gain from more, and on a
    busy two-core machine idle-spinning OpenMP threads make them up to 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(capsys: Any, *argv: object) -> tuple[int, str, str]:
    """``train_cars.main(argv)``: its exit status, stdout and stderr."""
    status = train_cars.main([str(item) for item in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def step_records(output_dir: Path) -> list[dict[str, Any]]:
    """The per-step records of a run's ``metrics.jsonl``."""
    return [r for r in read_records(output_dir / "metrics.jsonl") if r["event"] == "step"]
