"""Per-sample logit Jacobians on a parameter selection, from layer inputs and output gradients.

The generic Jacobian (``vmap(jacrev(...))``) forms, for every sample and class, the
gradient of each whole parameter tensor a selected entry lives in, and only then gathers
the entries. On the 532k-parameter CIFAR-shaped CNN that is the 2.1M-entry dense weight,
8 MiB per sample and class, for a few thousand selected entries: 6.0 s of a forget's
Gauss-Newton Hessian on 256 samples. For ``nn.Linear`` and ``nn.Conv2d`` an entry's
gradient is a product of the layer's input and the gradient at its output (backprop's
own factorisation), so the selected entries are formed directly: one forward pass, one
backward pass per class on the whole batch, and products over the selected entries only.

``selected_logit_jacobian`` answers ``None`` when it cannot vouch for the result, and the
caller takes the generic path: a selected parameter of another module type, a module
called twice in one forward, a parameter shared between modules, or a forward that uses a
parameter outside its module's own call (checked by one forward-mode product along a
seeded random direction, which the Jacobian must reproduce).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import jvp
from torch.nn import functional

__all__ = ["selected_logit_jacobian"]

# Floats one gathered product may hold (samples x entries x positions): bounds the
# memory of a convolution's per-sample entries (about 64 MiB in float32).
_CHUNK_FLOATS = 1 << 24
# Relative mismatch with the forward-mode product beyond which the Jacobian is not used.
_CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


@dataclass
class _Call:
    """One selected module's forward call: its input and output (in the autograd graph)."""

    inputs: torch.Tensor
    output: torch.Tensor


def selected_logit_jacobian(
    model: nn.Module,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    v: torch.Tensor,
    names: list[str],
    indices: list[torch.Tensor],
    x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(jacobian (B, C, p), logits (B, C))`` of ``logits_of`` at ``v`` on ``x`` ``(B, *shape)``.

    ``logits_of(w)`` evaluates the model on ``x`` with the selected entries (``names``,
    sorted flat ``indices`` into each tensor, concatenated in that order) taken from
    ``w`` ``(p,)``. Samples must not interact in the forward (evaluation mode). ``None``:
    the direct form does not apply (module docstring).
    """
    modules = _selected_modules(model, names)
    if modules is None:
        return None
    calls: dict[str, list[_Call]] = {module_name: [] for module_name, _ in modules}

    def recorder(module_name: str) -> Callable[[nn.Module, tuple[object, ...], object], None]:
        def record(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
            if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                calls[module_name].append(_Call(inputs[0], output))

        return record

    hooks = [
        model.get_submodule(module_name).register_forward_hook(recorder(module_name))
        for module_name in calls
    ]
    try:
        with torch.enable_grad():
            w = v.detach().clone().requires_grad_(True)
            logits = logits_of(w)
    finally:
        for hook in hooks:
            hook.remove()
    if logits.dim() != 2 or any(len(made) != 1 for made in calls.values()):
        return None
    outputs = [calls[module_name][0].output for module_name, _ in modules]
    if not all(o.requires_grad for o in outputs):
        return None
    batch, classes = logits.shape
    # Each selected weight's layer inputs as (B, positions, fan-in), formed once.
    layer_inputs: dict[str, torch.Tensor] = {}
    for module_name, attribute in modules:
        if attribute == "weight" and module_name not in layer_inputs:
            module = model.get_submodule(module_name)
            arranged = _layer_inputs(module, calls[module_name][0].inputs.detach())
            if arranged is None:
                return None
            layer_inputs[module_name] = arranged
    columns: list[torch.Tensor] = []
    for c in range(classes):
        gradients = torch.autograd.grad(
            logits[:, c].sum(), outputs, retain_graph=c < classes - 1, allow_unused=True
        )
        row = []
        for (module_name, attribute), index, gradient in zip(
            modules, indices, gradients, strict=True
        ):
            if gradient is None:
                row.append(torch.zeros(batch, index.numel(), dtype=v.dtype, device=v.device))
                continue
            # The gradient at the output as (B, positions, channels).
            if isinstance(model.get_submodule(module_name), nn.Linear):
                delta = gradient.reshape(batch, -1, gradient.shape[-1])
            else:
                delta = gradient.reshape(batch, gradient.shape[1], -1).transpose(1, 2)
            if attribute == "bias":
                entries = delta.sum(dim=1)[:, index]
            else:
                arranged = layer_inputs[module_name]
                if arranged.shape[1] != delta.shape[1]:
                    return None
                entries = _weight_entries(delta, arranged, index)
            row.append(entries.to(v.dtype))
        columns.append(torch.cat(row, dim=1))
    jacobian = torch.stack(columns, dim=1)  # (B, C, p)
    logits = logits.detach()
    if not _agrees(jacobian, logits_of, v):
        return None
    return jacobian, logits


def _selected_modules(model: nn.Module, names: list[str]) -> list[tuple[str, str]] | None:
    """(module name, attribute) of each selected parameter, or None if one is unsupported."""
    owners: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    found = []
    for name in names:
        module_name, _, attribute = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return None
        held = getattr(module, attribute, None)
        if not isinstance(held, torch.Tensor) or owners.get(id(held), 0) != 1:
            return None  # not a direct parameter of its module, or shared with another
        if attribute not in ("weight", "bias") or not _supported(module):
            return None
        found.append((module_name, attribute))
    return found


def _supported(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return True
    if type(module) is nn.Conv2d:
        return (
            module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )
    return False


def _layer_inputs(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor | None:
    """A Linear's or Conv2d's input as ``(B, positions, fan-in)``: its weight's per-sample
    gradient is sum over positions of (output gradient) x (this row)."""
    batch = inputs.shape[0]
    if isinstance(module, nn.Linear):
        # Any dimensions between the batch and the features are positions (a sequence).
        return inputs.reshape(batch, -1, module.in_features)
    if isinstance(module, nn.Conv2d):
        unfolded = functional.unfold(
            inputs,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,  # type: ignore[arg-type]
            stride=module.stride,
        )  # (B, I*kh*kw, L): the rows of weight.view(O, -1)
        return unfolded.transpose(1, 2)
    return None


def _weight_entries(
    delta: torch.Tensor, activations: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """Selected entries ``(B, k)`` of the per-sample weight gradients sum_t delta_t a_t^T.

    ``delta`` ``(B, T, out)``, ``activations`` ``(B, T, in)``; ``index`` into the flat
    ``(out, in)`` weight. A small weight's whole per-sample gradient is one batched matrix
    product, then gathered (a convolution's filters); a large one's selected entries are
    formed alone (a wide dense layer, 8 MiB per sample whole).
    """
    batch, _, width = activations.shape
    if batch * delta.shape[2] * width <= _CHUNK_FLOATS:
        whole = torch.bmm(delta.transpose(1, 2), activations)  # (B, out, in)
        return whole.reshape(batch, -1)[:, index]
    return _gathered_products(delta, activations, index // width, index % width)


def _gathered_products(
    delta: torch.Tensor, activations: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """sum_t delta[b, t, rows[k]] * activations[b, t, cols[k]] ``(B, k)``, chunked over k."""
    batch, positions = delta.shape[0], delta.shape[1]
    chunk = max(1, _CHUNK_FLOATS // max(batch * positions, 1))
    parts = []
    for start in range(0, rows.numel(), chunk):
        r, c = rows[start : start + chunk], cols[start : start + chunk]
        parts.append((delta[:, :, r] * activations[:, :, c]).sum(dim=1))
    if not parts:
        return delta.new_zeros(batch, 0)
    return torch.cat(parts, dim=1)


def _agrees(
    jacobian: torch.Tensor, logits_of: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor
) -> bool:
    """The Jacobian reproduces a forward-mode product along one seeded random direction."""
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device)
    expected = jvp(logits_of, (v.detach(),), (direction,))[1]
    predicted = jacobian @ direction
    tolerance = _CHECK_TOLERANCE.get(v.dtype, 1e-3)
    # Rounding grows with the sum of the products' magnitudes, not with their sum.
    scale = float(expected.abs().max()) + float((jacobian.abs() @ direction.abs()).max())
    return bool((predicted - expected).abs().max() <= tolerance * max(scale, 1e-30))
