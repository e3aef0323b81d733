"""The demo's world: a synthetic Stanford Cars in the devkit layout and a tiny CLIP that sees it.

Two classes share each colour, and every class has two looks, bright and dark, one with
horizontal stripes and one with vertical ones: the even class of a colour has horizontal stripes
when bright, the odd class when dark (:func:`appearance`). Neither colour, brightness nor stripes
alone tells the two classes of a colour apart, only a whole look does, so a class needs one
sub-prompt per look: one prompt per class, or a mixture collapsed onto one, confuses them.

A random-init CLIP sees none of this, so the demo first pre-trains the tiny CLIP for a few
seconds, contrastively, on synthetic images captioned with their colour, brightness and stripes
(:func:`pretrain_tiny_clip`), as CLIP's own pre-training taught it what colours and shapes look
like; the captions never name the demo's car models. :class:`World` then sets up the demo's
rows (:data:`RECIPES`), which ``train_cars.py`` trains, and reports them side by side.
"""

from __future__ import annotations

import colorsys
import contextlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import scipy.io
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image

from cars import Stopped, UsageError, files, plots
from cars.clip import TINY_TOKENIZER, tiny_clip
from cars.config import command, load, override_keys
from cars.distributed import session

logger = logging.getLogger(__name__)

#: How the two looks of a class are named in the pre-training captions (index = ``look``).
BRIGHTNESS = ("bright", "dark")
STRIPES = ("horizontal", "vertical")

#: Stripe amplitude, in 8-bit pixel values, added on top of the colour.
STRIPE_CONTRAST = 70.0

#: Colour words for the pre-training captions, at hues ``i / len(COLOURS)``.
COLOURS = (
    "red", "orange", "yellow", "lime", "green", "teal",
    "cyan", "azure", "blue", "violet", "magenta", "pink",
)

_MAKES = ("Aurora", "Bexley", "Corvan", "Dunmore", "Elstar", "Fenwick", "Galt", "Harlow")
_BODIES = ("Sedan", "Coupe", "SUV", "Convertible", "Hatchback", "Wagon", "Minivan", "Cab")

#: ``annotations`` struct fields of the devkit's ``cars_*_annos.mat`` files.
ANNOTATION_DTYPE = [
    ("bbox_x1", "O"),
    ("bbox_y1", "O"),
    ("bbox_x2", "O"),
    ("bbox_y2", "O"),
    ("class", "O"),
    ("fname", "O"),
]


def synthetic_classnames(num_classes: int) -> list[str]:
    """Car-like class names ``"<make> <model> <body> <year>"``, one per class, all different."""
    return [
        f"{_MAKES[index % len(_MAKES)]} M{index} {_BODIES[(index // 2) % len(_BODIES)]} "
        f"{2000 + index % 13}"
        for index in range(num_classes)
    ]


def num_colours(num_classes: int) -> int:
    """How many colours the classes share: two classes per colour."""
    return (num_classes + 1) // 2


def appearance(label: int, look: int) -> tuple[int, int, int]:
    """The ``(colour, brightness, stripes)`` indices of look ``look`` (0 or 1) of class ``label``.

    Classes ``2j`` and ``2j + 1`` share colour ``j``. Look 0 is bright, look 1 dark; the even
    class has horizontal stripes on its bright look and vertical ones on its dark look, the odd
    class the other way round. So neither the colour, nor the brightness, nor the stripes alone
    tell the two classes of a colour apart: only a look as a whole does.
    """
    return label // 2, look, look ^ (label % 2)


def appearance_image(
    colour: int, brightness: int, stripes: int, num_colours: int, rng: np.random.Generator
) -> Image.Image:
    """A ``48x40`` image: hue ``colour / num_colours``, bright (0) or dark (1), horizontal (0)
    or vertical (1) stripes; shifted, noisy."""
    height, width = 40, 48
    value = 0.95 if brightness == 0 else 0.45
    red, green, blue = colorsys.hsv_to_rgb(colour / num_colours, 0.8, value)
    pixels = np.empty((height, width, 3), dtype=np.float32)
    pixels[:] = (red * 255, green * 255, blue * 255)
    shift = int(rng.integers(0, 8))
    coordinate = np.arange(height if stripes == 0 else width) + shift
    # Dark stripes on a bright car, light ones on a dark car.
    sign = -1.0 if brightness == 0 else 1.0
    band = ((coordinate // 4) % 2 == 0).astype(np.float32) * STRIPE_CONTRAST * sign
    pixels += band[:, None, None] if stripes == 0 else band[None, :, None]
    pixels += rng.normal(0.0, 10.0, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def synthetic_image(
    label: int, look: int, num_classes: int, rng: np.random.Generator
) -> Image.Image:
    """An image of look ``look`` (0 or 1) of class ``label`` (see :func:`appearance`)."""
    return appearance_image(*appearance(label, look), num_colours(num_classes), rng)


def caption(colour: int, brightness: int, stripes: int, num_colours: int) -> str:
    """The pre-training caption of an appearance: ``"a photo of a dark red car, with ..."``."""
    word = COLOURS[round(colour / num_colours * len(COLOURS)) % len(COLOURS)]
    return (
        f"a photo of a {BRIGHTNESS[brightness]} {word} car, with {STRIPES[stripes]} stripes."
    )


def _write_split(
    folder: Path, annotations_path: Path, counts: list[int], num_classes: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = np.zeros(sum(counts), dtype=ANNOTATION_DTYPE)
    index = 0
    for label, count in enumerate(counts):
        for image_index in range(count):
            fname = f"{index + 1:05d}.jpg"
            image = synthetic_image(label, image_index % 2, num_classes, rng)
            image.save(folder / fname, quality=90)
            records[index] = (
                np.uint16(1),
                np.uint16(1),
                np.uint16(image.width),
                np.uint16(image.height),
                np.uint8(label + 1),  # the devkit's classes are 1-based
                fname,
            )
            index += 1
    scipy.io.savemat(annotations_path, {"annotations": records})


def write_synthetic_cars(
    root: str | Path,
    *,
    num_classes: int = 8,
    train_per_class: int = 8,
    test_per_class: int = 10,
    seed: int = 0,
    classnames: Sequence[str] | None = None,
) -> list[str]:
    """Write a synthetic dataset in the devkit layout torchvision's ``StanfordCars`` reads.

    Writes ``cars_train/``, ``cars_test/``, ``devkit/cars_meta.mat``,
    ``devkit/cars_train_annos.mat`` and ``cars_test_annos_withlabels.mat`` under ``root``.
    A class's images alternate between its two looks (:func:`synthetic_image`).

    Args:
        classnames: the class names (default: :func:`synthetic_classnames`); sets ``num_classes``.

    Returns:
        The class names, in label order.
    """
    root = Path(root)
    (root / "devkit").mkdir(parents=True, exist_ok=True)
    classnames = list(classnames) if classnames is not None else synthetic_classnames(num_classes)
    num_classes = len(classnames)
    names = np.empty((num_classes,), dtype=object)
    names[:] = classnames
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": names})
    _write_split(
        root / "cars_train",
        root / "devkit" / "cars_train_annos.mat",
        [train_per_class] * num_classes,
        num_classes,
        seed,
    )
    _write_split(
        root / "cars_test",
        root / "cars_test_annos_withlabels.mat",
        [test_per_class] * num_classes,
        num_classes,
        seed + 1,
    )
    return classnames


def pretrain_tiny_clip(
    path: str | Path,
    num_classes: int,
    *,
    steps: int = 150,
    images_per_look: int = 16,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Path:
    """Pre-train :func:`tiny_clip` contrastively on captioned synthetic images; save its weights.

    Every appearance (colour, brightness, stripes) of the demo's world gets ``images_per_look``
    images captioned with what they show (:func:`caption`, e.g. ``"a photo of a dark red car,
    with vertical stripes."``), and the image tower learns to pick its caption among all of them
    (CLIP's image-to-text contrastive loss, with both towers trained). The captions never name
    a class: like CLIP, the tiny model learns colours and stripes, not the demo's car models.
    The images are drawn afresh (seed ``seed + 1000``), not the dataset's.

    Returns:
        ``path``, a state-dict file for ``model.clip_name=tiny-random model.pretrained=PATH``.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    generator = np.random.default_rng(seed + 1000)
    model = tiny_clip().to(device)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    transform = open_clip.image_transform(
        preprocess["size"], is_train=False, mean=preprocess.get("mean"), std=preprocess.get("std")
    )
    colours = num_colours(num_classes)
    appearances = [
        (colour, brightness, stripes)
        for colour in range(colours)
        for brightness in range(len(BRIGHTNESS))
        for stripes in range(len(STRIPES))
    ]
    images, targets_list = [], []
    for index, look in enumerate(appearances):
        for _ in range(images_per_look):
            images.append(transform(appearance_image(*look, colours, generator)))
            targets_list.append(index)
    pixels = torch.stack(images).to(device)
    targets = torch.tensor(targets_list, device=device)
    texts = [caption(*look, colours) for look in appearances]
    tokens = open_clip.get_tokenizer(TINY_TOKENIZER)(texts).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sampler = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(len(pixels), (batch_size,), generator=sampler).to(device)
        image_features = F.normalize(model.encode_image(pixels[batch]), dim=-1)
        text_features = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        loss = F.cross_entropy(logits, targets[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        image_features = F.normalize(model.encode_image(pixels), dim=-1)
        text_features = F.normalize(model.encode_text(tokens), dim=-1)
        picked = (image_features @ text_features.T).argmax(dim=-1)
        centroids = F.normalize(
            torch.stack([image_features[targets == index].mean(0) for index in range(len(texts))]),
            dim=-1,
        )
        index = {look: position for position, look in enumerate(appearances)}
        look_cosines = torch.stack(
            [
                centroids[index[appearance(label, 0)]] @ centroids[index[appearance(label, 1)]]
                for label in range(num_classes)
            ]
        )
    accuracy = 100.0 * (picked == targets).float().mean().item()
    logger.info(
        "pre-trained the tiny CLIP contrastively: %d steps on %d synthetic images captioned "
        "with their colour, brightness and stripes (%d captions, no class names) in %.1fs; it "
        "now picks the right caption for %.0f%% of them, and the two looks of a class have "
        "image-feature centroids at cosine %.2f on average (at most %.2f)",
        steps,
        len(pixels),
        len(texts),
        time.perf_counter() - start,
        accuracy,
        look_cosines.mean().item(),
        look_cosines.max().item(),
    )
    state = model.cpu().state_dict()
    files.atomic_write(path, lambda file: torch.save(state, file))
    return Path(path)


#: The demo's configuration; each row's recipe goes on top of it.
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
#: The synthetic dataset's size: 8 classes, 8 training images each (4 per look), 10 test images.
NUM_CLASSES = 8

#: The rows of the demo, each a recipe as settings; what a recipe leaves out is promptmix's default.
#: All three train OffsetMixtureOfPrompts with the same optimiser (demo.yaml); ``train_cars.py``
#: passes the learner's ``prior_loss()`` to the loss, which these two recipes weigh 0.
RECIPES: dict[str, dict[str, Any]] = {
    # CoOp's reference: one prompt per class, plain cross-entropy, from the class's text prompt.
    "one prompt": {
        "model.n_subprompts": 1, "model.init": "text", "model.init_noise_std": 0.0,
        "model.share_looks": False, "model.subprompt_prior_weight": 0.0,
        "model.mixture_loss_weight": 0.0, "model.entropy_loss_weight": 0.0,
        "model.diversity_loss_weight": 0.0, "model.label_noise": 0.0,
    },
    # The mixture as it was before promptmix: each class's looks its own, tau annealed
    # 1 -> 0.05, EM pull 1, nothing against collapse, every sub-prompt from the class's text
    # prompt plus noise, no prior, every label trusted.
    "uncured": {
        "model.init": "text", "model.share_looks": False, "model.subprompt_prior_weight": 0.0,
        "model.mixture_loss_weight": 1.0, "model.entropy_loss_weight": 0.0,
        "model.diversity_loss_weight": 0.0, "model.label_noise": 0.0, "model.assignment": "soft",
        "model.em_tau_start": 1.0, "model.em_tau_end": 0.05, "model.em_tau_schedule": "linear",
    },
    # The recipe: promptmix's defaults (looks shared by all classes, the learner's prior, label
    # noise 0.1) and its one initialisation call, initialize_from_kmeans.
    "defaults": {"model.init": "kmeans"},
}
#: Settings the demo decides itself: its data, its CLIP and its folders.
OWN = ("data.", "model.clip_name", "model.pretrained", "model.tokenizer", "model.learner",
       "output.output_dir")


def run(args: Any, run_log: files.RunLog, *, train: Callable[..., dict[str, Any]]) -> None:
    """``train_cars.py --demo``: the world, then each row trained by ``train`` (the script's);
    the table and the command that evaluates a row's checkpoint go to stdout."""
    world = World(args.output_dir, args.config, args.overrides)  # checked, nothing written yet
    with session(world.device) as runtime, one_thread():
        if runtime.distributed:
            raise UsageError("--demo: expected one process, got a torchrun job")
        results, name = {}, "set-up"
        try:
            world.build(run_log)  # the synthetic cars and the tiny CLIP, under the demo's folder
            for name, cfg in world.rows.items():
                logger.info("demo row '%s': %s", name, world.recipes[name])
                results[name] = train(cfg, runtime, run_log, log_since=run_log.mark())
        except (KeyboardInterrupt, Stopped) as stop:
            if isinstance(stop, Stopped) and stop.status != 130:
                raise
            raise Stopped(
                f"interrupted in the demo's {name}; what it wrote is in {world.folder}; start it "
                f"again with: {command('--demo')}",
                130,
            ) from None
    print(world.report(results, args.write_docs), end="")
    print("evaluate a row's checkpoint with:", command("--evaluate", world.checkpoint("defaults")))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread: the tiny model's ops are too small to gain from more, and on a busy
    machine idle-spinning OpenMP threads make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class World:
    """The demo's folder, its synthetic data, its tiny CLIP and the settings of each row.

    Everything is checked when it is made, before anything is written: settings the demo would
    ignore are refused, and so is an ``--output-dir`` that holds files already.
    """

    def __init__(self, output_dir: Path | None, config: Path | None, overrides: Sequence[str]):
        recipe_keys = {key for recipe in RECIPES.values() for key in recipe}
        ignored = [k for k in override_keys(overrides) if k.startswith(OWN) or k in recipe_keys]
        errors = [
            f"{key}: expected no override with --demo (the demo sets it: its own data, tiny "
            "CLIP, folders and the rows' recipes), got one"
            for key in ignored
        ]
        if errors:
            raise UsageError(*errors)
        if output_dir is None:
            self.folder = files.fresh_folder(Path("runs/cars_demo"))
        elif output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
            files.check_writable(output_dir, "--output-dir")
            raise UsageError(
                f"--output-dir {output_dir}: expected a new or empty folder for the demo, got "
                "one holding files"
            )
        else:
            self.folder = output_dir
        files.check_writable(self.folder, "--output-dir")
        self.recipes = {
            name: " ".join(f"{k}={v}" for k, v in recipe.items()) or "promptmix's defaults"
            for name, recipe in RECIPES.items()
        }
        absolute = self.folder.resolve()
        self.rows: dict[str, DictConfig] = {}
        refused: dict[str, list[str]] = {}  # message: the rows that refuse the settings
        for name, recipe in RECIPES.items():
            try:
                self.rows[name] = load(
                    config or DEMO_CONFIG,
                    [*(f"{key}={value}" for key, value in recipe.items()), *overrides],
                    flags={
                        "data.root": str(absolute / "data"),
                        "model.pretrained": str(absolute / "tiny_clip.pt"),
                        "output.output_dir": str(self.folder / name.replace(" ", "_")),
                    },
                )
            except UsageError as error:
                for message in error.messages:
                    refused.setdefault(message, []).append(name)
        if refused:  # each message once, naming the rows it concerns unless it is all of them
            raise UsageError(*(
                message if len(rows) == len(RECIPES) else
                f"{message} (in the demo's {' and '.join(map(repr, rows))} "
                f"row{'s' * (len(rows) > 1)})"
                for message, rows in refused.items()))
        first = next(iter(self.rows.values()))
        plots.check_classes(first.output.plot_classes, NUM_CLASSES)
        self.device = first.train.device

    def checkpoint(self, name: str) -> Path:
        """The checkpoint of row ``name``."""
        return Path(self.rows[name].output.output_dir) / "checkpoints" / "last.pt"

    def build(self, run_log: files.RunLog) -> None:
        """Write the synthetic Stanford Cars and pre-train the tiny CLIP, under the folder."""
        run_log.write_to(self.folder / "demo.log")
        data = self.folder / "data"
        partial = self.folder / ".data.partial"
        shutil.rmtree(partial, ignore_errors=True)
        write_synthetic_cars(partial, num_classes=NUM_CLASSES)
        os.replace(partial, data)  # the dataset appears whole, or not at all
        logger.info("demo: synthetic Stanford Cars (devkit layout) in %s", data)
        pretrain_tiny_clip(self.folder / "tiny_clip.pt", NUM_CLASSES)

    def report(self, results: dict[str, dict[str, Any]], docs: Path | None) -> str:
        """The table (also ``results.md``) and the galleries of the classes where the mixtures
        differ most; with ``docs``, a copy of the log, the table and the pictures for the docs."""
        lines = [
            "| run | accuracy | dominant share | effective K | accuracy at step 0 |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, result in results.items():
            report = result["train"]["report"]
            lines.append(
                f"| {name} | {result['final']['accuracy']:.1f}% | {report.dominant_share:.2f} | "
                f"{report.effective_subprompts:.2f} | {result['start']['accuracy']:.1f}% |"
            )
        table = "\n".join(lines) + "\n"
        files.write_text(self.folder / "results.md", table)
        classes, why = differing_classes(results["uncured"], results["defaults"])
        data = results["defaults"]["data"]
        gallery = plots.compare_galleries(
            [(name, data.train, results[name]["train"]["responsibilities"])
             for name in ("uncured", "defaults")],
            class_ids=classes, classnames=data.classnames, top_n=4,
            path=self.folder / "galleries.png", title=f"The classes where {why}",
        )
        if docs is not None:
            self._write_docs(docs, table, gallery)
        return table + f"\nGalleries of the classes where {why}: {gallery}\n"

    def _write_docs(self, docs: Path, table: str, gallery: Path) -> None:
        files.write_text(docs / "demo_results.md", table)
        copies = {gallery: docs / "galleries.png"}
        for name, cfg in self.rows.items():
            pictures = ("training_curves.png", "similarity.png")
            for picture in pictures[: 2 if cfg.model.n_subprompts != 1 else 1]:
                source = Path(cfg.output.output_dir) / "plots" / picture
                copies[source] = docs / f"{name.replace(' ', '_')}_{picture}"
        for source, target in copies.items():
            files.atomic_write(target, lambda file, source=source: file.write(source.read_bytes()))
        # The log without its clock times and details, and the demo's folder named as by a reader.
        text = "".join(line for line in (self.folder / "demo.log").read_text().splitlines(True)
                       if " DEBUG " not in line[:16])
        text = text.replace(str(self.folder.resolve()), "runs/cars_demo")
        text = text.replace(str(self.folder), "runs/cars_demo")
        files.write_text(docs / "demo.log", re.sub(r"(?m)^\d\d:\d\d:\d\d ", "", text))
        logger.info("docs: wrote the demo's table, log and pictures into %s", docs)


def differing_classes(first: dict[str, Any], second: dict[str, Any], count: int = 2,
                      ) -> tuple[list[int], str]:
    """The ``count`` classes where two rows differ most (dominant share on the training images,
    plus test accuracy), and a sentence that says so."""
    labels = first["test_labels"].cpu()
    accuracy = [
        torch.zeros(len(r["train"]["class_share"])).index_add_(
            0, labels, (r["final"]["predictions"].cpu() == labels).float())
        / torch.bincount(labels, minlength=len(r["train"]["class_share"])).clamp_min(1)
        for r in (first, second)
    ]
    shares = [r["train"]["class_share"].cpu().nan_to_num(0.0) for r in (first, second)]
    gap = (shares[0] - shares[1]).abs() + (accuracy[0] - accuracy[1]).abs()
    classes = sorted(c for c in gap.argsort(descending=True, stable=True)[:count].tolist()
                     if gap[c] > 0.01)
    if not classes:
        return [0], "uncured and defaults agree (class 0 shown)"
    shown = "; ".join(
        f"class {c}: dominant share {shares[0][c]:.2f} vs {shares[1][c]:.2f}, test accuracy "
        f"{100 * accuracy[0][c]:.0f}% vs {100 * accuracy[1][c]:.0f}%"
        for c in classes
    )
    return classes, f"uncured and defaults differ most ({shown})"
