"""Train a mixture of prompts with promptmix inside your own loop: the recommended recipe.

Stand-ins keep this file offline and fast: a small random-init open_clip model supplies the text
side, and toy image features (classes that each come in two "looks", common to every class)
play the frozen image tower. With your own model, build it with
``open_clip.create_model_and_transforms(name, pretrained=...)``, compute image features with
``model.encode_image`` (under ``torch.no_grad()``: the image tower stays frozen) and pass
``logit_scale=model.logit_scale.exp()`` to the loss.
"""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F

from promptmix import (
    MixtureOfPromptsLoss,
    OffsetMixtureOfPrompts,
    SoftEMAssigner,
    TemperatureSchedule,
    detect_collapse,
    initialize_from_kmeans,
)

CLASSNAMES = ["sedan", "coupe", "pickup truck", "minivan", "convertible", "station wagon"]
LOOKS = 2  # each class comes in two looks that every class shares (say, front and side views)


def toy_image_features(per_look: int, dim: int, generator: torch.Generator):
    """Unit image features ``(n, dim)``, their classes and looks: stand-ins for a frozen tower."""
    classes = F.normalize(torch.randn(len(CLASSNAMES), dim, generator=generator), dim=-1)
    views = F.normalize(torch.randn(LOOKS, dim, generator=generator), dim=-1)
    own = F.normalize(torch.randn(len(CLASSNAMES), LOOKS, dim, generator=generator), dim=-1)
    looks = views + 0.5 * own  # a view, as it shows on this class

    def sample(count: int):
        labels = torch.arange(len(CLASSNAMES)).repeat_interleave(LOOKS * count)
        look = torch.arange(LOOKS).repeat_interleave(count).repeat(len(CLASSNAMES))
        noise = F.normalize(torch.randn(len(labels), dim, generator=generator), dim=-1)
        features = classes[labels] + 0.8 * looks[labels, look] + 0.6 * noise
        return F.normalize(features, dim=-1), labels, look

    return sample(per_look), sample(per_look)


def make_loss(steps: int, regularise: bool) -> tuple[MixtureOfPromptsLoss, TemperatureSchedule]:
    """The objective and its temperature schedule.

    ``regularise=True``: the loss's defaults (EM pull 1, label noise 0.1, no entropy or
    diversity term) with the recommended schedule, tau 1 -> 0.3: the recipe that
    ``benchmarks/suite.py`` supports (docs/tuning.md). ``False``: the original mixture-of-prompts
    code without regularisers (EM pull 1, every label trusted, tau annealed to 0.05), which
    collapses.
    """
    if not regularise:
        schedule = TemperatureSchedule(start=1.0, end=0.05, total_steps=steps)
        before = MixtureOfPromptsLoss(
            mixture_weight=1.0, entropy_weight=0.0, label_noise=0.0, tau=schedule
        )
        return before, schedule
    schedule = TemperatureSchedule(total_steps=steps)  # tau 1 -> 0.3, linear
    return MixtureOfPromptsLoss(tau=schedule), schedule


def main(steps: int = 200, regularise: bool = True, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    # Your model: open_clip.create_model_and_transforms("ViT-B-16", pretrained="openai")[0].
    clip_model = open_clip.CLIP(
        embed_dim=64,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=1, head_width=32),
        text_cfg=dict(width=64, heads=2, layers=1),
    )
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    # The recipe's learner: a class part, K looks shared by all classes and per-class
    # corrections (share_looks=True, the default). The uncured reference learns each class's
    # sub-prompts alone.
    prompts = OffsetMixtureOfPrompts(
        clip_model,
        tokenizer,
        CLASSNAMES,
        n_subprompts=LOOKS,
        share_looks=regularise,
        generator=generator,
    )
    (images, labels, _), (test_images, test_labels, test_looks) = toy_image_features(
        per_look=16, dim=prompts.output_dim, generator=generator
    )

    loss_fn, schedule = make_loss(steps, regularise)
    if regularise:  # the recipe's one init call: the looks from every class's images, each part
        # shrunk toward the text by the images behind it; it also sets the prior's image count
        initialize_from_kmeans(prompts, images, labels, generator=generator)
    optimizer = torch.optim.Adam(prompts.parameters(), lr=5e-3)
    losses = []
    for step in range(steps):
        batch = torch.randperm(len(labels), generator=generator)[:128]
        # The learner's prior (the text anchor and the shared-look prior) goes into the loss.
        prior = prompts.prior_loss() if regularise else None
        out = loss_fn(images[batch], prompts(), labels[batch], prior)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        schedule.step()  # the temperature schedule is yours to advance
        losses.append(out["loss"].item())
        if step % 100 == 0 or step == steps - 1:
            report = detect_collapse(prompts().detach(), out["responsibilities"], labels[batch])
            print(f"step {step:4d}  loss {losses[-1]:.3f}  tau {out['tau']:.2f}  {report.message}")

    with torch.no_grad():  # held-out: accuracy, and which sub-prompt claims each image
        subprompts = prompts()
        logits = loss_fn.logits(test_images, subprompts)
        accuracy = (logits.argmax(-1) == test_labels).float().mean().item()
        claimed = SoftEMAssigner(mode="hard")(test_images, subprompts, test_labels)
        report = detect_collapse(subprompts, claimed, test_labels)
    print(f"held-out accuracy {accuracy:.1%}; {report.message}")
    return {
        "losses": losses,
        "prior": out["prior"].item(),
        "accuracy": accuracy,
        "report": report,
        "claimed": claimed.argmax(-1),
        "labels": test_labels,
        "looks": test_looks,
    }


if __name__ == "__main__":
    main()
