"""How many samples one pass over a model takes: sized by the activations they produce.

A fixed batch of 1,024 suits a small dense model (a few hundred activation floats per
sample) and thrashes the caches of a convolutional one: the 532k-parameter CIFAR-shaped
CNN produces 61k floats per sample, and its forward pass over 10,000 images took 1.8 s
in batches of 1,024 against 0.96 s in batches of 128 (float64 on 512 images: 0.21 s
against 0.09 s in batches of 64; two threads). Passes are therefore cut to about
``PASS_BYTES`` of activations, never more than the caller's largest batch. Batching does
not change what is computed, only the order floating-point sums are taken in; the rule
depends only on the model and the input shape, so results stay repeatable.
"""

from __future__ import annotations

import threading
from weakref import WeakKeyDictionary

import torch
from torch import nn

__all__ = ["PASS_BYTES", "activation_floats", "samples_per_pass"]

# Activations one pass may hold: of the order of a server core's share of its caches.
# 128 of the CNN's float32 samples (as measured above), and the largest batch whole for
# a tabular MLP (166 floats a sample).
PASS_BYTES = 32 << 20

_known: WeakKeyDictionary[nn.Module, dict[tuple[int, ...], int]] = WeakKeyDictionary()
_lock = threading.Lock()


def activation_floats(model: nn.Module, example: torch.Tensor) -> int:
    """Floats one sample of ``example``'s shape produces in a forward pass: its input and
    every leaf module's outputs (measured once per model and shape, in eval mode)."""
    shape = tuple(example.shape[1:])
    with _lock:
        known = _known.setdefault(model, {})
        if shape in known:
            return known[shape]
    total = int(example[:1].numel())
    measuring = threading.get_ident()

    def count(module: nn.Module, inputs: object, output: object) -> None:
        nonlocal total
        if threading.get_ident() != measuring:  # another thread's pass on a shared model
            return
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        total += sum(int(o.numel()) for o in outputs if isinstance(o, torch.Tensor))

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    modes = [(m, m.training) for m in model.modules()]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        model.eval()  # no batch-norm statistics move
        with torch.no_grad():
            model(_like_parameters(model, example[:1]))
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes:
            module.training = training
    with _lock:
        _known.setdefault(model, {})[shape] = total
    return total


def samples_per_pass(
    model: nn.Module, example: torch.Tensor, largest: int, bytes_per_float: int = 4
) -> int:
    """Samples of ``example``'s shape per pass: about ``PASS_BYTES`` of activations at
    ``bytes_per_float``, at least one, at most ``largest``."""
    per_sample = activation_floats(model, example) * bytes_per_float
    return max(1, min(largest, PASS_BYTES // max(per_sample, 1)))


def _like_parameters(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    reference = next(model.parameters(), None)
    if reference is None:
        return x
    x = x.to(reference.device)
    return x.to(reference.dtype) if x.is_floating_point() else x
