"""ProGrad's gradient alignment: drop the part of a gradient that fights the zero-shot knowledge.

Not a loss term: it sits beside the loss, between `backward` and `optimizer.step()`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from promptmix._validation import check_positive, check_tensor

__all__ = ["prograd_backward", "project_conflicting_gradients"]


def _projected(gradient: Tensor, reference: Tensor, strength: float) -> tuple[Tensor, Tensor]:
    """`gradient` with `strength` times its conflicting component removed, and their cosine."""
    compute = torch.promote_types(gradient.dtype, torch.float32)  # float16 in float32
    g, r = gradient.to(compute), reference.to(compute)
    dot = (g * r).sum()
    reference_norm2 = (r * r).sum()
    # No conflict where `dot >= 0` or the reference is zero. Written so that NaN (which compares
    # False) takes the projecting branch: a NaN gradient or reference gives a NaN result, not an
    # unchanged one. torch.where instead of `if dot < 0`: no host-device synchronisation on GPUs.
    keep = (dot >= 0) | (reference_norm2 == 0)
    coefficient = torch.where(keep, 0.0, strength * dot / torch.where(keep, 1.0, reference_norm2))
    norms = torch.sqrt(reference_norm2 * (g * g).sum())
    cosine = torch.where(norms == 0, 0.0, dot / torch.where(norms == 0, 1.0, norms))
    return (g - coefficient * r).to(gradient.dtype), cosine


def project_conflicting_gradients(
    gradients: Sequence[Tensor | None],
    reference_gradients: Sequence[Tensor | None],
    *,
    strength: float = 1.0,
    per_parameter: bool = True,
) -> tuple[list[Tensor | None], Tensor]:
    r"""ProGrad's projection: remove the component of a gradient that opposes a reference one.

    $$
    g \leftarrow
    \begin{cases}
      g - \lambda \,\dfrac{\langle g, g_{\mathrm{ref}} \rangle}{\lVert g_{\mathrm{ref}} \rVert^2}
        \, g_{\mathrm{ref}} & \text{if } \langle g, g_{\mathrm{ref}} \rangle < 0, \\
      g & \text{otherwise,}
    \end{cases}
    $$

    where $g$ is the gradient of the training loss (ProGrad: the cross-entropy) and
    $g_{\mathrm{ref}}$ that of the zero-shot distillation term
    (`ZeroShotConsistency`). With $\lambda = 1$ the result is orthogonal to
    $g_{\mathrm{ref}}$: a step along it does not, to first order, move away from the
    zero-shot predictions. ProGrad (BeierZhu/Prompt-align `Dassl.ProGrad.pytorch/dassl/engine/
    trainer.py`, `prograd_backward_and_update`) projects each parameter tensor separately
    (`per_parameter=True`) with `LOSS.LAMBDA = 1`. `per_parameter=False` projects the
    concatenation of all gradients instead. Computed in (at least) float32; the results keep each
    gradient's dtype. A zero reference gradient leaves $g$ unchanged (cosine 0); NaN or inf in
    either gradient gives a NaN gradient and a NaN cosine.

    Args:
        gradients: one floating-point gradient per parameter (`None` for a parameter without
            one).
        reference_gradients: the reference gradient of each parameter, same order and shapes.
        strength: $\lambda \ge 0$ (0: no projection).
        per_parameter: project each parameter on its own (ProGrad) or all of them together.

    Returns:
        The projected gradients, one per parameter: `None` where the gradient is `None`, and
        the gradient unchanged where only its reference is `None`; and the cosines between $g$
        and $g_{\mathrm{ref}}$ before the projection, one per parameter that has both (or one
        for all of them with `per_parameter=False`; empty if none has both).

    Raises:
        TypeError: If a gradient is not a floating-point tensor.
        ValueError: If the sequences differ in length or a pair in shape.

    Examples:
        >>> import torch
        >>> grads, cosines = project_conflicting_gradients(
        ...     [torch.tensor([1.0, -1.0])], [torch.tensor([0.0, 2.0])]
        ... )
        >>> grads[0], cosines
        (tensor([1., 0.]), tensor([-0.7071]))
    """
    if len(gradients) != len(reference_gradients):
        raise ValueError(
            f"gradients and reference_gradients must have the same length but have "
            f"{len(gradients)} and {len(reference_gradients)}."
        )
    strength = check_positive("strength", strength, allow_zero=True)
    pairs = []
    for index, (gradient, reference) in enumerate(zip(gradients, reference_gradients, strict=True)):
        for name, value in (("gradients", gradient), ("reference_gradients", reference)):
            if value is not None and not (isinstance(value, Tensor) and value.is_floating_point()):
                raise TypeError(
                    f"{name}[{index}] must be a floating-point tensor or None but is "
                    f"{getattr(value, 'dtype', type(value).__name__)}."
                )
        if gradient is None or reference is None:
            continue
        if gradient.shape != reference.shape:
            raise ValueError(
                f"gradients[{index}] has shape {tuple(gradient.shape)} but "
                f"reference_gradients[{index}] has shape {tuple(reference.shape)}."
            )
        pairs.append(index)
    projected: list[Tensor | None] = list(gradients)
    if not pairs:
        return projected, torch.zeros(0)
    if per_parameter:
        cosines = []
        for index in pairs:
            projected[index], cosine = _projected(
                gradients[index],  # type: ignore[arg-type]
                reference_gradients[index],  # type: ignore[arg-type]
                strength,
            )
            cosines.append(cosine)
        return projected, torch.stack(cosines)
    compute = torch.promote_types(gradients[pairs[0]].dtype, torch.float32)  # type: ignore[union-attr]
    flat = torch.cat([gradients[i].to(compute).flatten() for i in pairs])  # type: ignore[union-attr]
    flat_reference = torch.cat(
        [reference_gradients[i].to(compute).flatten() for i in pairs]  # type: ignore[union-attr]
    )
    flat, cosine = _projected(flat, flat_reference, strength)
    for index, chunk in zip(
        pairs,
        flat.split([gradients[i].numel() for i in pairs]),  # type: ignore[union-attr]
        strict=True,
    ):
        gradient = gradients[index]
        projected[index] = chunk.view_as(gradient).to(gradient.dtype)  # type: ignore[union-attr]
    return projected, cosine.reshape(1)


def prograd_backward(
    loss: Tensor,
    reference_loss: Tensor,
    parameters: Iterable[torch.nn.Parameter],
    *,
    strength: float = 1.0,
    per_parameter: bool = True,
) -> Tensor:
    r"""Backward of `loss` with ProGrad's projection against `reference_loss`'s gradient.

    Runs the two backward passes ProGrad needs (`torch.autograd.grad` of `reference_loss`,
    keeping the graph, then of `loss`), projects with `project_conflicting_gradients` and
    *adds* the result to each parameter's `.grad`, as `loss.backward()` would. Call it in place
    of `loss.backward()`, then step the optimizer:

        out = loss_fn(images, subprompts, labels, zero_shot_logits=z)  # "consistency" term
        cosines = prograd_backward(out["ce"], out["consistency"], learner.parameters())
        optimizer.step()

    As in ProGrad, only the projected gradient of `loss` is applied: the reference loss steers
    the direction and is not itself minimised (add it to `loss` to do both). With a
    `GradScaler`, pass `scaler.scale(loss)` and `scaler.scale(reference_loss)`: the projection
    is invariant to a common scale. Under DDP the two `autograd.grad` calls do not all-reduce;
    all-reduce the gradients yourself (or use this without DDP's wrapper).

    Args:
        loss: the scalar whose gradient is applied (ProGrad: the cross-entropy).
        reference_loss: the scalar whose gradient direction must not be opposed (ProGrad: the
            zero-shot distillation, `ZeroShotConsistency`).
        parameters: an iterable of the parameters to update (a list, `module.parameters()`;
            wrap a single parameter in a list); those without `requires_grad` are skipped.
        strength: $\lambda \ge 0$.
        per_parameter: project each parameter tensor on its own (ProGrad) or all together.

    Returns:
        The cosines between the two gradients before projection (see
        `project_conflicting_gradients`), for logging how often they conflict.

    Raises:
        TypeError: If `parameters` is a single tensor rather than an iterable of them, holds
            something that is not a leaf tensor, or a loss is not a tensor.
        ValueError: If no parameter requires a gradient, or a loss is not a scalar.

    Examples:
        >>> import torch
        >>> weight = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        >>> loss = (weight * torch.tensor([1.0, -1.0])).sum()  # gradient (1, -1)
        >>> reference = (weight * torch.tensor([0.0, 2.0])).sum()  # gradient (0, 2)
        >>> prograd_backward(loss, reference, [weight])
        tensor([-0.7071])
        >>> weight.grad
        tensor([1., 0.])
    """
    for name, value in (("loss", loss), ("reference_loss", reference_loss)):
        check_tensor(name, value)
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar but has shape {tuple(value.shape)}.")
    if isinstance(parameters, Tensor):
        raise TypeError(
            "parameters must be an iterable of parameters, not a single tensor (iterating a "
            "tensor walks its rows, which get no gradient); pass [parameter]."
        )
    candidates = list(parameters)
    for index, param in enumerate(candidates):
        if not isinstance(param, Tensor) or not param.is_leaf:
            raise TypeError(
                f"parameters[{index}] must be a leaf tensor (a parameter) but is "
                f"{type(param).__name__ if not isinstance(param, Tensor) else 'a non-leaf tensor'}."
            )
    params = [p for p in candidates if p.requires_grad]
    if not params:
        raise ValueError("parameters holds no parameter that requires a gradient.")
    reference = torch.autograd.grad(reference_loss, params, retain_graph=True, allow_unused=True)
    gradients = torch.autograd.grad(loss, params, allow_unused=True)
    projected, cosines = project_conflicting_gradients(
        gradients, reference, strength=strength, per_parameter=per_parameter
    )
    for param, gradient in zip(params, projected, strict=True):
        if gradient is None:
            continue
        if param.grad is None:
            param.grad = gradient.detach()
        else:
            param.grad.add_(gradient.detach())
    return cosines
