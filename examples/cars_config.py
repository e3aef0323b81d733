"""Configuration of the Stanford Cars example: typed dataclasses merged with YAML and overrides.

The schema is an omegaconf *structured config*: every key, its type and its default live in the
dataclasses below. A YAML file only needs the keys it changes, so an old config written before the
regularisers existed still runs with their defaults, while an unknown or misspelt key is an error
that names it and suggests the closest valid key.

Examples:
    >>> cfg = load_config(None, ["model.n_subprompts=4", "train.epochs=2"])
    >>> cfg.model.n_subprompts, cfg.train.epochs, cfg.model.diversity_loss_weight
    (4, 2, 0.1)
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

#: Reserved ``model.clip_name`` for the small random-init CLIP used by ``--demo`` and the tests.
TINY_CLIP_NAME = "tiny-random"


class ConfigError(ValueError):
    """A configuration value or key that the example cannot use."""


@dataclass
class ModelConfig:
    """The frozen open_clip backbone and the mixture-of-prompts learner and objective."""

    #: open_clip model name (``open_clip.list_models()``), or ``"tiny-random"``.
    clip_name: str = "ViT-B-16"
    #: pretrained tag (``open_clip.list_pretrained_tags_by_model``), a local checkpoint file, or
    #: ``null`` for random weights.
    pretrained: str | None = "openai"
    #: open_clip tokenizer name; ``null`` uses ``clip_name`` (``ViT-B-32`` for ``tiny-random``).
    tokenizer: str | None = None
    #: ``"mixture"`` (CoOp-style learned contexts) or ``"offset"`` (frozen class text + offsets).
    learner: str = "mixture"
    #: K, the number of sub-prompts per class.
    n_subprompts: int = 8
    #: number of learned context tokens per sub-prompt.
    n_ctx: int = 4
    #: words that initialise the context (``null``: random init).
    ctx_init: str | None = "a photo of a"
    #: one context per class (CoOp's class-specific context) instead of one shared by all classes.
    class_specific: bool = True
    #: noise that starts the K sub-prompts apart, in units of a typical token embedding.
    init_noise_std: float = 0.1
    #: re-encode prompt chunks during backward instead of storing them (less GPU memory).
    gradient_checkpointing: bool = False
    #: E-step temperature at the first step.
    em_tau_start: float = 1.0
    #: E-step temperature at the last step; 0.3 rather than 0.05 keeps assignments soft.
    em_tau_end: float = 0.3
    #: shape of the temperature annealing: ``"linear"``, ``"cosine"`` or ``"exponential"``.
    em_tau_schedule: str = "linear"
    #: E-step: ``"soft"`` (posterior), ``"hard"`` (one-hot argmax) or ``"sinkhorn"`` (balanced).
    assignment: str = "soft"
    #: Sinkhorn-Knopp rounds of ``assignment: sinkhorn``.
    sinkhorn_iterations: int = 3
    #: what the entropy term spreads: ``"marginal"`` (per-class usage; promptmix's default),
    #: ``"sample"`` (the design note's) or ``"mutual_information"``.
    entropy_mode: str = "marginal"
    #: how sub-prompt similarities become class logits: ``"logsumexp"``, ``"max"``, ``"mean"``,
    #: ``"responsibility"``.
    aggregation: str = "logsumexp"
    #: weight of the mixture (EM) term.
    mixture_loss_weight: float = 1.0
    #: weight of the pairwise-cosine penalty between a class's sub-prompts.
    diversity_loss_weight: float = 0.1
    #: weight of the assignment entropy (maximised); 0.3 with marginal entropy stops collapse in
    #: benchmarks/collapse.py where the design note's 0.01 sample entropy does not.
    entropy_loss_weight: float = 0.3
    #: hand-crafted prompts (``{}`` is the class name) whose frozen text features, averaged over
    #: the templates, are the anchors and the zero-shot classifier, and LASP's targets.
    hand_crafted_templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    #: weight of ``PromptAnchor`` (KgCoOp: 8 with ``cosine``; PromptSRC: 25 with ``l1``); 0: off.
    anchor_loss_weight: float = 0.0
    #: ``"cosine"`` (KgCoOp's code), ``"l2"`` (KgCoOp's paper) or ``"l1"`` (PromptSRC).
    anchor_distance: str = "cosine"
    #: weight of ``ZeroShotConsistency``, KL to the hand-crafted classifier (PromptSRC: 1); 0: off.
    zero_shot_loss_weight: float = 0.0
    #: distillation temperature of the zero-shot KL (not the E-step's tau).
    zero_shot_temperature: float = 1.0
    #: ``"batchmean"`` (ProGrad's) or ``"mean"`` (PromptSRC's: divided by batch * classes).
    zero_shot_reduction: str = "batchmean"
    #: weight of LASP's text-to-text loss (LASP: 5); 0: off.
    text_to_text_loss_weight: float = 0.0
    #: standard deviation of the noise on the text-to-text targets (LASP: 0.05), 0: none.
    text_to_text_noise_std: float = 0.0
    #: weight of DAPT's inter-class dispersion of the text features (DAPT: 0.1); 0: off.
    dispersion_loss_weight: float = 0.0
    #: bandwidth t of the dispersion's Gaussian potential exp(-t d^2) (DAPT: 2).
    dispersion_bandwidth: float = 2.0
    #: ProGrad: project the rest of the loss's gradient off the direction that opposes the
    #: zero-shot KL's (needs ``zero_shot_loss_weight > 0``; one process).
    prograd: bool = False
    #: ProGrad's lambda: 1 removes the whole conflicting component.
    prograd_strength: float = 1.0
    #: PromptSRC's Gaussian-weighted average of the prompts over epochs, used after training.
    prompt_averaging: bool = False
    #: centre of the Gaussian over epochs (PromptSRC: 15 of 20 epochs).
    prompt_averaging_mean: float = 15.0
    #: width of the Gaussian over epochs (PromptSRC: 1).
    prompt_averaging_std: float = 1.0


@dataclass
class DataConfig:
    """Where the Stanford Cars files are and how they are laid out."""

    #: dataset folder; ``--data-root`` on the command line sets it.
    root: str | None = None
    #: ``"auto"``, ``"original"``, ``"coop"`` or ``"folders"`` (see ``cars_data.py``).
    layout: str = "auto"
    #: name of CoOp's split file inside ``root`` (the ``"coop"`` layout).
    split_file: str = "split_zhou_StanfordCars.json"
    #: CoCoOp's base-to-new protocol: ``"all"`` classes, the ``"base"`` half (the first
    #: ceil(n/2) labels) or the ``"new"`` half (the rest), each relabelled from 0. The few-shot
    #: sample is drawn over all classes first, so a seed picks the same images in every setting.
    subsample_classes: str = "all"


@dataclass
class TrainConfig:
    """Few-shot sampling, optimisation and the execution settings."""

    #: training images per class (CoOp uses 1, 2, 4, 8, 16); ``null`` for the full training split.
    shots: int | None = 16
    #: seed of the few-shot sample, the initialisation and the data order.
    seed: int = 1
    epochs: int = 50
    #: global batch size, split evenly between the processes of a ``torchrun`` job.
    batch_size: int = 32
    #: ``"sgd"`` or ``"adamw"``.
    optimizer: str = "sgd"
    lr: float = 0.002
    #: SGD momentum.
    momentum: float = 0.9
    weight_decay: float = 5e-4
    #: epochs of linear warm-up from ``warmup_start_lr`` to ``lr``, then cosine decay to
    #: ``min_lr``.
    warmup_epochs: float = 1.0
    warmup_start_lr: float = 1e-5
    min_lr: float = 0.0
    #: largest gradient norm (``null``: no clipping).
    grad_clip_norm: float | None = 1.0
    #: ``"auto"`` (bf16 or fp16 autocast on CUDA, fp32 on CPU), ``"fp32"``, ``"bf16"``, ``"fp16"``.
    precision: str = "auto"
    #: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``.
    device: str = "auto"
    #: random flips and crops of the training images; without them features are cached exactly.
    augment: bool = False
    #: with ``augment``: augmented views per image encoded once and cached (0: encode every step).
    augment_views: int = 0
    #: evaluate on the test split every this many epochs (and always after the last).
    eval_every: int = 1
    #: images per batch when encoding images with the frozen encoder.
    encode_batch_size: int = 256
    #: image-loading worker processes.
    num_workers: int = 4


@dataclass
class OutputConfig:
    """Logs, checkpoints, pictures and diagnostics."""

    output_dir: str = "runs/stanford_cars"
    #: also write TensorBoard event files under ``output_dir/tensorboard``.
    tensorboard: bool = False
    #: show a tqdm progress bar per epoch.
    progress_bar: bool = True
    #: write a JSON line with the loss terms every this many steps.
    log_every: int = 10
    #: draw the pictures (galleries, histogram, heatmaps, curves) at the end of the run.
    plots: bool = True
    #: class indices whose sub-prompt galleries and similarity heatmaps are drawn.
    plot_classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    #: images per sub-prompt in a gallery.
    plot_top_images: int = 6
    #: a class whose sub-prompts' mean pairwise cosine exceeds this counts as collapsed.
    collapse_cosine_threshold: float = 0.9
    #: ... or whose most-used sub-prompt takes more than this share of its images.
    collapse_share_threshold: float = 0.9


@dataclass
class ExperimentConfig:
    """Everything a run of ``train_cars.py`` reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


#: Allowed values of the string-valued choices.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.learner": ("mixture", "offset"),
    "model.em_tau_schedule": ("linear", "cosine", "exponential"),
    "model.assignment": ("soft", "hard", "sinkhorn"),
    "model.entropy_mode": ("sample", "marginal", "mutual_information"),
    "model.aggregation": ("logsumexp", "max", "mean", "responsibility"),
    "model.anchor_distance": ("cosine", "l2", "l1"),
    "model.zero_shot_reduction": ("batchmean", "mean", "sum"),
    "data.layout": ("auto", "original", "coop", "folders"),
    "data.subsample_classes": ("all", "base", "new"),
    "train.optimizer": ("sgd", "adamw"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
}


def valid_keys(node: Any = None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema (or of ``node``), e.g. ``"model.n_subprompts"``."""
    node = OmegaConf.structured(ExperimentConfig) if node is None else node
    keys = []
    for name in node:
        child = node[name]
        dotted = f"{prefix}{name}"
        keys.extend(valid_keys(child, f"{dotted}.") if isinstance(child, DictConfig) else [dotted])
    return keys


def suggest_key(bad_key: str) -> str | None:
    """The valid key closest to ``bad_key``: same name in another section, else closest spelling."""
    keys = valid_keys()
    leaf = bad_key.rsplit(".", 1)[-1]
    same_leaf = [key for key in keys if key.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return same_leaf[0]
    sections = {key.split(".", 1)[0] for key in keys}
    close = difflib.get_close_matches(bad_key, keys + sorted(sections), n=1, cutoff=0.6)
    if close:
        return close[0]
    close_leaf = difflib.get_close_matches(leaf, [key.rsplit(".", 1)[-1] for key in keys], n=1)
    return next((key for key in keys if close_leaf and key.endswith(f".{close_leaf[0]}")), None)


def _unknown_key_error(bad_key: str, source: str) -> ConfigError:
    suggestion = suggest_key(bad_key)
    hint = f" Did you mean '{suggestion}'?" if suggestion else ""
    return ConfigError(
        f"Unknown config key '{bad_key}' in {source}.{hint} "
        f"Valid keys are listed in examples/configs/default.yaml."
    )


def _merge(base: DictConfig, update: DictConfig, source: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(base, update)
    except ConfigKeyError as error:
        raise _unknown_key_error(str(error.full_key), source) from None
    except OmegaConfBaseException as error:
        message = str(error).splitlines()[0]
        raise ConfigError(f"Bad value for '{error.full_key}' in {source}: {message}") from None
    assert isinstance(merged, DictConfig)
    return merged


def _check_choices(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{key} must be one of {list(allowed)} but is '{value}'.{hint}")


def _check_ranges(cfg: DictConfig) -> None:
    checks = [
        ("model.n_subprompts", cfg.model.n_subprompts >= 1, ">= 1"),
        ("model.n_ctx", cfg.model.n_ctx >= 1, ">= 1"),
        ("model.init_noise_std", cfg.model.init_noise_std >= 0, ">= 0"),
        ("model.em_tau_start", cfg.model.em_tau_start > 0, "> 0"),
        ("model.em_tau_end", cfg.model.em_tau_end > 0, "> 0"),
        ("model.mixture_loss_weight", cfg.model.mixture_loss_weight >= 0, ">= 0"),
        ("model.diversity_loss_weight", cfg.model.diversity_loss_weight >= 0, ">= 0"),
        ("model.entropy_loss_weight", cfg.model.entropy_loss_weight >= 0, ">= 0"),
        ("model.anchor_loss_weight", cfg.model.anchor_loss_weight >= 0, ">= 0"),
        ("model.zero_shot_loss_weight", cfg.model.zero_shot_loss_weight >= 0, ">= 0"),
        ("model.zero_shot_temperature", cfg.model.zero_shot_temperature > 0, "> 0"),
        ("model.text_to_text_loss_weight", cfg.model.text_to_text_loss_weight >= 0, ">= 0"),
        ("model.text_to_text_noise_std", cfg.model.text_to_text_noise_std >= 0, ">= 0"),
        ("model.dispersion_loss_weight", cfg.model.dispersion_loss_weight >= 0, ">= 0"),
        ("model.dispersion_bandwidth", cfg.model.dispersion_bandwidth > 0, "> 0"),
        (
            "model.prograd",
            not cfg.model.prograd or cfg.model.zero_shot_loss_weight > 0,
            "false unless model.zero_shot_loss_weight > 0 (its reference gradient)",
        ),
        ("model.prograd_strength", cfg.model.prograd_strength >= 0, ">= 0"),
        ("model.prompt_averaging_std", cfg.model.prompt_averaging_std > 0, "> 0"),
        (
            "model.hand_crafted_templates",
            len(cfg.model.hand_crafted_templates) >= 1
            and all("{}" in t for t in cfg.model.hand_crafted_templates),
            "a non-empty list of templates that each contain {}",
        ),
        ("train.shots", cfg.train.shots is None or cfg.train.shots >= 1, ">= 1 or null"),
        ("train.epochs", cfg.train.epochs >= 1, ">= 1"),
        ("train.batch_size", cfg.train.batch_size >= 1, ">= 1"),
        ("train.lr", cfg.train.lr > 0, "> 0"),
        ("train.warmup_epochs", 0 <= cfg.train.warmup_epochs <= cfg.train.epochs, "in [0, epochs]"),
        ("train.augment_views", cfg.train.augment_views >= 0, ">= 0"),
        ("train.eval_every", cfg.train.eval_every >= 1, ">= 1"),
        ("train.encode_batch_size", cfg.train.encode_batch_size >= 1, ">= 1"),
        ("train.num_workers", cfg.train.num_workers >= 0, ">= 0"),
        ("output.log_every", cfg.output.log_every >= 1, ">= 1"),
        ("output.plot_top_images", cfg.output.plot_top_images >= 1, ">= 1"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{key} must be {expected} but is {OmegaConf.select(cfg, key)}.")
    if cfg.model.em_tau_start < cfg.model.em_tau_end:
        warnings.warn(
            f"model.em_tau_start ({cfg.model.em_tau_start}) is below model.em_tau_end "
            f"({cfg.model.em_tau_end}): the E-step temperature rises during training, so the "
            "assignments grow softer instead of sharper. Swap them unless you mean it.",
            UserWarning,
            stacklevel=3,
        )


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    extra: Mapping[str, Any] | None = None,
) -> DictConfig:
    """Build the run's configuration: schema defaults, then the YAML file, then overrides.

    Args:
        path: a YAML file with any subset of the keys (``None``: defaults only).
        overrides: omegaconf dot-list, e.g. ``["model.n_subprompts=4", "train.epochs=2"]``.
        extra: values applied last, by dotted key (the script's own flags, e.g. ``--data-root``);
            taken as they are, so paths need no quoting.

    Returns:
        A read-only ``DictConfig`` typed by :class:`ExperimentConfig`.

    Raises:
        ConfigError: an unknown key (with the closest valid key), a value of the wrong type, a
            choice outside its allowed values or a number out of range.
        FileNotFoundError: ``path`` does not exist.
    """
    cfg = OmegaConf.structured(ExperimentConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Config file {path} does not exist.")
        loaded = OmegaConf.load(path)
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path} must hold a mapping of sections, not a list.")
        cfg = _merge(cfg, loaded, str(path))
    if overrides:
        malformed = [item for item in overrides if "=" not in item]
        if malformed:
            raise ConfigError(f"Overrides must look like key=value, got {malformed}.")
        cfg = _merge(cfg, OmegaConf.from_dotlist(list(overrides)), "the command line")
    for key, value in (extra or {}).items():
        update = OmegaConf.create()
        OmegaConf.update(update, key, value)
        cfg = _merge(cfg, update, "the script's flags")
    _check_choices(cfg)
    _check_ranges(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    """The resolved configuration as YAML (saved next to the run's outputs)."""
    return OmegaConf.to_yaml(cfg, resolve=True)
