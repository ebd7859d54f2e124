"""Build a model from its stored spec: a built-in architecture, or a trusted factory.

Factories come only from the server's own configuration (``trusted_factories``:
name -> ``module:function``); a caller can name one but never supply an import path.
A loss other than cross-entropy is such a factory too: called without arguments, it
returns a ``Task`` (``expunge.defenses.task``).
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from typing import Any

from torch import nn

from expunge.defenses.architectures import ARCHITECTURES, ArchitectureSpec, build_model
from expunge.defenses.task import Task, attach_task, builtin_task
from expunge.server.errors import FailedPrecondition


def build_architecture(spec: ArchitectureSpec, trusted: dict[str, str], seed: int = 0) -> nn.Module:
    """The model ``spec`` names, with the training loss it names attached (``Task``)."""
    task = loss_task(spec, trusted)
    if spec.name in ARCHITECTURES:
        return attach_task(build_model(replace(spec, loss="cross_entropy"), seed), task)
    model = _trusted(spec.name, trusted, "architecture")(spec, seed)
    if not isinstance(model, nn.Module):
        raise FailedPrecondition(f"factory {trusted[spec.name]} did not return a torch.nn.Module")
    return attach_task(model, task)


def loss_task(spec: ArchitectureSpec, trusted: dict[str, str]) -> Task:
    """The built-in loss ``spec.loss`` names, or the ``Task`` its trusted factory returns."""
    task = builtin_task(spec.loss, spec.label_smoothing)
    if task is not None:
        return task
    made = _trusted(spec.loss, trusted, "loss")()
    if not isinstance(made, Task):
        raise FailedPrecondition(
            f"factory {trusted[spec.loss]} did not return a Task (sample_loss, logit_gradient, "
            "logit_hessian, shift_invariant, convex_in_logits; see expunge.defenses.task)"
        )
    return made


def _trusted(name: str, trusted: dict[str, str], what: str) -> Any:
    target = trusted.get(name)
    if target is None:
        built_in = ARCHITECTURES if what == "architecture" else ("cross_entropy",)
        raise FailedPrecondition(
            f"{what} {name!r} is neither built in {built_in} nor a trusted factory in the "
            "server configuration (trusted_factories)"
        )
    module_name, _, function = target.partition(":")
    return getattr(importlib.import_module(module_name), function)
