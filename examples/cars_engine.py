"""One epoch of training, evaluation and the collapse diagnostics, on cached image features."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from cars_distributed import Runtime, all_reduce_mean, any_process
from cars_features import TrainBatches
from cars_metrics import MetricsLog
from cars_model import autocast
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import promptmix

#: The scalar terms of ``MixtureOfPromptsLoss``'s output that are logged and averaged.
LOSS_TERMS = ("loss", "ce", "mixture", "diversity", "entropy")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN or infinite; the run stops before using it."""


def build_optimizer(cfg: DictConfig, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the learner's trainable parameters."""
    train = cfg.train
    if train.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(
        parameters, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
    )


def build_scheduler(
    cfg: DictConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ``warmup_start_lr`` to ``lr``, then cosine decay to ``min_lr``.

    Stepped every iteration; its state is the step count, so it is saved and restored exactly.
    """
    train = cfg.train
    total_steps = train.epochs * steps_per_epoch
    warmup_steps = round(train.warmup_epochs * steps_per_epoch)
    start, floor = train.warmup_start_lr / train.lr, train.min_lr / train.lr

    def factor(step: int) -> float:
        if step < warmup_steps:
            return start + (1.0 - start) * step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Diagnostics:
    """Collapse diagnostics of one epoch, from promptmix's diagnostics."""

    report: promptmix.CollapseReport
    responsibilities: torch.Tensor  # (N, K) of the training images
    usage: torch.Tensor  # (num_classes, K)
    mean_cosine: torch.Tensor  # (num_classes,)
    effective: torch.Tensor  # (num_classes,)

    def summary(self) -> dict[str, Any]:
        """Numbers for the epoch's log record."""
        usage_sorted = self.usage.sort(dim=-1, descending=True).values
        return {
            "collapsed": self.report.collapsed,
            "collapsed_classes": len(self.report.collapsed_classes),
            "mean_cosine": self.mean_cosine.mean().item(),
            "max_cosine": self.mean_cosine.max().item(),
            "effective_subprompts": torch.nanmean(self.effective).item(),
            "min_effective_subprompts": self.effective.nan_to_num(float("inf")).min().item(),
            "dominant_share": self.report.dominant_share,
            # Sub-prompt indices mean nothing across classes: average each class's sorted usage.
            "usage_sorted": torch.nanmean(usage_sorted, dim=0).tolist(),
        }


class Trainer:
    """Trains the learner with the objective on batches of image features.

    The objective's temperature schedule and the learning-rate schedule are stepped after
    every iteration. With several processes the learner is wrapped in DDP (gradients are
    averaged) and the logged loss terms are averaged over processes.
    """

    def __init__(
        self,
        cfg: DictConfig,
        *,
        learner: nn.Module,
        objective: promptmix.MixtureOfPromptsLoss,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        runtime: Runtime,
        amp_dtype: torch.dtype | None,
        logit_scale: float,
        metrics: MetricsLog,
    ):
        self.cfg, self.runtime, self.amp_dtype = cfg, runtime, amp_dtype
        self.learner, self.objective = learner, objective
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.logit_scale, self.metrics = logit_scale, metrics
        self.parameters = [p for p in learner.parameters() if p.requires_grad]
        # The objective's own terms, then each extra regularizer's, as the loss reports them.
        self.terms = LOSS_TERMS + tuple(objective.regularizers)
        self.model: nn.Module = learner
        if runtime.distributed:
            device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.model = DistributedDataParallel(
                learner, device_ids=device_ids, broadcast_buffers=False
            )

    @property
    def tau(self) -> float:
        """The E-step temperature of the next iteration."""
        return self.objective.current_tau()

    def train_epoch(self, epoch: int, batches: TrainBatches, first_step: int) -> dict[str, float]:
        """Run one epoch; returns the epoch means of the loss terms (over all processes).

        Raises:
            NonFiniteLossError: a loss term or the gradient norm is not finite; nothing was
                updated with it.
        """
        self.model.train()
        self.objective.train()
        totals = torch.zeros(len(self.terms), dtype=torch.float64, device=self.runtime.device)
        step = first_step
        show = self.runtime.is_main and self.cfg.output.progress_bar
        epochs = self.cfg.train.epochs
        with tqdm(
            total=len(batches),
            desc=f"epoch {epoch}/{epochs}",
            disable=None if show else True,  # None: only on a terminal, not in log files
            leave=False,
            dynamic_ncols=True,
        ) as bar:
            for image_features, labels in batches.epoch(epoch):
                step += 1
                tau, lr = self.tau, self.optimizer.param_groups[0]["lr"]
                terms = self._step(image_features, labels, epoch, step)
                totals += terms.double()
                values = dict(zip(self.terms, terms.tolist(), strict=True))
                bar.set_postfix(
                    ce=f"{values['ce']:.3f}",
                    mix=f"{values['mixture']:.3f}",
                    div=f"{values['diversity']:.3f}",
                    ent=f"{values['entropy']:.3f}",
                    tau=f"{tau:.3f}",
                    refresh=False,
                )
                bar.update()
                if step == 1 or step % self.cfg.output.log_every == 0:
                    averaged = all_reduce_mean(terms, self.runtime).tolist()
                    self.metrics.write(
                        {"event": "step", "epoch": epoch, "step": step, "lr": lr, "tau": tau}
                        | dict(zip(self.terms, averaged, strict=True))
                    )
        means = all_reduce_mean(totals / len(batches), self.runtime)
        return dict(zip(self.terms, means.tolist(), strict=True))

    def _step(
        self, image_features: torch.Tensor, labels: torch.Tensor, epoch: int, step: int
    ) -> torch.Tensor:
        with autocast(self.runtime.device, self.amp_dtype):
            subprompt_features = self.model()
        out = self.objective(
            image_features.float(), subprompt_features.float(), labels, logit_scale=self.logit_scale
        )
        terms = torch.stack([out[name].detach().float() for name in self.terms])
        self._check_finite(terms, "loss", epoch, step, out)
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.model.prograd:
            # ProGrad: the zero-shot KL steers the direction of the rest of the loss.
            reference = out["zero_shot"]
            rest = out["loss"] - self.objective.regularizer_weights["zero_shot"] * reference
            promptmix.prograd_backward(
                self.scaler.scale(rest),
                self.scaler.scale(reference),
                self.parameters,
                strength=self.cfg.model.prograd_strength,
            )
        else:
            self.scaler.scale(out["loss"]).backward()
        clip = self.cfg.train.grad_clip_norm
        if clip is not None:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.parameters, clip)
            if not self.scaler.is_enabled():  # fp16's scaler skips overflowing steps itself
                self._check_finite(norm.reshape(1), "gradient norm", epoch, step, out)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.objective.schedule is not None:
            self.objective.schedule.step()
        return terms

    def _check_finite(
        self, values: torch.Tensor, what: str, epoch: int, step: int, out: dict[str, torch.Tensor]
    ) -> None:
        if not any_process(not bool(torch.isfinite(values).all()), self.runtime):
            return
        parts = ", ".join(f"{name}={out[name].item():.4g}" for name in self.terms)
        self.metrics.write(
            {"event": "nonfinite", "epoch": epoch, "step": step, "what": what}
            | {name: out[name].item() for name in self.terms}
        )
        raise NonFiniteLossError(
            f"Non-finite {what} at epoch {epoch}, step {step} ({parts}, tau={self.tau:.3g}): "
            "stopping before the update. The last good checkpoint and the metrics log are kept. "
            "Try a lower train.lr, train.grad_clip_norm, or train.precision=fp32."
        )

    @torch.no_grad()
    def subprompt_features(self) -> torch.Tensor:
        """Unit-norm sub-prompt features ``(num_classes, K, dim)`` in float32, without a graph."""
        self.learner.eval()
        with autocast(self.runtime.device, self.amp_dtype):
            features = self.learner()
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def logits(self, image_features: torch.Tensor, subprompts: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, num_classes)`` of the mixture, in chunks to bound memory."""
        chunks = [
            self.objective.logits(chunk, subprompts, logit_scale=self.logit_scale, tau=self.tau)
            for chunk in image_features.split(1024)
        ]
        return torch.cat(chunks)

    def accuracy(
        self, image_features: torch.Tensor, labels: torch.Tensor, subprompts: torch.Tensor
    ) -> float:
        """Top-1 accuracy in percent."""
        predictions = self.logits(image_features, subprompts).argmax(dim=-1)
        return 100.0 * (predictions == labels).float().mean().item()

    @torch.no_grad()
    def diagnose(
        self, image_features: torch.Tensor, labels: torch.Tensor, subprompts: torch.Tensor
    ) -> Diagnostics:
        """Sub-prompt similarity and usage over the (unaugmented) training images.

        Usage is measured with the *soft* posterior at the current temperature whatever the
        training E-step is, so Sinkhorn's balancing cannot hide a sub-prompt that wins nothing.
        """
        # Without sync_distributed: every process holds all the training features.
        assigner = promptmix.SoftEMAssigner(logit_scale=self.objective.assigner.logit_scale)
        responsibilities = assigner(image_features, subprompts, labels, tau=self.tau)
        output = self.cfg.output
        report = promptmix.detect_collapse(
            subprompts,
            responsibilities,
            labels,
            cosine_threshold=output.collapse_cosine_threshold,
            share_threshold=output.collapse_share_threshold,
        )
        usage = promptmix.diagnostics.subprompt_usage(
            responsibilities, labels, num_classes=len(subprompts)
        )
        return Diagnostics(
            report,
            responsibilities,
            usage,
            promptmix.diagnostics.mean_pairwise_cosine(subprompts),
            promptmix.diagnostics.effective_subprompts(usage),
        )
