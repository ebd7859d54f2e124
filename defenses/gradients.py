"""Per-sample gradients of the training loss (DESIGN 4.1).

``torch.func.functional_call`` + ``vmap(grad(...))`` in batches. Parameters are
addressed by their ``named_parameters`` name, never by ``str(module)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .task import task_of


def sample_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``model``'s training loss per sample (its ``Task``; cross-entropy by default):
    logits ``(B, C)``, labels ``(B,)`` -> ``(B,)``."""
    return task_of(model).sample_loss(logits, labels)


def named_parameter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached parameter tensors by name (copies are not needed: they are only read)."""
    return {name: p.detach() for name, p in model.named_parameters()}


def per_sample_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    param_names: Sequence[str] | None = None,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Gradient of each sample's loss w.r.t. the named parameters.

    inputs ``(n, *input_shape)``, labels ``(n,)`` -> ``{name: (n, *param.shape)}``.
    The model is evaluated as it is (call ``model.eval()`` first for batch norm).
    Parameters not in ``param_names`` are held fixed.
    """
    params = named_parameter_tensors(model)
    names = list(param_names) if param_names is not None else list(params)
    unknown = [n for n in names if n not in params]
    if unknown:
        raise KeyError(f"unknown parameter names: {unknown}")
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    varying = {n: params[n] for n in names}
    fixed = {n: t for n, t in params.items() if n not in varying}
    task = task_of(model)

    def loss_of(var: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**fixed, **var}, buffers), (x.unsqueeze(0),))
        return task.sample_loss(out, y.unsqueeze(0)).squeeze(0)

    per_sample = vmap(grad(loss_of), in_dims=(None, 0, 0))
    chunks: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for start in range(0, inputs.shape[0], batch_size):
        grads = per_sample(
            varying, inputs[start : start + batch_size], labels[start : start + batch_size]
        )
        for n in names:
            chunks[n].append(grads[n].detach())
    if inputs.shape[0] == 0:
        return {n: params[n].new_zeros((0, *params[n].shape)) for n in names}
    return {n: torch.cat(chunks[n]) for n in names}


def flatten_gradients(
    grads: dict[str, torch.Tensor], names: Sequence[str] | None = None
) -> torch.Tensor:
    """Concatenate per-sample gradients into ``(n, p)`` in the order of ``names``."""
    keys = list(names) if names is not None else list(grads)
    return torch.cat([grads[k].reshape(grads[k].shape[0], -1) for k in keys], dim=1)


def predicted_labels(
    model: nn.Module, inputs: torch.Tensor, batch_size: int = 1024
) -> torch.Tensor:
    """Arg-max class of each input: ``(n, *input_shape)`` -> ``(n,)``."""
    with torch.no_grad():
        outs = [
            model(inputs[i : i + batch_size]).argmax(dim=1)
            for i in range(0, len(inputs), batch_size)
        ]
    return torch.cat(outs) if outs else torch.zeros(0, dtype=torch.long)
