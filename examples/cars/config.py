"""The settings of ``train_cars.py``: a typed schema, YAML files and ``key=value`` overrides.

Defaults live once, in promptmix: a setting of a promptmix object left ``null`` means "the
library's default", and ``train_cars.py`` then builds the object without that argument. The
schema below holds only the example's own defaults (data, optimiser, outputs). Every value is
checked when the configuration loads, and every bad key is reported, not just the first.

Examples:
    >>> cfg = load(None, ["model.n_subprompts=4", "train.epochs=2"])
    >>> cfg.model.n_subprompts, cfg.train.epochs, cfg.model.mixture_loss_weight
    (4, 2, None)
    >>> load(None, ["train.lr=-1", "train.seed=-1"])
    Traceback (most recent call last):
    cars.UsageError: train.seed: expected an integer >= 0, got -1
    train.lr: expected a finite number > 0, got -1.0
"""

from __future__ import annotations

import argparse
import difflib
import functools
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import promptmix.functional as PF
from cars import UsageError

logger = logging.getLogger(__name__)

#: ``model.clip_name`` of the small random-init CLIP that ``--demo`` and the tests build.
TINY_CLIP_NAME = "tiny-random"
#: ``model.ctx_init`` for CoOp's random context (promptmix's ``ctx_init=None``).
RANDOM_CONTEXT = "random"


@dataclass
class ModelConfig:
    """The frozen CLIP, the sub-prompt learner and the objective (``null``: promptmix's default)."""

    clip_name: str = "ViT-B-16"
    pretrained: str | None = "openai"
    tokenizer: str | None = None
    learner: str = "offset"
    init: str = "kmeans"
    n_subprompts: int | None = None
    n_ctx: int | None = None
    ctx_init: str | None = None
    class_specific: bool | None = None
    init_noise_std: float | None = None
    gradient_checkpointing: bool | None = None
    share_looks: bool | None = None
    text_prior_weight: float | None = None
    subprompt_prior_weight: float | None = None
    prior_count: float | None = None
    em_tau_start: float | None = None
    em_tau_end: float | None = None
    em_tau_schedule: str | None = None
    assignment: str | None = None
    sinkhorn_iterations: int | None = None
    entropy_mode: str | None = None
    aggregation: str | None = None
    mixture_loss_weight: float | None = None
    diversity_loss_weight: float | None = None
    entropy_loss_weight: float | None = None
    label_noise: float | None = None
    hand_crafted_templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    anchor_loss_weight: float = 0.0
    anchor_distance: str | None = None
    zero_shot_loss_weight: float = 0.0
    zero_shot_temperature: float | None = None
    zero_shot_reduction: str | None = None
    zero_shot_average_over_classes: bool | None = None
    text_to_text_loss_weight: float = 0.0
    text_to_text_noise_std: float | None = None
    dispersion_loss_weight: float = 0.0
    dispersion_bandwidth: float | None = None
    prograd: bool = False
    prograd_strength: float | None = None
    prompt_averaging: bool = False
    prompt_averaging_mean: float | None = None
    prompt_averaging_std: float | None = None


@dataclass
class DataConfig:
    root: str | None = None
    layout: str = "auto"
    split_file: str = "split_zhou_StanfordCars.json"
    subsample_classes: str = "all"


@dataclass
class TrainConfig:
    shots: int | None = 16
    seed: int = 1
    epochs: int = 8
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    warmup_start_lr: float = 1e-5
    min_lr: float | None = None
    grad_clip_norm: float | None = None
    precision: str = "auto"
    device: str = "auto"
    augment: bool = False
    augment_views: int = 0
    eval_every: int = 1
    encode_batch_size: int = 256
    num_workers: int = 4


@dataclass
class OutputConfig:
    output_dir: str = "runs/stanford_cars"
    tensorboard: bool = False
    progress_bar: bool = True
    log_every: int = 10
    plots: bool = True
    plot_classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    plot_top_images: int = 6
    collapse_cosine_threshold: float = 0.9
    collapse_share_threshold: float = 0.9


@dataclass
class ExperimentConfig:
    """Everything a run reads; ``examples/configs/default.yaml`` documents every key."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


#: Allowed values; promptmix's own modes are read from ``promptmix.functional``.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.learner": ("mixture", "offset"),
    "model.init": ("kmeans", "text"),
    "model.em_tau_schedule": PF.SCHEDULE_KINDS,
    "model.assignment": PF.ASSIGNMENT_MODES,
    "model.entropy_mode": PF.ENTROPY_MODES,
    "model.aggregation": PF.AGGREGATIONS,
    "model.anchor_distance": PF.ANCHOR_DISTANCES,
    # A regularizer must return one number: not the per-sample "none".
    "model.zero_shot_reduction": tuple(r for r in PF.REDUCTIONS if r != "none"),
    "data.layout": ("auto", "original", "coop", "folders"),
    "data.subsample_classes": ("all", "base", "new"),
    "train.optimizer": ("sgd", "adamw"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
}

#: Old spellings of values, still read, with a warning: ``(key, old value): new value``.
OLD_VALUES: dict[tuple[str, Any], Any] = {
    # promptmix 1.0 has one reduction vocabulary: KL's "batchmean" is its "mean".
    ("model.zero_shot_reduction", "batchmean"): "mean",
}

Check = tuple[str, Callable[[Any], bool], str]


def _finite(low: float | None = None, *, above: bool = False, high: float | None = None,
            below: float | None = None) -> Any:
    def test(value: Any) -> bool:
        ok = math.isfinite(value) and (low is None or (value > low if above else value >= low))
        return ok and (high is None or value <= high) and (below is None or value < below)

    return test


def _at_least(low: int) -> Callable[[Any], bool]:
    return lambda value: value >= low


_WEIGHT = (_finite(0), "a finite number >= 0")
_POSITIVE = (_finite(0, above=True), "a finite number > 0")
_UNIT = (_finite(0, high=1), "a number in [0, 1]")
CHECKS: list[Check] = [
    ("model.n_subprompts", _at_least(1), "an integer >= 1"),
    ("model.n_ctx", _at_least(1), "an integer >= 1"),
    ("model.init_noise_std", *_WEIGHT),
    ("model.text_prior_weight", *_WEIGHT),
    ("model.subprompt_prior_weight", *_WEIGHT),
    ("model.prior_count", *_WEIGHT),
    ("model.label_noise", _finite(0, below=1), "a number in [0, 1)"),
    ("model.em_tau_start", *_POSITIVE),
    ("model.em_tau_end", *_POSITIVE),
    ("model.sinkhorn_iterations", _at_least(1), "an integer >= 1"),
    *[
        (f"model.{name}_loss_weight", *_WEIGHT)
        for name in (
            "mixture", "diversity", "entropy", "anchor", "zero_shot", "text_to_text", "dispersion"
        )
    ],
    ("model.zero_shot_temperature", *_POSITIVE),
    ("model.text_to_text_noise_std", *_WEIGHT),
    ("model.dispersion_bandwidth", *_POSITIVE),
    ("model.prograd_strength", *_WEIGHT),
    ("model.prompt_averaging_mean", _finite(), "a finite number (in epochs)"),
    ("model.prompt_averaging_std", *_POSITIVE),
    (
        "model.hand_crafted_templates",
        lambda value: len(value) >= 1 and all(t.count("{}") == 1 for t in value),
        "a non-empty list of templates with one {} each",
    ),
    ("train.shots", _at_least(1), "an integer >= 1, or null for every image"),
    ("train.seed", _at_least(0), "an integer >= 0"),
    ("train.epochs", _at_least(1), "an integer >= 1"),
    ("train.batch_size", _at_least(1), "an integer >= 1"),
    ("train.lr", *_POSITIVE),
    ("train.momentum", _finite(0, high=1), "a number in [0, 1]"),
    ("train.weight_decay", *_WEIGHT),
    ("train.warmup_epochs", *_WEIGHT),
    ("train.warmup_start_lr", *_WEIGHT),
    ("train.min_lr", _finite(0), "a finite number >= 0, or null (no decay)"),
    ("train.grad_clip_norm", _finite(0, above=True), "a finite number > 0, or null (no clip)"),
    ("train.augment_views", _at_least(0), "an integer >= 0"),
    ("train.eval_every", _at_least(1), "an integer >= 1"),
    ("train.encode_batch_size", _at_least(1), "an integer >= 1"),
    ("train.num_workers", _at_least(0), "an integer >= 0"),
    ("output.log_every", _at_least(1), "an integer >= 1"),
    ("output.plot_classes", lambda value: all(c >= 0 for c in value), "class indices >= 0"),
    ("output.plot_top_images", _at_least(1), "an integer >= 1"),
    ("output.collapse_cosine_threshold", *_UNIT),
    ("output.collapse_share_threshold", *_UNIT),
]


def valid_keys(node: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (or of ``node``), e.g. ``"model.n_subprompts"``."""
    if node is None:
        return list(_schema_keys())
    keys = []
    for name in node:
        child, dotted = node[name], f"{prefix}{name}"
        keys += valid_keys(child, f"{dotted}.") if isinstance(child, DictConfig) else [dotted]
    return keys


@functools.cache
def _schema_keys() -> tuple[str, ...]:
    return tuple(valid_keys(OmegaConf.structured(ExperimentConfig)))


def _suggest(bad_key: str) -> str:
    """`` Did you mean '...'?`` with the closest valid key (same name in another section first)."""
    keys = valid_keys()
    leaf = bad_key.rsplit(".", 1)[-1]
    same_leaf = [key for key in keys if key.rsplit(".", 1)[-1] == leaf]
    sections = sorted({key.split(".", 1)[0] for key in keys})
    close = same_leaf or difflib.get_close_matches(bad_key, keys + sections, n=1, cutoff=0.6)
    if not close:
        leaves = difflib.get_close_matches(leaf, [key.rsplit(".", 1)[-1] for key in keys], n=1)
        close = [key for key in keys if leaves and key.endswith(f".{leaves[0]}")]
    return f" Did you mean '{close[0]}'?" if close else ""


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"--config {path}: expected a YAML file, got {_what_is(path)}")
    try:
        loaded = OmegaConf.load(path)
    except (OmegaConfBaseException, UnicodeDecodeError, ValueError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(
            f"--config {path}: expected a YAML file, got unreadable text ({reason})"
        ) from None
    if not isinstance(loaded, DictConfig):
        got = "a list" if isinstance(loaded, ListConfig) else type(loaded).__name__
        raise UsageError(
            f"--config {path}: expected a mapping of sections (model:, data:, train:, output:), "
            f"got {got}"
        )
    return OmegaConf.to_container(loaded, resolve=False)  # type: ignore[return-value]


def _what_is(path: Path) -> str:
    return "a folder" if path.is_dir() else "nothing (no such file)"


def _leaves(node: Any, source: str, errors: list[str], prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of a nested mapping; a list is one value."""
    leaves: list[tuple[str, Any]] = []
    for name, value in node.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            leaves += _leaves(value, source, errors, f"{key}.")
        elif key in ("model", "data", "train", "output") and value is None:
            continue  # a section with every key commented out
        elif key in ("model", "data", "train", "output"):
            errors.append(f"{key} in {source}: expected a mapping of keys, got {value!r}")
        else:
            leaves.append((key, value))
    return leaves


def _set(cfg: DictConfig, key: str, value: Any, source: str, errors: list[str]) -> None:
    if key not in _schema_keys():
        errors.append(f"unknown key '{key}' in {source}.{_suggest(key)}")
        return
    if isinstance(value, str) and (key, value) in OLD_VALUES:
        logger.warning("%s=%s in %s is an old spelling: read as %s=%s", key, value, source, key,
                       OLD_VALUES[key, value])
        value = OLD_VALUES[key, value]
    try:
        OmegaConf.update(cfg, key, value, merge=False)
    except OmegaConfBaseException as error:
        del error  # omegaconf's message names neither the key nor what it expected
        errors.append(f"{key} in {source}: expected {_schema_type(key)}, got {value!r}")


def _schema_type(key: str) -> str:
    section, name = key.split(".")
    schema = {f.name: f.type for f in fields(ExperimentConfig)}[section]
    hint = str({f.name: f.type for f in fields(globals()[str(schema)])}[name])
    kinds = {"list": "a list", "int": "an integer", "float": "a number", "bool": "true or false"}
    kind = next((text for word, text in kinds.items() if hint.startswith(word)), "text")
    return kind + (" or null" if "None" in hint else "")


def _dotlist(overrides: Sequence[str], errors: list[str]) -> dict[str, Any]:
    malformed = [item for item in overrides if "=" not in item]
    if malformed:
        errors.append(f"overrides: expected key=value, got {' '.join(malformed)}")
    try:
        return OmegaConf.to_container(  # type: ignore[return-value]
            OmegaConf.from_dotlist([item for item in overrides if "=" in item])
        )
    except OmegaConfBaseException as error:
        errors.append(f"overrides: {str(error).splitlines()[0]}")
        return {}


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The dotted keys that ``key=value`` overrides set."""
    return [item.split("=", 1)[0].strip() for item in overrides if "=" in item]


def load(
    path: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    flags: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
) -> DictConfig:
    """The run's settings: schema, then ``base``, the YAML file, the overrides and the flags.

    Args:
        path: a YAML file with any subset of the keys (``None``: none).
        overrides: ``["model.n_subprompts=4", ...]``.
        flags: values set by the script's own flags (``--data-root``), taken as they are.
        base: a saved run's configuration (``--evaluate`` without ``--config``).

    Returns:
        A read-only ``DictConfig`` with interpolations resolved.

    Raises:
        UsageError: with one message per bad key or value.
    """
    errors: list[str] = []
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if base is not None:
        layers.append(("the checkpoint's settings", base))
    if path is not None:
        layers.append((str(path), _read_yaml(Path(path))))
    if overrides:
        layers.append(("the command line", _dotlist(overrides, errors)))
    cfg = OmegaConf.structured(ExperimentConfig)
    for source, layer in layers:
        for key, value in _leaves(layer, source, errors):
            _set(cfg, key, value, source, errors)
    for key, value in (flags or {}).items():
        _set(cfg, key, value, "the flags", errors)
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:
        raise UsageError(*errors, f"settings: {str(error).splitlines()[0]}") from None
    cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), resolved)
    errors += check(cfg)
    if errors:
        raise UsageError(*errors)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def check(cfg: DictConfig) -> list[str]:
    """One message per value out of its range (``null`` library options are not checked)."""
    errors = []
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            errors.append(f"{key}: expected one of {', '.join(allowed)}, got '{value}'.{hint}")
    for key, test, expected in CHECKS:
        value = OmegaConf.select(cfg, key)
        if value is not None and not test(value):
            errors.append(f"{key}: expected {expected}, got {value}")
    model, train = cfg.model, cfg.train
    if train.warmup_epochs > train.epochs:
        errors.append(
            f"train.warmup_epochs: expected at most train.epochs ({train.epochs}), "
            f"got {train.warmup_epochs}"
        )
    if model.prograd and not model.zero_shot_loss_weight:
        errors.append(
            "model.prograd: expected false unless model.zero_shot_loss_weight > 0 (ProGrad's "
            "reference gradient), got true"
        )
    errors += _context_length(model) + _learner_options(model)
    tau = (model.em_tau_start, model.em_tau_end)
    if None not in tau and tau[0] < tau[1]:
        logger.warning("model.em_tau_start (%s) is below model.em_tau_end (%s): the E-step "
                       "temperature rises during training; swap them unless you mean it", *tau)
    if model.zero_shot_loss_weight and model.zero_shot_reduction == "mean" and (
        model.zero_shot_average_over_classes is None
    ):
        logger.warning("model.zero_shot_reduction=mean is the batch mean since promptmix 1.0; "
                       "PromptSRC's division by batch x classes (the old 'mean') is "
                       "model.zero_shot_average_over_classes=true")
    return errors


#: Options only one learner takes: ``OffsetMixtureOfPrompts`` (offset), ``MixtureOfPrompts``.
LEARNER_OPTIONS = {
    "offset": ("share_looks", "text_prior_weight", "subprompt_prior_weight"),
    "mixture": ("n_ctx", "class_specific", "gradient_checkpointing"),
}
LEARNERS = {"offset": "OffsetMixtureOfPrompts", "mixture": "MixtureOfPrompts"}


def _learner_options(model: DictConfig) -> list[str]:
    """Options the chosen learner or start would ignore: refused, not silently dropped."""
    errors = [
        f"model.{name}: expected null with model.learner={model.learner} (an option of "
        f"{LEARNERS[owner]}: model.learner={owner}), got {model[name]}"
        for owner, names in LEARNER_OPTIONS.items()
        for name in names
        if model.learner in LEARNERS and model.learner != owner and model[name] is not None
    ]
    if model.learner == "offset" and model.ctx_init == RANDOM_CONTEXT:
        errors.append(f"model.ctx_init: expected words with model.learner=offset (a random "
                      f"context is MixtureOfPrompts': model.learner=mixture), got {RANDOM_CONTEXT}")
    shared_start = model.learner == "offset" and model.init == "kmeans" and model.share_looks in (
        None, True)
    if model.prior_count is not None and not shared_start:
        errors.append(
            "model.prior_count: expected null unless model.learner=offset, model.init=kmeans "
            "and shared looks (the shrinkage of initialize_from_kmeans's shared-look start), "
            f"got {model.prior_count}"
        )
    return errors


def _context_length(model: DictConfig) -> list[str]:
    """``model.n_ctx`` against the tokens of ``model.ctx_init`` (CLIP's tokenizer counts them)."""
    phrase, n_ctx = model.ctx_init, model.n_ctx
    if model.learner != "mixture" or phrase in (None, RANDOM_CONTEXT) or n_ctx is None:
        return []  # a default of either side is promptmix's to check when the learner is built
    if model.clip_name.startswith("hf-hub:") or (model.tokenizer or "").startswith("hf-hub:"):
        return []
    tokens = len(_clip_tokenizer().encode(phrase))
    if tokens == n_ctx:
        return []
    return [
        f"model.n_ctx: expected the {tokens} tokens of model.ctx_init '{phrase}', got {n_ctx} "
        f"(set model.ctx_init={RANDOM_CONTEXT} for a random context of any length)"
    ]


@functools.cache
def _clip_tokenizer() -> Any:
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def differences(
    saved: Mapping[str, Any], cfg: DictConfig, *, only: Sequence[str] = ()
) -> list[str]:
    """``"key: saved -> now"`` for each key (under ``only``, if given) whose value differs."""
    now = _flat(OmegaConf.to_container(cfg, resolve=True))
    before = _flat(saved)
    return [
        f"{key}: {before.get(key)!r} -> {now.get(key)!r}"
        for key in sorted(before.keys() | now.keys())
        if before.get(key) != now.get(key) and (not only or key.startswith(tuple(only)))
    ]


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, Mapping):
        return {prefix[:-1]: node}
    items: dict[str, Any] = {}
    for key, value in node.items():
        items |= _flat(value, f"{prefix}{key}.")
    return items


#: Settings a resumed run may change: where the files are, and how fast features are computed.
RESUMABLE = (
    "data.root", "data.layout", "data.split_file", "output.", "train.device", "train.num_workers",
    "train.encode_batch_size", "train.eval_every",
)


def check_resumable(checkpoint: Mapping[str, Any], cfg: DictConfig, path: Path) -> None:
    """Refuse to resume a checkpoint of other settings, or of a finished run."""
    changed = [c for c in differences(checkpoint["config"], cfg) if not c.startswith(RESUMABLE)]
    if changed:
        raise UsageError(
            f"--resume {path}: expected the settings it was trained with, got other ones "
            f"({'; '.join(changed)}); start a new run in another --output-dir instead"
        )
    if checkpoint["epoch"] >= cfg.train.epochs:
        raise UsageError(
            f"--resume {path}: expected an unfinished run, got all {cfg.train.epochs} epochs "
            f"done; evaluate it with --evaluate {path}"
        )


def training_settings(args: argparse.Namespace) -> DictConfig:
    """A training run's settings: ``--config`` (else ``default.yaml``), overrides and flags."""
    cfg = load(args.config or SCRIPT.parent / "configs" / "default.yaml", args.overrides,
               flags=args.flags)
    if cfg.data.root is None:
        raise UsageError("--data-root: expected the Stanford Cars folder, got none (or try --demo)")
    return cfg


def evaluation_settings(args: argparse.Namespace, checkpoint: Mapping[str, Any]) -> DictConfig:
    """``--evaluate``'s settings: the checkpoint's (or ``--config``'s), with the overrides; the
    model settings must be those it was trained with."""
    cfg = load(args.config, args.overrides, flags=args.flags,
               base=None if args.config else checkpoint["config"])
    changed = differences(checkpoint["config"], cfg, only=("model.",))
    if changed:
        raise UsageError(f"--evaluate {args.evaluate}: expected the model settings it was "
                         f"trained with, got other ones ({'; '.join(changed)})")
    return cfg


#: ``examples/train_cars.py``, the script these settings are for.
SCRIPT = Path(__file__).resolve().parents[1] / "train_cars.py"


def command(*arguments: object) -> str:
    """The command that runs ``train_cars.py`` with ``arguments``: this Python, that file."""
    python = "python" if shutil.which("python") == sys.executable else sys.executable
    script = os.path.relpath(SCRIPT)
    script = str(SCRIPT) if script.startswith("..") else script
    return " ".join([python, script, *map(str, arguments)])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line: flags, then ``key=value`` overrides; flags that cannot go together are
    refused. ``flags`` holds the settings the flags set."""
    parser = argparse.ArgumentParser(
        prog="train_cars.py",
        description="Train a mixture of prompts on few-shot Stanford Cars.",
        epilog="Overrides, e.g.: model.n_subprompts=4 train.epochs=2 train.shots=8",
    )
    parser.add_argument("--config", type=Path, help="YAML settings (default: configs/default.yaml)")
    parser.add_argument("--data-root", type=Path, help="the Stanford Cars folder (data.root)")
    parser.add_argument("--output-dir", type=Path, help="where to write (output.output_dir)")
    parser.add_argument("--resume", action="store_true", help="continue OUTPUT_DIR's run")
    parser.add_argument("--resume-from", type=Path, metavar="CHECKPOINT", help="... from a file")
    parser.add_argument(
        "--evaluate", type=Path, metavar="CHECKPOINT",
        help="test the prompts of CHECKPOINT (on its settings, or --config's), without training",
    )
    parser.add_argument("--demo", action="store_true", help="a tour on synthetic data, offline")
    parser.add_argument("--write-docs", type=Path, metavar="DIR", help="with --demo: docs' copy")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="setting overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may come between the flags
    resuming = args.resume or args.resume_from is not None
    conflicts = [
        (args.evaluate is not None and resuming,
         "--evaluate: expected no --resume (an evaluation trains nothing), got one"),
        (args.resume and args.resume_from is not None,
         "--resume: expected --resume or --resume-from, got both"),
        (args.write_docs is not None and not args.demo,
         "--write-docs: expected --demo with it (it copies the demo's outputs), got none"),
        (args.demo and (args.data_root or resuming or args.evaluate is not None),
         "--demo: expected no --data-root, --resume or --evaluate (the demo makes its own data "
         "and starts from scratch), got one"),
    ]
    errors = [message for bad, message in conflicts if bad]
    if errors:
        raise UsageError(*errors)
    args.flags = {
        key: str(value)
        for key, value in (("data.root", args.data_root), ("output.output_dir", args.output_dir))
        if value is not None and not (args.evaluate and key == "output.output_dir")
    }
    return args


def to_yaml(cfg: DictConfig) -> str:
    """The resolved settings as YAML (a run's ``config.yaml``)."""
    return OmegaConf.to_yaml(cfg, resolve=True)
