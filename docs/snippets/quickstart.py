import torch

from promptmix import AssignmentEntropy, MixtureOfPromptsLoss, TemperatureSchedule, detect_collapse

torch.manual_seed(0)
num_classes, n_subprompts, dim, steps = 10, 4, 512, 1000

# K learnable sub-prompt features per class: in practice the output of a prompt learner
# such as promptmix.MixtureOfPrompts; here free vectors.
subprompts = torch.nn.Parameter(torch.randn(num_classes, n_subprompts, dim))
image_features = torch.randn(64, dim)  # frozen CLIP image features of a batch
labels = torch.randint(0, num_classes, (64,))

schedule = TemperatureSchedule(start=3.0, end=0.3, total_steps=steps)
loss_fn = MixtureOfPromptsLoss(
    tau=schedule,
    # spread each class's usage over its sub-prompts, with a running usage estimate per class
    entropy=AssignmentEntropy("marginal", num_classes=num_classes, n_subprompts=n_subprompts),
    entropy_weight=0.3,
)
out = loss_fn(image_features, subprompts, labels)
out["loss"].backward()  # gradients reach the sub-prompts
schedule.step()  # advance tau once per iteration

parts = ("loss", "ce", "mixture", "diversity", "entropy")
print({name: round(out[name].item(), 3) for name in parts})
print(detect_collapse(subprompts.detach(), out["responsibilities"], labels).message)
