import torch

from promptmix import MixtureOfPromptsLoss, TemperatureSchedule, detect_collapse

torch.manual_seed(0)
num_classes, n_subprompts, dim, steps = 10, 4, 512, 1000

# K learnable sub-prompt features per class: in practice the output of a prompt learner
# such as promptmix.MixtureOfPrompts; here free vectors.
subprompts = torch.nn.Parameter(torch.randn(num_classes, n_subprompts, dim))
image_features = torch.randn(64, dim)  # frozen CLIP image features of a batch
labels = torch.randint(0, num_classes, (64,))

schedule = TemperatureSchedule(total_steps=steps)  # tau 1 -> 0.3, linear: the recommended one
# The defaults: EM pull 1, label noise 0.1 (each image weighed by how likely its label is
# right), no entropy or diversity term (both computed and reported all the same).
loss_fn = MixtureOfPromptsLoss(tau=schedule)
out = loss_fn(image_features, subprompts, labels)  # with a learner: add prior=prompts.prior_loss()
out["loss"].backward()  # gradients reach the sub-prompts
schedule.step()  # advance tau once per iteration

parts = ("loss", "ce", "mixture", "diversity", "entropy")
print({name: round(out[name].item(), 3) for name in parts})
print(detect_collapse(subprompts.detach(), out["responsibilities"], labels).message)
