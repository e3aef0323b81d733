"""Few-shot Stanford Cars with a mixture of prompts per class: the whole method, top to bottom.

    python examples/train_cars.py --demo     # a tour in a minute: synthetic cars, a tiny CLIP
    python examples/train_cars.py --config examples/configs/stanford_cars.yaml --data-root PATH
    torchrun --nproc_per_node=4 examples/train_cars.py --config ... --data-root PATH
    python examples/train_cars.py --config RUN/config.yaml --resume      # continue a run
    python examples/train_cars.py --evaluate RUN/checkpoints/last.pt data.subsample_classes=new

The file follows the method: settings, data, CLIP and the learner, initialisation, the loss, the
training loop, evaluation and checkpoints. Every call into promptmix is here; what the script
leans on (dataset layouts, files, pictures, the demo's world) is in ``examples/cars/``. A setting
left ``null`` is promptmix's own default (``examples/configs/default.yaml`` lists every key), so
by default it trains promptmix's recipe: the learner's and the loss's defaults, one
``initialize_from_kmeans`` call, the learner's ``prior_loss()`` passed to the loss, Adam at 5e-3.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from cars import Stopped, UsageError, demo, distributed, files, plots
from cars.clip import (
    Clip,
    ImageEncoder,
    autocast,
    autocast_dtype,
    encode_images,
    encode_test,
    load_clip,
    text_features,
)
from cars.config import RANDOM_CONTEXT, evaluation_settings, parse_args, to_yaml, training_settings
from cars.data import load_few_shot
from cars.schedule import warmup_cosine
from omegaconf import DictConfig, OmegaConf
from torch import nn

import promptmix

logger = logging.getLogger("train_cars")
EXIT_OK, EXIT_NONFINITE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
TERMS = ("loss", "ce", "mixture", "diversity", "entropy", "prior")  # the loss's scalars, by name


def given(**options: Any) -> dict[str, Any]:
    """The options that are set. One left ``null`` is not passed, so promptmix's default applies
    (and a change of that default needs no edit here)."""
    return {name: value for name, value in options.items() if value is not None}


# --- CLIP's text side: the learner -------------------------------------------------------------


def build_learner(cfg: DictConfig, clip: Clip, classnames: list[str]) -> nn.Module:
    """K sub-prompts per class on the frozen text tower: offsets of the text (a class part, K
    looks shared by all classes, per-class corrections), or CoOp contexts."""
    m = cfg.model
    options = given(n_subprompts=m.n_subprompts, ctx_init=m.ctx_init,
                    init_noise_std=m.init_noise_std)
    if m.ctx_init == RANDOM_CONTEXT:
        options["ctx_init"] = None  # CoOp's random context
    options["generator"] = torch.Generator().manual_seed(cfg.train.seed)
    text = (clip.model, clip.tokenizer, classnames)
    try:
        if m.learner == "offset":
            return promptmix.OffsetMixtureOfPrompts(
                *text, **options,
                **given(share_looks=m.share_looks, text_prior_weight=m.text_prior_weight,
                        subprompt_prior_weight=m.subprompt_prior_weight))
        return promptmix.MixtureOfPrompts(
            *text, **options,
            **given(n_ctx=m.n_ctx, class_specific=m.class_specific,
                    gradient_checkpointing=m.gradient_checkpointing),
        )
    except (ValueError, TypeError) as error:  # e.g. n_ctx against the default ctx_init's tokens
        hint = " (model.ctx_init=random: CoOp's random context)" if "n_ctx" in str(error) else ""
        raise UsageError(f"model ({m.learner} learner): {error}{hint}") from None


# --- The loss ----------------------------------------------------------------------------------


def build_loss(cfg: DictConfig, clip: Clip, classnames: list[str], n_subprompts: int,
               total_steps: int, *, sync: bool, regularize: bool = True,
               ) -> promptmix.MixtureOfPromptsLoss:
    """Cross-entropy + EM pull + diversity - entropy (+ the field's regularizers), each image
    weighed by the posterior that its label is right; tau annealed."""
    m = cfg.model
    tau = promptmix.TemperatureSchedule(
        **given(start=m.em_tau_start, end=m.em_tau_end, kind=m.em_tau_schedule),
        total_steps=total_steps)
    assigner = promptmix.SoftEMAssigner(**given(mode=m.assignment,
                                                sinkhorn_iterations=m.sinkhorn_iterations),
                                        sync_distributed=sync)
    entropy = promptmix.AssignmentEntropy(**given(mode=m.entropy_mode), sync_distributed=sync)
    return promptmix.MixtureOfPromptsLoss(
        **given(mixture_weight=m.mixture_loss_weight, diversity_weight=m.diversity_loss_weight,
                entropy_weight=m.entropy_loss_weight, label_noise=m.label_noise,
                aggregation=m.aggregation, assigner=assigner, entropy=entropy),
        tau=tau, sync_distributed=sync,
        # The running usage of each class's sub-prompts, which the entropy term reads (a class
        # has few images in a batch). At the default entropy weight 0 it changes no gradient,
        # only the logged entropy; it matters once model.entropy_loss_weight > 0.
        usage_estimate=promptmix.UsageEstimate(num_classes=len(classnames),
                                               n_subprompts=n_subprompts),
        regularizers=build_regularizers(cfg, clip, classnames) if regularize else None)


def build_regularizers(cfg: DictConfig, clip: Clip, classnames: list[str]) -> dict[str, Any]:
    """The field's regularizers whose weight is set, on CLIP's frozen hand-crafted prompts."""
    m, terms = cfg.model, {}
    if m.anchor_loss_weight or m.zero_shot_loss_weight or m.text_to_text_loss_weight:
        templates = text_features(clip, classnames, list(m.hand_crafted_templates))
        ensemble = F.normalize(templates.mean(0), dim=-1)
    if m.anchor_loss_weight:  # KgCoOp, PromptSRC
        terms["anchor"] = (promptmix.PromptAnchor(
            **given(distance=m.anchor_distance), anchor_features=ensemble), m.anchor_loss_weight)
    if m.zero_shot_loss_weight:  # PromptSRC, ProGrad
        terms["zero_shot"] = (promptmix.ZeroShotConsistency(
            **given(temperature=m.zero_shot_temperature, reduction=m.zero_shot_reduction,
                    average_over_classes=m.zero_shot_average_over_classes),
            zero_shot_text_features=ensemble, logit_scale=clip.logit_scale),
            m.zero_shot_loss_weight)
    if m.text_to_text_loss_weight:  # LASP
        terms["text_to_text"] = (promptmix.TextToTextLoss(
            logit_scale=clip.logit_scale, template_features=templates,
            **given(aggregation=m.aggregation, noise_std=m.text_to_text_noise_std)),
            m.text_to_text_loss_weight)
    if m.dispersion_loss_weight:  # DAPT
        terms["dispersion"] = (promptmix.InterClassDispersion(
            **given(bandwidth=m.dispersion_bandwidth)), m.dispersion_loss_weight)
    return terms


# --- Evaluation and the collapse diagnostics ---------------------------------------------------


@torch.no_grad()
def subprompt_features(learner: nn.Module, device: torch.device, amp: Any) -> torch.Tensor:
    """Unit sub-prompt features ``(num_classes, K, dim)`` in float32, without a graph."""
    learner.eval()
    with autocast(device, amp):
        return F.normalize(learner().float(), dim=-1)


@torch.no_grad()
def evaluate(cfg: DictConfig, loss_fn: promptmix.MixtureOfPromptsLoss, logit_scale: float,
             subprompts: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
             ) -> dict[str, Any]:
    """Top-1 accuracy of the mixture's classifier on ``features``, and the collapse diagnostics.

    Usage is measured with the soft E-step at the current tau whatever the training E-step is,
    so Sinkhorn's balancing cannot hide a sub-prompt that wins nothing.
    """
    logits = [loss_fn.logits(x, subprompts, logit_scale=logit_scale) for x in features.split(1024)]
    predictions = torch.cat(logits).argmax(dim=-1)
    assigner = promptmix.SoftEMAssigner(mode="soft", logit_scale=loss_fn.assigner.logit_scale)
    responsibilities = assigner(features, subprompts, labels, tau=loss_fn.current_tau())
    report = promptmix.detect_collapse(
        subprompts, responsibilities, labels,
        cosine_threshold=cfg.output.collapse_cosine_threshold,
        share_threshold=cfg.output.collapse_share_threshold)
    usage = promptmix.diagnostics.subprompt_usage(responsibilities, labels,
                                                  num_classes=len(subprompts))
    share = promptmix.diagnostics.dominant_share(usage)
    cosine = promptmix.diagnostics.mean_pairwise_cosine(subprompts)
    accuracy = 100.0 * (predictions == labels).float().mean().item()
    return {"accuracy": accuracy, "report": report, "summary": files.summary(report),
            "collapse": files.collapse_line(report, share, cosine), "class_share": share,
            "predictions": predictions, "responsibilities": responsibilities}


# --- Training ----------------------------------------------------------------------------------


def train(cfg: DictConfig, runtime: distributed.Runtime, run_log: files.RunLog,
          resume: Path | None = None, *, log_since: int = 0) -> dict[str, Any]:
    """Train the prompts of ``cfg``; returns the final numbers. Nothing is written before every
    setting, file and checkpoint has been checked."""
    folder, t, device = files.RunFolder(cfg.output.output_dir), cfg.train, runtime.device
    checkpoint = files.open_run(folder, cfg, resume)  # None: a new run
    files.seed_everything(t.seed)

    # Data: the few-shot training images and the test images.
    data = load_few_shot(cfg.data, shots=t.shots, seed=t.seed)
    plots.check_classes(cfg.output.plot_classes, len(data.classnames))
    files.check_same_images(checkpoint, data.train_files(), resume)

    # CLIP, frozen, and the learner: K sub-prompts per class. The images are encoded once.
    clip = load_clip(cfg.model, device)
    amp = autocast_dtype(t.precision, device)
    learner = build_learner(cfg, clip, data.classnames).to(device)
    logger.info("%s, K=%d sub-prompts per class; %s, %d process(es), autocast %s",
                type(learner).__name__, learner.n_subprompts, device, runtime.world_size,
                amp or "off (fp32)")
    features = encode_images(ImageEncoder(clip, device, amp), data.train, data.test, t, runtime)
    train_set = (features.train, features.train_labels)
    test_set = (features.test, features.test_labels)

    # Initialisation, promptmix's one call: the offset learner's class parts, shared looks and
    # corrections start from the images (shrunk toward the text); it sets the prior's image count.
    if checkpoint is None and cfg.model.init == "kmeans":
        promptmix.initialize_from_kmeans(learner, *train_set,
                                         **given(prior_count=cfg.model.prior_count),
                                         generator=torch.Generator().manual_seed(t.seed))
        logger.info("the start: initialize_from_kmeans on %d training images", len(train_set[1]))

    # Loss, optimiser, and the two schedules stepped every iteration: learning rate and tau.
    batches = features.batches
    total_steps = t.epochs * len(batches)
    loss_fn = build_loss(cfg, clip, data.classnames, learner.n_subprompts, total_steps,
                         sync=runtime.distributed).to(device)
    parameters = [p for p in learner.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = (
        torch.optim.AdamW(parameters, lr=t.lr, weight_decay=t.weight_decay)
        if t.optimizer == "adamw"
        else torch.optim.SGD(parameters, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay))
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(t, len(batches)))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    parts = {"objective": loss_fn, "optimizer": optimizer, "scheduler": lr_schedule,
             "scaler": scaler}
    if cfg.model.prompt_averaging:  # PromptSRC: a Gaussian-weighted average over the epochs
        parts["prompt_average"] = promptmix.GaussianPromptAverage(
            learner, total_epochs=t.epochs,
            **given(mean=cfg.model.prompt_averaging_mean, std=cfg.model.prompt_averaging_std))
    checkpoints = files.Checkpoints(folder.checkpoint, learner, parts, runtime, {
        "total_steps": total_steps, "config": OmegaConf.to_container(cfg),
        "classnames": data.classnames, "train_files": data.train_files()})
    epoch, step = checkpoints.restore(checkpoint, resume) if checkpoint else (0, 0)  # type: ignore

    # Everything is checked: from here on the run writes into its folder.
    score = functools.partial(evaluate, cfg, loss_fn, clip.logit_scale)
    if runtime.is_main:
        files.write_text(folder.config, to_yaml(cfg))
        run_log.write_to(folder.log, since=log_since)
    metrics = files.MetricsLog.of_run(folder, cfg.output.tensorboard, runtime,
                                      resumed_at=None if checkpoint is None else (epoch, step))
    if checkpoint is None:
        checkpoints.save(0, 0)  # a run can be resumed from its very start
    model = distributed.wrap(learner, runtime)
    # The learner's prior, passed to the loss: OffsetMixtureOfPrompts keeps its class parts near
    # the text (KgCoOp) and each sub-prompt near its class part + look. MixtureOfPrompts has none.
    prior_loss = getattr(learner, "prior_loss", None)
    terms, first, start = (*TERMS, *loss_fn.regularizers), epoch + 1, None
    try:
        if epoch == 0:  # the start, to see what training adds
            subprompts = subprompt_features(learner, device, amp)
            start = score(subprompts, *test_set)
            files.log_start(metrics, start, score(subprompts, *train_set))

        # The loop: forward, loss, backward, optimiser and schedule steps; after each epoch the
        # collapse diagnostics, the test accuracy and a checkpoint.
        for epoch in range(first, t.epochs + 1):
            model.train()
            loss_fn.train()
            seconds, totals = time.perf_counter(), torch.zeros(len(terms), device=device)
            show = runtime.is_main and cfg.output.progress_bar
            for image_features, labels in files.progress(batches, epoch, show=show):
                step += 1
                tau, lr = loss_fn.current_tau(), optimizer.param_groups[0]["lr"]
                with autocast(device, amp):
                    subprompts = model()
                out = loss_fn(image_features.float(), subprompts.float(), labels,
                              prior=prior_loss() if prior_loss else None,
                              logit_scale=clip.logit_scale)
                values = torch.stack([out[name].detach().float() for name in terms])
                distributed.check_finite(dict(zip(terms, values, strict=True)), epoch, step,
                                         runtime, metrics.write)
                optimizer.zero_grad(set_to_none=True)
                if cfg.model.prograd:  # ProGrad: the zero-shot KL steers the rest's direction
                    rest = out["loss"] - loss_fn.regularizer_weights["zero_shot"] * out["zero_shot"]
                    promptmix.prograd_backward(
                        scaler.scale(rest), scaler.scale(out["zero_shot"]), parameters,
                        **given(strength=cfg.model.prograd_strength))
                else:
                    scaler.scale(out["loss"]).backward()
                if t.grad_clip_norm is not None:
                    scaler.unscale_(optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(parameters, t.grad_clip_norm)
                    if not scaler.is_enabled():  # fp16's scaler skips overflowing steps itself
                        distributed.check_finite({"gradient norm": norm}, epoch, step, runtime,
                                                 metrics.write)
                scaler.step(optimizer)
                scaler.update()
                lr_schedule.step()
                loss_fn.schedule.step()  # type: ignore[union-attr]
                totals += values
                if step == 1 or step % cfg.output.log_every == 0:
                    averaged = distributed.all_reduce_mean(values, runtime).tolist()
                    metrics.write({"event": "step", "epoch": epoch, "step": step, "lr": lr,
                                   "tau": tau} | dict(zip(terms, averaged, strict=True)))
            means = distributed.all_reduce_mean(totals / len(batches), runtime).tolist()
            if "prompt_average" in parts:
                parts["prompt_average"].update()
            subprompts = subprompt_features(learner, device, amp)
            on_train = score(subprompts, *train_set)
            tested = epoch % t.eval_every == 0 or epoch == t.epochs
            files.log_epoch(metrics, epoch, t.epochs, step, loss_fn.current_tau(),
                            dict(zip(terms, means, strict=True)), on_train,
                            score(subprompts, *test_set)["accuracy"] if tested else None,
                            seconds=time.perf_counter() - seconds)
            checkpoints.save(epoch, step)

        # The final prompts (PromptSRC's average, if asked): their evaluation and pictures.
        if "prompt_average" in parts:
            parts["prompt_average"].copy_to(learner)
            checkpoints.save(epoch, step)
        subprompts = subprompt_features(learner, device, amp)
        final, on_train = score(subprompts, *test_set), score(subprompts, *train_set)
        files.log_final(metrics, epoch, step, final, on_train, "prompt_average" in parts)
        if runtime.is_main and cfg.output.plots:
            plots.draw_all(cfg.output, folder, data, on_train["responsibilities"], subprompts)
    except KeyboardInterrupt:
        raise files.interrupted(epoch, step, checkpoints.saved, folder) from None
    finally:
        metrics.close()
        run_log.stop(folder.log)
    return {"folder": folder.root, "start": start, "final": final, "train": on_train,
            "data": data, "test_labels": features.test_labels}


# --- Evaluating a checkpoint ---------------------------------------------------------------------


def evaluate_checkpoint(args: Any, run_log: files.RunLog) -> dict[str, Any]:
    """``--evaluate``: the prompts of a checkpoint on the test classes of its settings (or of
    ``--config``'s), into a folder of its own. The checkpoint is read first, and nothing of
    training is done: no k-means start, no training image encoded."""
    path = args.evaluate
    checkpoint = files.read_checkpoint(path, "--evaluate")
    cfg = evaluation_settings(args, checkpoint)  # the model settings it was trained with
    folder = files.evaluation_folder(path, cfg.data.subsample_classes, args.output_dir)
    files.seed_everything(cfg.train.seed)  # a random-init CLIP (pretrained: null) as trained
    with distributed.session(cfg.train.device) as runtime:
        device, amp = runtime.device, autocast_dtype(cfg.train.precision, runtime.device)
        data = load_few_shot(cfg.data, shots=cfg.train.shots, seed=cfg.train.seed)
        clip = load_clip(cfg.model, device)
        learner = build_learner(cfg, clip, data.classnames).to(device)
        files.check_classes(checkpoint, data.classnames, learner, path)
        files.load_trainable_state_dict(learner, checkpoint["learner"], path)
        loss_fn = build_loss(cfg, clip, data.classnames, learner.n_subprompts,
                             checkpoint["total_steps"], sync=False, regularize=False).to(device)
        # The temperature the training ended at (its usage estimate belongs to its classes).
        loss_fn.load_state_dict({k: v for k, v in checkpoint["objective"].items()
                                 if k.startswith("schedule.")}, strict=False)
        test_set = encode_test(ImageEncoder(clip, device, amp), data.test, cfg.train, runtime)
        result = evaluate(cfg, loss_fn, clip.logit_scale,
                          subprompt_features(learner, device, amp), *test_set)
        numbers = files.evaluation_record(path, checkpoint, cfg.data.subsample_classes,
                                          len(data.classnames), folder, result)
        if runtime.is_main:
            files.write_evaluation(folder, to_yaml(cfg), numbers, run_log)
    return numbers


# --- The command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run ``train_cars.py``: 0 done, 1 non-finite loss, 2 bad input, 130 interrupted."""
    with files.logging_to(int(os.environ.get("RANK", "0"))) as run_log:
        try:
            args = parse_args(argv)
            if args.demo:  # the demo's world, and each of its rows trained by train()
                demo.run(args, run_log, train=train)
            elif args.evaluate is not None:
                print(files.evaluation_line(evaluate_checkpoint(args, run_log)))
            else:
                cfg = training_settings(args)
                resume = args.resume_from or (
                    files.RunFolder(cfg.output.output_dir).checkpoint if args.resume else None)
                with distributed.session(cfg.train.device) as runtime:
                    result = train(cfg, runtime, run_log, resume)
                if runtime.is_main:
                    print(files.result_line(result))
            return EXIT_OK
        except UsageError as error:
            for message in error.messages:
                print(f"train_cars.py: error: {message}", file=sys.stderr)
            return EXIT_USAGE
        except Stopped as stop:
            print(f"train_cars.py: {stop}", file=sys.stderr)
            return stop.status
        except KeyboardInterrupt:
            print("train_cars.py: interrupted before training started; nothing was written",
                  file=sys.stderr)
            return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
