# ruff: noqa: E501  (the table of cases reads best one case per line)
"""Every bad input we tried, run for real: the table of docs/reliability.md.

Each case is run twice: as on a CPU (value checks read the tensor, which is free there) and on
the device path a GPU takes (`_validation.HOST_CHECKS = False`: no host reads, bad values become
NaN on the device). The outcome is what actually happened: the error and its message, or a
non-finite result, or, for the few valid-but-extreme inputs, the check that the result is right.
A bad input that gives a finite result is marked SILENT and makes the script exit with 1.

    PYTHONPATH=src python benchmarks/bad_inputs.py --write docs/reliability.md
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import promptmix.functional as PF
from promptmix import (
    AssignmentEntropy,
    DiversityLoss,
    MixtureOfPromptsLoss,
    SoftEMAssigner,
    _validation,
    detect_collapse,
)
from promptmix.diagnostics import subprompt_usage

BEGIN, END = "<!-- bad-inputs:begin -->", "<!-- bad-inputs:end -->"
NAN, INF = float("nan"), float("inf")


def problem(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 6, generator=generator).to(dtype)
    prompts = torch.randn(4, 3, 6, generator=generator).to(dtype)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    return images, prompts, labels


def loss(images=None, prompts=None, labels=None, **kwargs):
    base_images, base_prompts, base_labels = problem()
    module_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("logit_scale", "tau")}
    loss_fn = MixtureOfPromptsLoss(**module_kwargs)
    out = loss_fn(
        base_images if images is None else images,
        base_prompts if prompts is None else prompts,
        base_labels if labels is None else labels,
        **kwargs,
    )
    return out["loss"]


def with_nan(tensor, index):
    tensor = tensor.clone()
    tensor[index] = NAN
    return tensor


def same_loss_as_int64(dtype):
    def run():
        images, prompts, labels = problem()
        entropy = AssignmentEntropy("marginal", num_classes=4, n_subprompts=3)
        reference = MixtureOfPromptsLoss(entropy=entropy)(images, prompts, labels)["loss"]
        entropy = AssignmentEntropy("marginal", num_classes=4, n_subprompts=3)
        value = MixtureOfPromptsLoss(entropy=entropy)(images, prompts, labels.to(dtype))["loss"]
        return f"class indices: loss equals the int64 one: {torch.equal(value, reference)}"

    return run


def tiny_tau_half():
    images, prompts, labels = problem(torch.float16)
    gamma = PF.responsibilities(images, prompts, labels, tau=1e-3)
    ok = bool(torch.isfinite(gamma).all()) and bool(
        ((gamma.float().sum(-1) - 1).abs() < 1e-2).all()
    )
    return f"finite rows on the simplex: {ok}"


def sinkhorn_winner():
    cosine = 0.3 + 0.03 * torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    cosine[:, 0] = cosine.max(1).values + 0.2
    gamma = SoftEMAssigner("sinkhorn").from_similarities(cosine, torch.zeros(8, dtype=torch.long),
                                                          tau=0.3)
    usage = gamma.sum(0)
    return f"usage {[round(u, 4) for u in usage.tolist()]} (fair share 2.0 each)"


def anti_parallel():
    t = torch.tensor([1.0, 2.0, 0.5])
    report = detect_collapse(torch.stack([t, -t]).unsqueeze(0))
    return f"collapsed={report.collapsed}: {report.reasons}"


GOOD = torch.full((4, 3), 1 / 3)
LABELS4 = torch.tensor([0, 1, 0, 1])

# (what, kind, call): kind "bad" must raise or give non-finite; "valid" is extreme but valid.
CASES: list[tuple[str, str, Callable[[], object]]] = [
    # --- the loss: features
    ("loss: NaN in one sub-prompt feature", "bad", lambda: loss(prompts=with_nan(problem()[1], (1, 0, 2)))),
    ("loss: NaN in one image feature", "bad", lambda: loss(images=with_nan(problem()[0], (2, 1)))),
    ("loss: inf in one image feature", "bad", lambda: loss(images=problem()[0].index_fill(1, torch.tensor([0]), INF))),
    ("loss: NaN sub-prompt of a class not in the batch", "bad", lambda: loss(prompts=with_nan(problem()[1], (3, 0, 0)))),
    ("loss: NaN sub-prompt, every weight 0", "bad", lambda: loss(prompts=with_nan(problem()[1], (1, 0, 2)), diversity_weight=0.0, entropy_weight=0.0, mixture_weight=0.0)),
    ("loss: NaN image, hard assigner", "bad", lambda: loss(images=with_nan(problem()[0], (2, 1)), assigner=SoftEMAssigner("hard"))),
    ("loss: NaN image, Sinkhorn assigner", "bad", lambda: loss(images=with_nan(problem()[0], (2, 1)), assigner=SoftEMAssigner("sinkhorn"))),
    ("loss: image_features of rank 1", "bad", lambda: loss(images=torch.randn(6))),
    ("loss: subprompt_features of rank 2", "bad", lambda: loss(prompts=torch.randn(4, 6))),
    ("loss: feature dimensions differ", "bad", lambda: loss(images=torch.randn(8, 5))),
    ("loss: K = 0 sub-prompts", "bad", lambda: loss(prompts=torch.randn(4, 0, 6))),
    ("loss: integer image features", "bad", lambda: loss(images=torch.ones(8, 6, dtype=torch.long))),
    ("loss: image features as a list", "bad", lambda: loss(images=[[0.0] * 6] * 8)),
    # --- the loss: labels
    ("loss: uint8 labels", "valid", same_loss_as_int64(torch.uint8)),
    ("loss: int8 labels", "valid", same_loss_as_int64(torch.int8)),
    ("loss: int16 labels", "valid", same_loss_as_int64(torch.int16)),
    ("loss: int32 labels", "valid", same_loss_as_int64(torch.int32)),
    ("loss: float labels", "bad", lambda: loss(labels=problem()[2].float())),
    ("loss: bool labels", "bad", lambda: loss(labels=problem()[2] > 0)),
    ("loss: a label = num_classes", "bad", lambda: loss(labels=problem()[2].index_fill(0, torch.tensor([0]), 4), mixture_weight=0.0)),
    ("loss: a label = -1", "bad", lambda: loss(labels=problem()[2].index_fill(0, torch.tensor([0]), -1), mixture_weight=0.0)),
    ("loss: labels of shape (batch + 1,)", "bad", lambda: loss(labels=torch.zeros(9, dtype=torch.long))),
    ("loss: labels of shape (batch, 1)", "bad", lambda: loss(labels=torch.zeros(8, 1, dtype=torch.long))),
    # --- the loss: scales and temperatures
    ("loss: tensor logit_scale -5", "bad", lambda: loss(logit_scale=torch.tensor(-5.0))),
    ("loss: tensor logit_scale NaN", "bad", lambda: loss(logit_scale=torch.tensor(NAN))),
    ("loss: tensor logit_scale inf", "bad", lambda: loss(logit_scale=torch.tensor(INF))),
    ("loss: tensor logit_scale of shape (batch,)", "bad", lambda: loss(logit_scale=torch.full((8,), 50.0))),
    ("loss: float logit_scale 0", "bad", lambda: loss(logit_scale=0.0)),
    ("loss: float logit_scale NaN", "bad", lambda: loss(logit_scale=NAN)),
    ("loss: tau 0", "bad", lambda: loss(tau=0.0)),
    ("loss: tau -1", "bad", lambda: loss(tau=-1.0)),
    ("loss: tau NaN", "bad", lambda: loss(tau=NAN)),
    ("loss: tau 1e-40 (scores overflow float32)", "bad", lambda: loss(tau=1e-40)),
    ("E-step: float16 features, tau 1e-3", "valid", tiny_tau_half),
    ("loss: diversity_weight -1", "bad", lambda: loss(diversity_weight=-1.0)),
    ("loss: assigner of the wrong type", "bad", lambda: loss(assigner=DiversityLoss())),
    # --- entropy
    ("entropy: NaN responsibilities", "bad", lambda: PF.assignment_entropy(with_nan(GOOD, (1, 1)), mode="marginal")),
    ("entropy: rows summing to 0.7", "bad", lambda: PF.assignment_entropy(torch.full((2, 2), 0.35))),
    ("entropy: a negative responsibility", "bad", lambda: PF.assignment_entropy(torch.tensor([[1.5, -0.5]]))),
    ("entropy: usage_prior with another K", "bad", lambda: PF.assignment_entropy(GOOD, LABELS4, mode="marginal", usage_prior=torch.full((2, 2), 0.5), prior_count=1.0)),
    ("entropy: usage_prior rows off the simplex", "bad", lambda: PF.assignment_entropy(GOOD, LABELS4, mode="marginal", usage_prior=torch.full((2, 3), 0.5), prior_count=1.0)),
    ("entropy: label beyond the usage_prior's classes", "bad", lambda: PF.assignment_entropy(GOOD, torch.tensor([0, 1, 0, 2]), mode="marginal", usage_prior=torch.full((2, 3), 1 / 3), prior_count=1.0)),
    ("entropy: prior_count -1", "bad", lambda: PF.assignment_entropy(GOOD, prior_count=-1.0)),
    ("entropy: num_classes without n_subprompts", "bad", lambda: AssignmentEntropy("marginal", num_classes=3)),
    ("entropy: momentum 1", "bad", lambda: AssignmentEntropy("marginal", momentum=1.0)),
    # --- E-step
    ("E-step: Sinkhorn on a NaN score", "bad", lambda: PF.sinkhorn(with_nan(torch.randn(4, 3), (1, 2)))),
    ("E-step: Sinkhorn with 0 iterations", "bad", lambda: PF.sinkhorn(torch.randn(4, 3), iterations=0)),
    ("E-step: Sinkhorn with tol 0", "bad", lambda: PF.sinkhorn(torch.randn(4, 3), tol=0.0)),
    ("E-step: Sinkhorn with float groups", "bad", lambda: PF.sinkhorn(torch.randn(4, 3), torch.zeros(4))),
    ("E-step: Sinkhorn, one sub-prompt wins every image by 0.2", "valid", sinkhorn_winner),
    ("E-step: mode 'foo'", "bad", lambda: SoftEMAssigner("foo")),
    ("E-step: usage_prior with the soft mode", "bad", lambda: SoftEMAssigner("soft").from_similarities(torch.rand(2, 2), torch.tensor([0, 0]), usage_prior=torch.full((1, 2), 0.5))),
    ("E-step: hard mode on a NaN similarity", "bad", lambda: PF.responsibilities_from_similarities(with_nan(torch.rand(3, 2), (0, 0)), mode="hard")),
    # --- diversity and similarities
    ("diversity: NaN sub-prompt", "bad", lambda: DiversityLoss()(with_nan(torch.randn(2, 3, 4), (0, 1, 1)))),
    ("diversity: NaN in a masked-out class", "bad", lambda: DiversityLoss()(with_nan(torch.randn(2, 3, 4), (0, 1, 1)), torch.tensor([False, True]))),
    ("diversity: power 0.5", "bad", lambda: DiversityLoss(power=0.5)),
    ("diversity: margin 1", "bad", lambda: DiversityLoss(margin=1.0)),
    ("diversity: class_mask of another length", "bad", lambda: DiversityLoss()(torch.randn(2, 3, 4), torch.tensor([True]))),
    ("similarity: pairwise cosine of a NaN sub-prompt", "bad", lambda: PF.pairwise_cosine(with_nan(torch.randn(1, 2, 3), (0, 0, 0)))),
    ("classifier: aggregation 'foo'", "bad", lambda: PF.class_logits(torch.rand(2, 3, 2), aggregation="foo")),
    # --- diagnostics
    ("diagnostics: all-NaN features", "bad", lambda: detect_collapse(torch.full((2, 3, 4), NAN))),
    ("diagnostics: NaN responsibilities", "bad", lambda: detect_collapse(torch.randn(2, 3, 4), torch.full((2, 3), NAN), torch.tensor([0, 1]))),
    ("diagnostics: empty batch of responsibilities", "bad", lambda: detect_collapse(torch.randn(2, 3, 4), torch.empty(0, 3), torch.empty(0, dtype=torch.long))),
    ("diagnostics: responsibilities with another K", "bad", lambda: detect_collapse(torch.randn(2, 3, 4), torch.full((2, 4), 0.25), torch.tensor([0, 1]))),
    ("diagnostics: rows off the simplex (share 3.4)", "bad", lambda: detect_collapse(torch.randn(2, 3, 4), torch.tensor([[3.4, 0.0, 0.0], [1.0, 0.0, 0.0]]), torch.tensor([0, 0]))),
    ("diagnostics: responsibilities without labels", "bad", lambda: detect_collapse(torch.randn(2, 3, 4), GOOD)),
    ("diagnostics: anti-parallel sub-prompts", "valid", anti_parallel),
    ("diagnostics: usage with num_classes 0", "bad", lambda: subprompt_usage(GOOD, LABELS4, 0)),
    ("schedule: warmup_steps >= total_steps", "bad", lambda: PF.temperature_at(0, total_steps=5, warmup_steps=5)),
]


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|")


def outcome(call: Callable[[], object]) -> tuple[str, bool]:
    """(what happened, whether it was silent: a finite number from bad input)."""
    try:
        value = call()
    except Exception as error:
        message = str(error).replace("\n", " ")
        if len(message) > 110:
            message = message[:107] + "..."
        return f"`{type(error).__name__}`: {_cell(message)}", False
    if isinstance(value, str):
        return _cell(value), False
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not torch.isfinite(value).all():
            kind = "NaN" if torch.isnan(value).any() else "inf"
            return f"{kind} result", False
        return f"finite result {value.flatten()[:3].tolist()}", True
    return f"returned {type(value).__name__}", True


def table() -> tuple[str, int]:
    rows = ["| # | Input | CPU | Device path (GPU, no host reads) |", "|---|---|---|---|"]
    silent = 0
    for number, (what, kind, call) in enumerate(CASES, 1):
        cells = []
        for host in (True, False):
            _validation.HOST_CHECKS = host
            text, is_silent = outcome(call)
            if kind == "bad" and is_silent:
                silent += 1
                text = f"**SILENT**: {text}"
            cells.append(text)
        _validation.HOST_CHECKS = True
        label = what + (" (valid)" if kind == "valid" else "")
        rows.append(f"| {number} | {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows), silent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="replace the table between the markers")
    args = parser.parse_args()
    torch.set_num_threads(1)
    text, silent = table()
    bad = sum(kind == "bad" for _, kind, _ in CASES)
    summary = (
        f"{len(CASES)} inputs ({bad} bad, {len(CASES) - bad} valid but extreme); "
        f"silent: {silent}. Generated by `benchmarks/bad_inputs.py` with torch "
        f"{torch.__version__.split('+')[0]}."
    )
    block = f"{BEGIN}\n{summary}\n\n{text}\n{END}"
    if args.write:
        page = args.write.read_text()
        start, end = page.index(BEGIN), page.index(END) + len(END)
        args.write.write_text(page[:start] + block + page[end:])
    else:
        print(block)
    sys.exit(1 if silent else 0)


if __name__ == "__main__":
    main()
