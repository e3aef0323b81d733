"""Benchmark of the sub-prompt learners on random-init open_clip models built offline.

Sections (`--sections`, `speed` by default):

- `speed`: forward + backward of every sub-prompt with `MixtureOfPrompts` (default settings, and
  with `gradient_checkpointing=True`) against the naive CoOp encoding of the same prompts and
  context at 77 tokens, in the same run, as interleaved repeats: median time, spread, ratio,
  largest feature and gradient difference, peak memory on CUDA, and on CUDA whether a step
  synchronises with the host (`torch.cuda.set_sync_debug_mode("error")`). Writes JSON and Markdown.
- `memory`: peak resident memory of one step over many classes on CPU, one child process per
  configuration.
- `offset`: step time of `OffsetMixtureOfPrompts` against `MixtureOfPrompts`.
- `share`: share of the regulariser and the assigner (`promptmix.MixtureOfPromptsLoss` minus a
  plain cross-entropy over the same class logits) in a full training step.

Run from the repository root, e.g.

    python benchmarks/bench_prompts.py --threads 2 --configs 49x2 196x8
    python benchmarks/bench_prompts.py --device cuda --dtype bf16 --models ViT-B-16 ViT-L-14
    python benchmarks/bench_prompts.py --quick    # a smoke run of a few seconds

See benchmarks/README.md and docs/performance.md for measured figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
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
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_classnames(path: Path, count: int) -> list[str]:
    """`count` class names; beyond the file's, names repeat with a number appended."""
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [
        names[i % len(names)] + ("" if i < len(names) else f" {i // len(names)}")
        for i in range(count)
    ]


def build_model(name: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model(name, pretrained=None).eval().to(device)


def timed(function, repeats: int = 1) -> tuple[float, object]:
    """Best wall time over `repeats` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device` (`fp32`: no autocast)."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_length_step(
    model, prompts: MixtureOfPrompts, weights: torch.Tensor, chunk: int | None
) -> torch.Tensor:
    """The naive way: every prompt padded to 77 tokens, CoOp's splice, encode_text's steps.

    Forward + backward in batches of `chunk` prompts (`None`: one batch); returns the normalised
    features `(num_classes, K, dim)`. Gradients accumulate in `prompts.context.grad`. Pooling
    follows the tower's own rule (`TextTower.pool_positions`), as `encode_text` does.
    """
    tower = prompts._tower
    length = tower.context_length
    token_ids = F.pad(prompts.token_ids, (0, length - prompts.token_ids.shape[-1]))
    token_ids = rearrange(token_ids, "c k l -> (c k) l")
    context = prompts.context
    if not prompts.class_specific:
        context = context.expand(prompts.num_classes, *context.shape)
    context = rearrange(context, "c k n w -> (c k) n w")
    weights = rearrange(weights, "c k d -> (c k) d")
    start, end = prompts.context_start, prompts.context_start + prompts.n_ctx
    features = []
    rows_all = torch.arange(len(token_ids), device=token_ids.device)
    for rows in rows_all.split(chunk or len(token_ids)):
        ids = token_ids[rows]
        embeddings = tower.token_embedding(ids)
        x = torch.cat([embeddings[:, :start], context[rows], embeddings[:, end:]], dim=1)
        x = tower.transformer(x + tower.positional_embedding, attn_mask=tower.attn_mask)
        x = tower.ln_final(x)[torch.arange(len(rows), device=x.device), tower.pool_positions(ids)]
        projection = tower.text_projection
        if isinstance(projection, torch.nn.Linear):
            x = projection(x)
        elif projection is not None:
            x = x @ projection
        x = F.normalize(x, dim=-1)
        (x * weights[rows]).sum().backward()
        features.append(x.detach())
    return rearrange(torch.cat(features), "(c k) d -> c k d", k=prompts.n_subprompts)


def step(prompts: torch.nn.Module, weights: torch.Tensor) -> torch.Tensor:
    """Forward + backward of all sub-prompts against a fixed linear loss; returns features."""
    features = prompts()
    (features * weights).sum().backward()
    return features.detach()


def sync_check(device: torch.device, function: Callable[[], object]) -> str:
    """Run `function` with CUDA's synchronisation debug mode set to error; say what happened."""
    if device.type != "cuda":
        return "n/a (CPU; tests/test_prompts.py guards it)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        function()
        return "none"
    except RuntimeError as error:
        return f"synchronises: {str(error).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        synchronize(device)


def summary(seconds: list[float]) -> dict[str, float]:
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds)}


def bench_one(args, model_name: str, classes: int, k: int, device: torch.device) -> dict:
    """One configuration: all contenders, interleaved repeats; returns a JSON-ready record."""
    model = build_model(model_name, device)
    tokenizer = open_clip.get_tokenizer(model_name)
    classnames = load_classnames(args.classnames, classes)
    contenders: dict[str, MixtureOfPrompts] = {
        "promptmix": MixtureOfPrompts(
            model, tokenizer, classnames, n_subprompts=k, generator=torch.Generator().manual_seed(0)
        )
    }
    if not args.no_checkpointing:
        contenders["checkpointed"] = MixtureOfPrompts(
            model,
            tokenizer,
            classnames,
            n_subprompts=k,
            gradient_checkpointing=True,
            generator=torch.Generator().manual_seed(0),
        )
    naive_prompts = contenders["promptmix"]
    weights = torch.randn(classes, k, naive_prompts.output_dim, device=device)
    naive_chunk = args.naive_chunk if args.naive_chunk else (None if device.type == "cuda" else 64)
    runs: dict[str, Callable[[], torch.Tensor]] = {
        "naive": lambda: full_length_step(model, naive_prompts, weights, naive_chunk),
        **{name: (lambda p=p: step(p, weights)) for name, p in contenders.items()},
    }
    learners = {"naive": naive_prompts, **contenders}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in runs}
    peak: dict[str, float] = {}
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    failed: dict[str, str] = {}

    def run(name: str) -> float:
        learners[name].context.grad = None
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        with autocast(device, args.dtype):
            features = runs[name]()
        synchronize(device)
        elapsed = time.perf_counter() - start
        cpu_seconds[name].append(time.process_time() - cpu_start)
        outputs[name] = (features.float(), learners[name].context.grad.float().clone())
        return elapsed

    # On CUDA a first, untimed round warms up kernels and caches and measures peak memory; on
    # CPU there is nothing to warm up and the naive round is long, so every round is timed.
    rounds = args.repeats + (device.type == "cuda")
    for repeat in range(rounds):
        names = [name for name in runs if name not in failed]
        for name in names if repeat % 2 == 0 else names[::-1]:  # interleaved, order alternating
            if device.type == "cuda" and repeat == 0:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            try:
                elapsed = run(name)
            except torch.cuda.OutOfMemoryError:
                failed[name] = "out of memory"
                learners[name].context.grad = None
                outputs.pop(name, None)
                continue
            if device.type == "cuda" and repeat == 0:
                peak[name] = (torch.cuda.max_memory_allocated(device) - before) / GIB
                cpu_seconds[name].clear()
            else:
                seconds[name].append(elapsed)
    sync = sync_check(device, lambda: step(contenders["promptmix"], weights))
    record: dict = {
        "model": model_name,
        "classes": classes,
        "subprompts": k,
        "prompts": classes * k,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "naive_batch": naive_chunk,
        "failed": failed,
        "seconds": {name: summary(values) for name, values in seconds.items() if values},
        "cpu_seconds": {name: summary(values) for name, values in cpu_seconds.items() if values},
        "peak_gib": peak,
        "host_syncs": sync,
    }
    if "naive" not in failed:
        paired = [n / p for n, p in zip(seconds["naive"], seconds["promptmix"], strict=True)]
        record["speedup"] = summary(paired)
        features, grad = outputs["naive"]
        for name in contenders:
            ours, ours_grad = outputs[name]
            record[f"{name}_feature_diff"] = (ours - features).abs().max().item()
            record[f"{name}_grad_diff"] = ((ours_grad - grad).abs().max() / grad.abs().max()).item()
    if seconds.get("checkpointed"):
        paired = [c / p for c, p in zip(seconds["checkpointed"], seconds["promptmix"], strict=True)]
        record["checkpointed_over_promptmix"] = summary(paired)
    return record


def environment(device: torch.device) -> dict[str, str | int]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    return {
        "device": f"{device.type}: {name}",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
    }


def spread(values: dict[str, float], unit: str = "") -> str:
    return f"{values['median']:.3g}{unit} [{values['min']:.3g}-{values['max']:.3g}]"


def markdown(env: dict, records: list[dict], command: str) -> str:
    lines = [
        f"Device: {env['device']}, {env['threads']} threads; torch {env['torch']}, "
        f"open_clip {env['open_clip']}, Python {env['python']}.",
        "",
        f"Command: `{command}`",
        "",
        "Forward + backward of every sub-prompt; seconds as median [min-max] over interleaved "
        "repeats; speed-up = naive / promptmix per repeat, median [min-max].",
        "",
        "| text tower | classes x K | dtype | naive 77 tokens (s) | promptmix (s) | speed-up "
        "| checkpointed (s) | checkpointed / promptmix | max feature diff | host syncs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        sec = r["seconds"]
        naive = r["failed"].get("naive") or spread(sec["naive"])
        speedup = spread(r["speedup"], "x") if "speedup" in r else "-"
        checkpointed = spread(sec["checkpointed"]) if "checkpointed" in sec else "-"
        ratio = (
            spread(r["checkpointed_over_promptmix"], "x")
            if "checkpointed_over_promptmix" in r
            else "-"
        )
        diff = f"{r['promptmix_feature_diff']:.1e}" if "promptmix_feature_diff" in r else "-"
        lines.append(
            f"| {r['model']} | {r['classes']} x {r['subprompts']} | {r['dtype']} | {naive} "
            f"| {spread(sec['promptmix'])} | {speedup} | {checkpointed} | {ratio} | {diff} "
            f"| {r['host_syncs']} |"
        )
    if any(r["peak_gib"] for r in records):
        lines += [
            "",
            "| text tower | classes x K | dtype | peak GiB beyond the model |",
            "|---|---|---|---|",
        ]
        for r in records:
            peaks = ", ".join(f"{name} {gib:.2f}" for name, gib in r["peak_gib"].items())
            lines.append(
                f"| {r['model']} | {r['classes']} x {r['subprompts']} | {r['dtype']} | {peaks} |"
            )
    return "\n".join(lines) + "\n"


def bench_speed(args, device: torch.device) -> list[dict]:
    env = environment(device)
    print(
        f"[speed] {env['device']}, {env['threads']} threads, torch {env['torch']}, "
        f"open_clip {env['open_clip']}, Python {env['python']}, dtype {args.dtype}, "
        f"{args.repeats} interleaved repeats"
    )
    records = []
    for model_name in args.models:
        for config in args.configs:
            classes, k = (int(part) for part in config.lower().split("x"))
            record = bench_one(args, model_name, classes, k, device)
            records.append(record)
            sec = record["seconds"]
            line = f"  {model_name} {classes} x {k}: "
            line += " | ".join(f"{name} {spread(values, ' s')}" for name, values in sec.items())
            if "speedup" in record:
                line += f" | speed-up {spread(record['speedup'], 'x')}"
                line += f" | max feature diff {record['promptmix_feature_diff']:.1e}"
            if "checkpointed_over_promptmix" in record:
                ratio = record["checkpointed_over_promptmix"]
                line += f" | checkpointed/promptmix {spread(ratio, 'x')}"
            for name, why in record["failed"].items():
                line += f" | {name}: {why}"
            line += f" | host syncs: {record['host_syncs']}"
            print(line, flush=True)
    command = "python benchmarks/bench_prompts.py " + " ".join(sys.argv[1:])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"environment": env, "command": command, "results": records}, indent=2)
        )
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(env, records, command))
    print(markdown(env, records, command))
    return records


def memory_child(config: dict) -> None:
    """One step in this process; print peak RSS as JSON (run through `--memory-child`)."""
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
        chunk_size=None if config["mode"] == "cut" else "auto",
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
    """A memory field of /proc/self/status (`VmRSS`, `VmHWM`) in bytes."""
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
        "threads": torch.get_num_threads(),
    }
    runs = [("checkpointed", args.memory_classes)]
    runs += [(mode, args.naive_classes) for mode in ("cut", "naive-77") if args.naive_classes]
    print(
        f"[memory] {args.memory_model}, K={args.memory_subprompts}, CPU: "
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


def bench_offset(args, model, tokenizer, classnames, k: int, timings: dict[str, float]) -> None:
    device = next(model.parameters()).device
    build_s, offset = timed(
        lambda: OffsetMixtureOfPrompts(model, tokenizer, classnames, n_subprompts=k)
    )
    weights = torch.randn(len(classnames), k, offset.output_dim, device=device)
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


def bench_share(args, model, tokenizer, classnames, k: int, timings: dict[str, float]) -> None:
    try:
        from promptmix import AssignmentEntropy, MixtureOfPromptsLoss
    except ImportError as error:  # the core lands separately
        print(f"[share] skipped: {error}")
        return
    batch, classes = args.batch, len(classnames)
    device = next(model.parameters()).device
    images = torch.randn(batch, 3, *model.visual.image_size, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    with torch.no_grad():
        image_s, image_features = timed(lambda: model.encode_image(images, normalize=True), 2)
    subprompts = F.normalize(torch.randn(classes, k, image_features.shape[-1], device=device), -1)
    loss_fn = MixtureOfPromptsLoss(
        entropy=AssignmentEntropy(mode="marginal", num_classes=classes, n_subprompts=k)
    ).to(device)

    def loss_step(full: bool) -> None:
        leaf = subprompts.clone().requires_grad_(True)
        if full:
            loss = loss_fn(image_features, leaf, labels)["loss"]
        else:
            loss = F.cross_entropy(loss_fn.logits(image_features, leaf), labels)
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
        bench_offset(args, model, tokenizer, classnames, k, timings)
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
        "--models", "--model", nargs="+", default=["ViT-B-32"], help="open_clip model names"
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["196x8"],
        help="CLASSESxK configurations, e.g. 49x2 196x8 1000x8",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="fp32, or bf16 / fp16 through autocast",
    )
    parser.add_argument("--classnames", type=Path, default=DEFAULT_CLASSNAMES)
    parser.add_argument("--repeats", type=int, default=3, help="speed: interleaved repeats")
    parser.add_argument(
        "--naive-chunk",
        type=int,
        default=0,
        help="prompts per naive batch (0: one batch on CUDA, 64 on CPU to bound its memory)",
    )
    parser.add_argument(
        "--no-checkpointing", action="store_true", help="speed: skip gradient_checkpointing=True"
    )
    parser.add_argument("--json", type=Path, help="speed: write the results here as JSON")
    parser.add_argument("--markdown", type=Path, help="speed: write the table here")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
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
        default=["speed"],
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
    if args.quick:
        args.configs, args.repeats, args.sections = ["3x2"], 1, ["speed"]
    args.classnames = args.classnames.resolve()
    device = torch.device(args.device)
    timings: dict[str, float] = {}
    if "speed" in args.sections:
        records = bench_speed(args, device)
        timings["mixture_step_s"] = records[0]["seconds"]["promptmix"]["median"]
    if "memory" in args.sections:
        bench_memory(args)
    if {"offset", "share"} & set(args.sections):
        classes, k = (int(part) for part in args.configs[0].lower().split("x"))
        model = build_model(args.models[0], device)
        tokenizer = open_clip.get_tokenizer(args.models[0])
        classnames = load_classnames(args.classnames, classes)
        if "offset" in args.sections:
            bench_offset(args, model, tokenizer, classnames, k, timings)
        if "share" in args.sections:
            bench_share(args, model, tokenizer, classnames, k, timings)


if __name__ == "__main__":
    main()
