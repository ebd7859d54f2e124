"""Build a model from its stored spec: a built-in architecture, or a trusted factory.

Factories come only from the server's own configuration (``trusted_factories``:
name -> ``module:function``); a caller can name one but never supply an import path.
"""

from __future__ import annotations

import importlib

from torch import nn

from expunge.defenses.architectures import ARCHITECTURES, ArchitectureSpec, build_model
from expunge.server.errors import FailedPrecondition


def build_architecture(spec: ArchitectureSpec, trusted: dict[str, str], seed: int = 0) -> nn.Module:
    if spec.name in ARCHITECTURES:
        return build_model(spec, seed)
    target = trusted.get(spec.name)
    if target is None:
        raise FailedPrecondition(
            f"architecture {spec.name!r} is neither built in {ARCHITECTURES} nor a trusted factory "
            "in the server configuration (trusted_factories)"
        )
    module_name, _, function = target.partition(":")
    factory = getattr(importlib.import_module(module_name), function)
    model = factory(spec, seed)
    if not isinstance(model, nn.Module):
        raise FailedPrecondition(f"factory {target} did not return a torch.nn.Module")
    return model
