import torch

from promptmix import MixtureOfPromptsLoss, TemperatureSchedule, UsageEstimate, detect_collapse

torch.manual_seed(0)
num_classes, n_subprompts, dim, steps = 10, 4, 512, 1000

# K learnable sub-prompt features per class: in practice the output of a prompt learner
# such as promptmix.MixtureOfPrompts; here free vectors.
subprompts = torch.nn.Parameter(torch.randn(num_classes, n_subprompts, dim))
image_features = torch.randn(64, dim)  # frozen CLIP image features of a batch
labels = torch.randint(0, num_classes, (64,))

schedule = TemperatureSchedule(total_steps=steps)  # tau 1 -> 0.3, linear: the recommended one
loss_fn = MixtureOfPromptsLoss(  # the defaults: EM pull 10, marginal entropy 1, no diversity
    tau=schedule,
    # the marginal entropy spreads each class's usage, helped by a running usage estimate
    usage_estimate=UsageEstimate(num_classes=num_classes, n_subprompts=n_subprompts),
)
out = loss_fn(image_features, subprompts, labels)
out["loss"].backward()  # gradients reach the sub-prompts
schedule.step()  # advance tau once per iteration

parts = ("loss", "ce", "mixture", "diversity", "entropy")
print({name: round(out[name].item(), 3) for name in parts})
print(detect_collapse(subprompts.detach(), out["responsibilities"], labels).message)
