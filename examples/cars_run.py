"""One training run: data, frozen CLIP, cached features, the epoch loop, checkpoints, pictures."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cars_distributed as distributed
import torch
from cars_checkpoint import (
    atomic_save,
    capture_rng_state,
    derive_seed,
    load_checkpoint,
    load_trainable_state_dict,
    restore_rng_state,
    seed_everything,
    trainable_state_dict,
)
from cars_config import ConfigError, to_yaml
from cars_data import (
    CarsSplits,
    ImageDataset,
    Sample,
    few_shot,
    load_stanford_cars,
    subsample_classes,
)
from cars_distributed import Runtime
from cars_engine import Diagnostics, Trainer, build_optimizer, build_scheduler
from cars_features import (
    CachedTrainBatches,
    ImageEncoder,
    OnlineTrainBatches,
    TrainBatches,
    encode_samples,
    timed,
)
from cars_metrics import MetricsLog, read_records
from cars_model import ClipBundle, autocast_dtype, build_learner, build_objective, load_clip
from cars_plots import draw_all
from omegaconf import DictConfig, OmegaConf
from torchvision.transforms import Compose, RandomHorizontalFlip

import promptmix

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
#: Keys that may differ between a checkpoint's config and the resumed run's.
RESUMABLE_CHANGES = ("data.", "output.", "train.device", "train.eval_every", "train.num_workers")


@dataclass
class FeatureTimes:
    """Seconds spent encoding images once, to report what the cache saves."""

    train_pass: float  # one pass over the training images
    train_cached: float  # everything encoded for training (``views`` passes, or 0 when online)
    test_pass: float
    views: int  # cached views per training image (0: encoded every step)


def run_paths(cfg: DictConfig) -> dict[str, Path]:
    """Where a run writes its files, under ``output.output_dir``."""
    root = Path(cfg.output.output_dir)
    return {
        "root": root,
        "checkpoint": root / "checkpoints" / "last.pt",
        "metrics": root / "metrics.jsonl",
        "config": root / "config.yaml",
        "plots": root / "plots",
        "tensorboard": root / "tensorboard",
    }


def _labels(samples: list[Sample], device: torch.device) -> torch.Tensor:
    return torch.tensor([sample.label for sample in samples], device=device)


def _train_batches(
    cfg: DictConfig,
    runtime: Runtime,
    clip: ClipBundle,
    encoder: ImageEncoder,
    samples: list[Sample],
    clean: torch.Tensor,
    clean_seconds: float,
) -> tuple[TrainBatches, FeatureTimes]:
    train = cfg.train
    if train.batch_size % runtime.world_size:
        raise ConfigError(
            f"train.batch_size ({train.batch_size}) is the global batch and must be divisible "
            f"by the number of processes ({runtime.world_size})."
        )
    local_batch = train.batch_size // runtime.world_size
    labels = _labels(samples, runtime.device)
    times = FeatureTimes(clean_seconds, clean_seconds, 0.0, 1)
    if not train.augment:  # deterministic preprocessing: the cache is exact
        batches: TrainBatches = CachedTrainBatches(
            clean.unsqueeze(1), labels, local_batch, runtime, train.seed
        )
        return batches, times
    if train.augment_views == 0:
        dataset = ImageDataset(samples, _augmenting(clip))
        times.train_cached, times.views = 0.0, 0
        batches = OnlineTrainBatches(
            dataset, encoder, local_batch, runtime, train.seed, train.num_workers
        )
        return batches, times
    start = time.perf_counter()
    views = torch.stack(
        [
            encode_samples(
                encoder,
                samples,
                _augmenting(clip),
                runtime,
                batch_size=train.encode_batch_size,
                num_workers=train.num_workers,
                seed=derive_seed(train.seed, view),
            )
            for view in range(train.augment_views)
        ],
        dim=1,
    )
    times.train_cached, times.views = time.perf_counter() - start, train.augment_views
    times.train_pass = times.train_cached / train.augment_views
    return CachedTrainBatches(views, labels, local_batch, runtime, train.seed), times


def _augmenting(clip: ClipBundle) -> Compose:
    # open_clip's training transform (random resized crop) plus CoOp's horizontal flip.
    return Compose([RandomHorizontalFlip(), clip.train_transform])


def _check_resumable(saved: dict[str, Any], cfg: DictConfig) -> None:
    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            items: dict[str, Any] = {}
            for key, value in node.items():
                items |= flat(value, f"{prefix}{key}.")
            return items
        return {prefix[:-1]: node}

    old, new = flat(saved), flat(OmegaConf.to_container(cfg, resolve=True))
    changed = [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not key.startswith(RESUMABLE_CHANGES)
    ]
    if changed:
        raise ConfigError(
            "The checkpoint was written with other settings; resuming would not continue that "
            "run:\n  " + "\n  ".join(changed)
        )


class Run:
    """Everything one call of ``train_cars.py`` builds, and the loop that uses it."""

    def __init__(self, cfg: DictConfig, runtime: Runtime, resume: Path | None = None):
        if cfg.model.prograd and runtime.distributed:
            raise ConfigError(
                "model.prograd runs two backward passes that DDP does not all-reduce; train it "
                "with one process."
            )
        self.cfg, self.runtime, self.paths = cfg, runtime, run_paths(cfg)
        seed_everything(cfg.train.seed)
        splits = self._load_data()
        self.clip = load_clip(cfg, runtime.device)
        self.amp_dtype = autocast_dtype(cfg.train.precision, runtime.device)
        logger.info(
            "device %s, %d process(es), autocast %s",
            runtime.device,
            runtime.world_size,
            self.amp_dtype or "off (fp32)",
        )
        self._encode_features(splits)
        self.learner = build_learner(cfg, self.clip, self.classnames)
        self.objective = build_objective(
            cfg,
            len(self.classnames),
            cfg.train.epochs * len(self.batches),
            sync_distributed=runtime.distributed,
            clip=self.clip,
            classnames=self.classnames,
        ).to(runtime.device)
        self.epoch, self.step = 0, 0
        self.average = (
            promptmix.GaussianPromptAverage(
                self.learner,
                total_epochs=cfg.train.epochs,
                mean=cfg.model.prompt_averaging_mean,
                std=cfg.model.prompt_averaging_std,
            )
            if cfg.model.prompt_averaging
            else None
        )
        self.trainer = self._build_trainer(resume)
        if runtime.is_main:
            self.paths["config"].write_text(to_yaml(cfg))

    def _load_data(self) -> CarsSplits:
        cfg = self.cfg
        splits = load_stanford_cars(cfg.data.root, cfg.data.layout, cfg.data.split_file)
        self.data_root = splits.root
        # The shots are drawn over all classes before the base/new filter (CoCoOp's order).
        drawn = few_shot(splits.train, cfg.train.shots, cfg.train.seed)
        which = cfg.data.subsample_classes
        self.classnames, self.train_samples = subsample_classes(splits.classnames, drawn, which)
        _, splits.test = subsample_classes(splits.classnames, splits.test, which)
        splits.classnames = self.classnames
        logger.info(
            "%s shots per class, seed %d, %s classes (%d): %d training images; %d test images",
            cfg.train.shots or "all",
            cfg.train.seed,
            which,
            len(self.classnames),
            len(self.train_samples),
            len(splits.test),
        )
        return splits

    def _encode_features(self, splits: CarsSplits) -> None:
        """Encode the training and test images once (and the augmented views, if any)."""
        train, runtime = self.cfg.train, self.runtime
        encoder = ImageEncoder(self.clip.model, runtime.device, self.amp_dtype)

        def encode(samples: list[Sample]) -> torch.Tensor:
            return encode_samples(
                encoder,
                samples,
                self.clip.eval_transform,
                runtime,
                batch_size=train.encode_batch_size,
                num_workers=train.num_workers,
            )

        self.train_features, train_seconds = timed(lambda: encode(self.train_samples))
        self.test_features, test_seconds = timed(lambda: encode(splits.test))
        self.train_labels = _labels(self.train_samples, runtime.device)
        self.test_labels = _labels(splits.test, runtime.device)
        self.batches, self.times = _train_batches(
            self.cfg,
            runtime,
            self.clip,
            encoder,
            self.train_samples,
            self.train_features,
            train_seconds,
        )
        self.times.test_pass = test_seconds
        self._log_cache()

    def _build_trainer(self, resume: Path | None) -> Trainer:
        """Optimiser, schedules and metrics log, restored from ``resume`` when given."""
        cfg, runtime = self.cfg, self.runtime
        parameters = [p for p in self.learner.parameters() if p.requires_grad]
        optimizer = build_optimizer(cfg, parameters)
        scheduler = build_scheduler(cfg, optimizer, len(self.batches))
        scaler = torch.amp.GradScaler(runtime.device.type, enabled=self.amp_dtype == torch.float16)
        if resume is not None:
            self._resume(resume, optimizer, scheduler, scaler)
        elif self.paths["checkpoint"].exists():
            logger.warning(
                "%s holds a checkpoint: this new run will replace it (--resume continues it)",
                self.paths["root"],
            )
        self.metrics = MetricsLog(
            self.paths["metrics"],
            tensorboard_dir=self.paths["tensorboard"] if cfg.output.tensorboard else None,
            enabled=runtime.is_main,
            resume_step=self.step if resume is not None else None,
        )
        return Trainer(
            cfg,
            learner=self.learner,
            objective=self.objective,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            runtime=runtime,
            amp_dtype=self.amp_dtype,
            logit_scale=self.clip.logit_scale,
            metrics=self.metrics,
        )

    def _log_cache(self) -> None:
        times, epochs = self.times, self.cfg.train.epochs
        if times.views == 0:
            logger.info(
                "augmented training images are encoded every step (no cache); "
                "one pass over them takes %.2fs",
                times.train_pass,
            )
        else:
            logger.info(
                "feature cache: encoded %d training images x %d view(s) in %.2fs once; encoding "
                "them every epoch would cost ~%.2fs per epoch, %.1fs over %d epochs (%.1fx less "
                "encoding)",
                len(self.train_samples),
                times.views,
                times.train_cached,
                times.train_pass,
                times.train_pass * epochs,
                epochs,
                times.train_pass * epochs / max(times.train_cached, 1e-9),
            )
        logger.info(
            "test features: %d images encoded once in %.2fs, reused by every evaluation",
            len(self.test_labels),
            times.test_pass,
        )

    def _resume(self, path: Path, optimizer: Any, scheduler: Any, scaler: Any) -> None:
        checkpoint = load_checkpoint(path)
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{path} is not a train_cars.py checkpoint (format 1).")
        _check_resumable(checkpoint["config"], self.cfg)
        if checkpoint["train_files"] != self._train_files():
            raise ConfigError(f"{path} was trained on other images than this few-shot sample.")
        load_trainable_state_dict(self.learner, checkpoint["learner"])
        self.objective.load_state_dict(checkpoint["objective"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        if self.average is not None:
            self.average.load_state_dict(checkpoint["prompt_average"])
        states = checkpoint["rng"]
        if len(states) != self.runtime.world_size:
            logger.warning(
                "checkpoint from %d process(es), resumed on %d: the data order is "
                "the same but random draws may differ",
                len(states),
                self.runtime.world_size,
            )
        restore_rng_state(states[self.runtime.rank % len(states)])
        self.epoch, self.step = checkpoint["epoch"], checkpoint["step"]
        logger.info("resumed from %s after epoch %d (step %d)", path, self.epoch, self.step)

    def _train_files(self) -> list[str]:
        """The few-shot images, relative to the dataset folder (which may move on resume)."""
        return [str(sample.path.relative_to(self.data_root)) for sample in self.train_samples]

    def save_checkpoint(self) -> None:
        """Write ``last.pt`` atomically (main process), with every process's RNG state."""
        rng_states = distributed.all_gather_objects(capture_rng_state(), self.runtime)
        if not self.runtime.is_main:
            return
        trainer = self.trainer
        atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "epoch": self.epoch,
                "step": self.step,
                "learner": trainable_state_dict(self.learner),
                "objective": self.objective.state_dict(),
                "optimizer": trainer.optimizer.state_dict(),
                "scheduler": trainer.scheduler.state_dict(),
                "scaler": trainer.scaler.state_dict(),
                "prompt_average": None if self.average is None else self.average.state_dict(),
                "rng": rng_states,
                "config": OmegaConf.to_container(self.cfg, resolve=True),
                "classnames": self.classnames,
                "train_files": self._train_files(),
            },
            self.paths["checkpoint"],
        )

    def _diagnose(self, subprompts: torch.Tensor) -> Diagnostics:
        diagnostics = self.trainer.diagnose(self.train_features, self.train_labels, subprompts)
        if not self.runtime.is_main:  # every process computes the same numbers
            return diagnostics
        if diagnostics.report.collapsed:
            logger.warning("epoch %d: mode collapse: %s", self.epoch, diagnostics.report.message)
        else:
            logger.info("epoch %d: %s", self.epoch, diagnostics.report.message)
        return diagnostics

    def _evaluate_initial(self) -> None:
        subprompts = self.trainer.subprompt_features()
        accuracy = self.trainer.accuracy(self.test_features, self.test_labels, subprompts)
        logger.info("initial prompts (zero-shot): test top-1 %.2f%%", accuracy)
        self.metrics.write(
            {"event": "eval", "epoch": 0, "step": 0, "test_accuracy": accuracy}
            | self._diagnose(subprompts).summary()
        )

    def train(self) -> dict[str, Any]:
        """Train the remaining epochs; returns the last epoch's record."""
        cfg = self.cfg
        if self.epoch == 0:
            self._evaluate_initial()
        record: dict[str, Any] = {}
        train_seconds, first_epoch = 0.0, self.epoch
        for epoch in range(self.epoch + 1, cfg.train.epochs + 1):
            start = time.perf_counter()
            means = self.trainer.train_epoch(epoch, self.batches, first_step=self.step)
            seconds = time.perf_counter() - start
            train_seconds += seconds
            self.epoch, self.step = epoch, self.step + len(self.batches)
            if self.average is not None:
                self.average.update()
            subprompts = self.trainer.subprompt_features()
            record = {
                "event": "epoch",
                "epoch": epoch,
                "step": self.step,
                "seconds": seconds,
                "tau": self.trainer.tau,
            } | {f"train_{k}": v for k, v in means.items()}
            record |= self._diagnose(subprompts).summary()
            if self._evaluates(epoch):
                record["test_accuracy"] = self.trainer.accuracy(
                    self.test_features, self.test_labels, subprompts
                )
            self.metrics.write(record)
            logger.info(
                "epoch %d/%d: loss %.4f (ce %.4f) tau %.3f%s [%.1fs]",
                epoch,
                cfg.train.epochs,
                means["loss"],
                means["ce"],
                self.trainer.tau,
                f", test top-1 {record['test_accuracy']:.2f}%" if "test_accuracy" in record else "",
                seconds,
            )
            self.save_checkpoint()
        if self.average is not None and self.epoch == cfg.train.epochs:
            record = self._use_prompt_average(record)
        self._report_speedup(train_seconds, first_epoch)
        return record

    def _use_prompt_average(self, record: dict[str, Any]) -> dict[str, Any]:
        """Replace the prompts by their Gaussian-weighted average over epochs and evaluate it."""
        assert self.average is not None
        last = record.get("test_accuracy")
        self.average.copy_to(self.learner)
        subprompts = self.trainer.subprompt_features()
        accuracy = self.trainer.accuracy(self.test_features, self.test_labels, subprompts)
        logger.info(
            "prompt average over %d epochs: test top-1 %.2f%% (last epoch's prompts: %s)",
            self.epoch,
            accuracy,
            "not evaluated" if last is None else f"{last:.2f}%",
        )
        averaged = {
            "event": "prompt_average",
            "epoch": self.epoch,
            "step": self.step,
            "test_accuracy": accuracy,
        } | self._diagnose(subprompts).summary()
        self.metrics.write(averaged)
        self.save_checkpoint()  # the checkpoint now holds the averaged prompts
        return record | {"test_accuracy": accuracy}

    def _evaluates(self, epoch: int) -> bool:
        return epoch % self.cfg.train.eval_every == 0 or epoch == self.cfg.train.epochs

    def _report_speedup(self, train_seconds: float, first_epoch: int) -> None:
        epochs_run = self.epoch - first_epoch
        times = self.times
        if times.views == 0 or epochs_run == 0:
            return
        evaluated = [self._evaluates(e) for e in range(first_epoch + 1, self.epoch + 1)]
        evaluations = sum(evaluated) + (first_epoch == 0)  # + the initial evaluation
        cached = train_seconds + times.train_cached + times.test_pass
        uncached = train_seconds + epochs_run * times.train_pass + evaluations * times.test_pass
        logger.info(
            "cache speed-up: this run's training and encoding took %.1fs; encoding the images "
            "every epoch and every evaluation would take ~%.1fs (%.1fx)",
            cached,
            uncached,
            uncached / cached,
        )
        self.metrics.write(
            {
                "event": "speedup",
                "epoch": self.epoch,
                "step": self.step,
                "cached_seconds": cached,
                "uncached_seconds": uncached,
                "speedup": uncached / cached,
            }
        )

    def evaluate_checkpoint(self, path: Path) -> float:
        """Test accuracy of the prompts learned in ``path`` on this run's classes, no training.

        The base-to-new protocol evaluates the prompts learned on the base classes on the new
        ones; only a context shared by all classes (``model.class_specific=false`` with the
        ``mixture`` learner) carries over to classes it was not trained on.

        Raises:
            ConfigError: not a checkpoint of this script, another model config, or per-class
                parameters asked to classify other classes.
        """
        checkpoint = load_checkpoint(path)
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{path} is not a train_cars.py checkpoint (format 1).")
        saved_model = checkpoint["config"]["model"]
        current = OmegaConf.to_container(self.cfg.model, resolve=True)
        changed = [
            f"model.{key}: {saved_model.get(key)!r} -> {current.get(key)!r}"
            for key in sorted(current)
            if saved_model.get(key) != current.get(key)
        ]
        if changed:
            raise ConfigError(f"{path} was trained with another model config: {'; '.join(changed)}")
        model = self.cfg.model
        per_class = model.learner == "offset" or model.class_specific
        if checkpoint["classnames"] != self.classnames and per_class:
            raise ConfigError(
                f"{path} learned one set of parameters per class (model.learner={model.learner}, "
                f"model.class_specific={model.class_specific}); they cannot classify other "
                "classes. Train with model.learner=mixture model.class_specific=false for "
                "base-to-new."
            )
        load_trainable_state_dict(self.learner, checkpoint["learner"])
        # The temperature the training ended at (the usage estimate belongs to its classes).
        schedule = {k: v for k, v in checkpoint["objective"].items() if k.startswith("schedule.")}
        self.objective.load_state_dict(schedule, strict=False)
        subprompts = self.trainer.subprompt_features()
        accuracy = self.trainer.accuracy(self.test_features, self.test_labels, subprompts)
        which = self.cfg.data.subsample_classes
        logger.info(
            "prompts of %s on the %s classes (%d): test top-1 %.2f%%",
            path,
            which,
            len(self.classnames),
            accuracy,
        )
        self.metrics.write(
            {
                "event": "eval",
                "epoch": checkpoint["epoch"],
                "step": checkpoint["step"],
                "test_accuracy": accuracy,
                "checkpoint": str(path),
            }
            | self._diagnose(subprompts).summary()
        )
        return accuracy

    def result(self) -> dict[str, Any]:
        """The final numbers of the run: test accuracy and the collapse diagnostics."""
        subprompts = self.trainer.subprompt_features()
        diagnostics = self.trainer.diagnose(self.train_features, self.train_labels, subprompts)
        return {
            "accuracy": self.trainer.accuracy(self.test_features, self.test_labels, subprompts),
            "dominant_share": diagnostics.report.dominant_share,
            "effective_subprompts": diagnostics.report.effective_subprompts,
            "responsibilities": diagnostics.responsibilities,
        }

    def draw(self) -> list[Path]:
        """The run's pictures from the final sub-prompts (main process)."""
        if not (self.runtime.is_main and self.cfg.output.plots):
            return []
        subprompts = self.trainer.subprompt_features()
        diagnostics = self.trainer.diagnose(self.train_features, self.train_labels, subprompts)
        paths = draw_all(
            samples=self.train_samples,
            responsibilities=diagnostics.responsibilities,
            pairwise=promptmix.functional.pairwise_cosine(subprompts),
            classnames=self.classnames,
            class_ids=list(self.cfg.output.plot_classes),
            top_n=self.cfg.output.plot_top_images,
            records=read_records(self.paths["metrics"]),
            folder=self.paths["plots"],
            cosine_threshold=self.cfg.output.collapse_cosine_threshold,
            share_threshold=self.cfg.output.collapse_share_threshold,
        )
        logger.info("pictures: %s", ", ".join(str(path) for path in paths))
        return paths

    def close(self) -> None:
        """Close the metrics files."""
        self.metrics.close()
