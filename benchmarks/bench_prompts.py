"""Benchmark of the sub-prompt learners on a random-init open_clip model built offline.

Sections (``--sections``, all by default):

- ``speed``: forward + backward of every sub-prompt (MixtureOfPrompts: sorted, cut chunks) against
  the plain CoOp encoding of the same prompts at 77 tokens, in the same run: time ratio, largest
  feature difference and largest relative gradient difference.
- ``memory``: peak resident memory of one step over many classes, one child process per
  configuration (``ru_maxrss`` of the child; tracemalloc does not see torch's allocations).
- ``offset``: step time of OffsetMixtureOfPrompts against MixtureOfPrompts.
- ``share``: share of the regulariser and the assigner (``promptmix.MixtureOfPromptsLoss`` minus a
  plain cross-entropy over the same class logits) in a full training step (frozen image encoder
  on a batch, sub-prompt forward + backward, loss, optimiser step).

Run from the repository root, e.g. ``python benchmarks/bench_prompts.py --classes 49`` for a
quicker subset; see benchmarks/README.md for measured figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip
import torch
import torch.nn.functional as F
from einops import rearrange

from promptmix.prompts import MixtureOfPrompts, OffsetMixtureOfPrompts

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CLASSNAMES = REPO / "benchmarks" / "stanford_cars_classnames.txt"
GIB = 1024**3


def load_classnames(path: Path, count: int) -> list[str]:
    """``count`` class names; beyond the file's, names repeat with a number appended."""
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [
        names[i % len(names)] + ("" if i < len(names) else f" {i // len(names)}")
        for i in range(count)
    ]


def build_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model(name, pretrained=None).eval()


def timed(function, repeats: int = 1) -> tuple[float, object]:
    """Best wall time over ``repeats`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def full_length_step(model, prompts: MixtureOfPrompts, weights: torch.Tensor, chunk: int):
    """The obvious way: every prompt padded to 77 tokens, CoOp's splice, encode_text's steps.

    Forward + backward chunk by chunk (so memory stays bounded); returns the normalised features
    ``(num_classes, K, dim)``. Gradients accumulate in ``prompts.context.grad``.
    """
    token_ids = F.pad(prompts.token_ids, (0, model.context_length - prompts.token_ids.shape[-1]))
    token_ids = rearrange(token_ids, "c k l -> (c k) l")
    context = prompts.context
    if not prompts.class_specific:
        context = context.expand(prompts.num_classes, *context.shape)
    context = rearrange(context, "c k n w -> (c k) n w")
    weights = rearrange(weights, "c k d -> (c k) d")
    start, end = prompts.context_start, prompts.context_start + prompts.n_ctx
    features = []
    for rows in torch.arange(len(token_ids)).split(chunk):
        ids = token_ids[rows]
        embeddings = model.token_embedding(ids)
        x = torch.cat([embeddings[:, :start], context[rows], embeddings[:, end:]], dim=1)
        x = model.transformer(x + model.positional_embedding, attn_mask=model.attn_mask)
        x = model.ln_final(x)[torch.arange(len(rows)), ids.argmax(dim=-1)] @ model.text_projection
        x = F.normalize(x, dim=-1)
        (x * weights[rows]).sum().backward()
        features.append(x.detach())
    return rearrange(torch.cat(features), "(c k) d -> c k d", k=prompts.n_subprompts)


def step(prompts: torch.nn.Module, weights: torch.Tensor) -> torch.Tensor:
    """Forward + backward of all sub-prompts against a fixed linear loss; returns features."""
    features = prompts()
    (features * weights).sum().backward()
    return features.detach()


def bench_speed(args, model, tokenizer, classnames) -> dict[str, float]:
    k = args.subprompts
    prompts = MixtureOfPrompts(
        model,
        tokenizer,
        classnames,
        n_subprompts=k,
        chunk_size=args.chunk_size,
        gradient_checkpointing=args.checkpointing,
    )
    weights = torch.randn(len(classnames), k, prompts.output_dim)
    ours_s = baseline_s = ours_cpu = baseline_cpu = float("inf")
    for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
        prompts.context.grad = None
        cpu = time.process_time()
        seconds, features = timed(lambda: step(prompts, weights))
        ours_cpu = min(ours_cpu, time.process_time() - cpu)
        ours_s, ours_grad = min(ours_s, seconds), prompts.context.grad.clone()
        prompts.context.grad = None
        cpu = time.process_time()
        seconds, baseline = timed(
            lambda: full_length_step(model, prompts, weights, args.chunk_size)
        )
        baseline_cpu = min(baseline_cpu, time.process_time() - cpu)
        baseline_s, baseline_grad = min(baseline_s, seconds), prompts.context.grad
    feature_diff = (features - baseline).abs().max().item()
    grad_diff = ((ours_grad - baseline_grad).abs().max() / baseline_grad.abs().max()).item()
    count = len(classnames) * k
    print(
        f"[speed] {args.model}, {len(classnames)} classes x K={k} = {count} prompts, forward + "
        f"backward, chunk_size={args.chunk_size}, gradient_checkpointing={args.checkpointing}, "
        f"{torch.get_num_threads()} threads\n"
        f"  sorted cut chunks: {ours_s:8.2f} s wall, {ours_cpu:8.2f} s CPU   (longest "
        f"end-of-text + 1: {prompts.token_ids.shape[-1]} tokens)\n"
        f"  full 77 tokens:    {baseline_s:8.2f} s wall, {baseline_cpu:8.2f} s CPU\n"
        f"  speed-up {baseline_s / ours_s:.2f}x wall, {baseline_cpu / ours_cpu:.2f}x CPU time "
        f"(best of {args.repeats}), "
        f"max |feature diff| {feature_diff:.2e}, max gradient diff / max gradient {grad_diff:.2e}"
    )
    return {"mixture_step_s": ours_s, "baseline_step_s": baseline_s}


def memory_child(config: dict) -> None:
    """One step in this process; print peak RSS as JSON (run through ``--memory-child``)."""
    torch.set_num_threads(config["threads"])
    model = build_model(config["model"])
    tokenizer = open_clip.get_tokenizer(config["model"])
    classnames = load_classnames(Path(config["classnames"]), config["classes"])
    naive = config["mode"] == "naive-77"
    prompts = MixtureOfPrompts(
        model,
        tokenizer,
        classnames,
        n_subprompts=config["subprompts"],
        chunk_size=None if config["mode"] == "cut" else config["chunk_size"],
        gradient_checkpointing=config["mode"] == "checkpointed",
    )
    weights = torch.randn(len(classnames), prompts.n_subprompts, prompts.output_dim)
    rss_before = _status_bytes("VmRSS")
    # ru_maxrss also counts the parent's memory inherited at fork, and VmHWM the model's build:
    # reset the high-water mark so it measures this step alone (Linux, /proc/self/clear_refs).
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    if naive:  # one forward over all prompts at 77 tokens, then one backward
        full_length_step(model, prompts, weights, len(classnames) * prompts.n_subprompts)
    else:
        step(prompts, weights)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    print(json.dumps({"peak": peak, "before": rss_before, "seconds": seconds}))


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}: this benchmark needs Linux.")


def run_memory_child(config: dict) -> dict | None:
    command = [sys.executable, __file__, "--memory-child", json.dumps(config)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"  {config['mode']}: failed ({result.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_memory(args) -> None:
    base = {
        "model": args.memory_model,
        "classnames": str(args.classnames),
        "subprompts": args.memory_subprompts,
        "chunk_size": args.chunk_size,
        "threads": torch.get_num_threads(),
    }
    runs = [("checkpointed", args.memory_classes)]
    runs += [(mode, args.naive_classes) for mode in ("cut", "naive-77") if args.naive_classes]
    print(
        f"[memory] {args.memory_model}, K={args.memory_subprompts}, chunk_size={args.chunk_size}: "
        "one forward + backward per child process; peak = the child's peak RSS during the step "
        "(VmHWM, reset before it), step = peak - RSS before the step (model and prompts built)"
    )
    for mode, classes in runs:
        result = run_memory_child({**base, "mode": mode, "classes": classes})
        if result is None:
            continue
        step_gib = (result["peak"] - result["before"]) / GIB
        line = (
            f"  {mode:>12}: {classes} classes: peak {result['peak'] / GIB:6.2f} GiB, "
            f"step {step_gib:6.2f} GiB, {result['seconds']:.1f} s"
        )
        if classes != args.memory_classes:
            scaled = step_gib * args.memory_classes / classes
            line += (
                f"  (step x {args.memory_classes}/{classes} = {scaled:.1f} GiB, linear estimate)"
            )
        print(line)


def bench_offset(args, model, tokenizer, classnames, timings: dict[str, float]) -> None:
    k = args.subprompts
    build_s, offset = timed(
        lambda: OffsetMixtureOfPrompts(model, tokenizer, classnames, n_subprompts=k)
    )
    weights = torch.randn(len(classnames), k, offset.output_dim)
    offset_s, _ = timed(lambda: step(offset, weights), repeats=20)
    timings["offset_step_s"] = offset_s
    print(
        f"[offset] {len(classnames)} classes x K={k}: OffsetMixtureOfPrompts built in "
        f"{build_s:.2f} s (text tower once), step {offset_s * 1e3:.3f} ms"
    )
    if "mixture_step_s" in timings:
        mixture_s = timings["mixture_step_s"]
        print(
            f"  MixtureOfPrompts step {mixture_s:.2f} s: "
            f"offset is {mixture_s / offset_s:.0f}x faster"
        )


def bench_share(args, model, tokenizer, classnames, timings: dict[str, float]) -> None:
    try:
        from promptmix import AssignmentEntropy, MixtureOfPromptsLoss
        from promptmix.functional import class_logits, subprompt_similarities
    except ImportError as error:  # the core lands separately
        print(f"[share] skipped: {error}")
        return
    k, batch, classes = args.subprompts, args.batch, len(classnames)
    images = torch.randn(batch, 3, *model.visual.image_size)
    labels = torch.randint(0, classes, (batch,))
    with torch.no_grad():
        image_s, image_features = timed(lambda: model.encode_image(images, normalize=True), 2)
    subprompts = F.normalize(torch.randn(classes, k, image_features.shape[-1]), dim=-1)
    loss_fn = MixtureOfPromptsLoss(
        entropy=AssignmentEntropy("marginal", num_classes=classes, n_subprompts=k)
    )

    def loss_step(full: bool) -> None:
        leaf = subprompts.clone().requires_grad_(True)
        if full:
            loss = loss_fn(image_features, leaf, labels)["loss"]
        else:
            similarities = subprompt_similarities(image_features, leaf)
            logits = class_logits(
                similarities,
                logit_scale=100.0,
                aggregation=loss_fn.aggregation,
                tau=loss_fn.current_tau(),
                assigner_scale=loss_fn.assigner.scale,
            )
            loss = F.cross_entropy(logits, labels)
        loss.backward()

    full_s = ce_s = float("inf")
    for _ in range(50):  # interleaved best-of, so load from other processes hits both alike
        full_s = min(full_s, timed(lambda: loss_step(True))[0])
        ce_s = min(ce_s, timed(lambda: loss_step(False))[0])
    regulariser_s = full_s - ce_s
    print(
        f"[share] C={classes}, K={k}, batch {batch}: image encoder (no grad) {image_s:.3f} s, "
        f"MixtureOfPromptsLoss fwd+bwd {full_s * 1e3:.2f} ms, plain CE {ce_s * 1e3:.2f} ms, "
        f"regulariser + assigner {regulariser_s * 1e3:.2f} ms"
    )
    if "offset_step_s" not in timings:
        bench_offset(args, model, tokenizer, classnames, timings)
    for name in ("mixture_step_s", "offset_step_s"):
        if name in timings:
            total = image_s + timings[name] + full_s
            print(
                f"  with {name[:-7]} prompts: step {total:.3f} s, regulariser + assigner "
                f"{100 * regulariser_s / total:.3f}% of it, whole loss {100 * full_s / total:.3f}%"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="ViT-B-32", help="open_clip model for speed/offset/share"
    )
    parser.add_argument("--classnames", type=Path, default=DEFAULT_CLASSNAMES)
    parser.add_argument("--classes", type=int, default=196, help="first N class names")
    parser.add_argument("--subprompts", type=int, default=8, help="K")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="speed: best of N, interleaved")
    parser.add_argument(
        "--checkpointing", action="store_true", help="speed: gradient_checkpointing=True"
    )
    parser.add_argument("--batch", type=int, default=32, help="images per step (share)")
    parser.add_argument("--memory-model", default="ViT-S-32-alt")
    parser.add_argument("--memory-classes", type=int, default=1000)
    parser.add_argument("--memory-subprompts", type=int, default=8)
    parser.add_argument(
        "--naive-classes", type=int, default=25, help="classes for the cut / 77-token runs (0: off)"
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["speed", "memory", "offset", "share"],
        choices=["speed", "memory", "offset", "share"],
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return
    args.classnames = args.classnames.resolve()
    classnames = load_classnames(args.classnames, args.classes)
    timings: dict[str, float] = {}
    model = tokenizer = None
    if set(args.sections) & {"speed", "offset", "share"}:
        model = build_model(args.model)
        tokenizer = open_clip.get_tokenizer(args.model)
    if "speed" in args.sections:
        timings.update(bench_speed(args, model, tokenizer, classnames))
    if "memory" in args.sections:
        bench_memory(args)
    if "offset" in args.sections:
        bench_offset(args, model, tokenizer, classnames, timings)
    if "share" in args.sections:
        bench_share(args, model, tokenizer, classnames, timings)


if __name__ == "__main__":
    main()
