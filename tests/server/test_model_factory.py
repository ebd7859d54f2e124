from __future__ import annotations

import pytest

from expunge.defenses.architectures import ArchitectureSpec
from expunge.server.errors import FailedPrecondition
from expunge.server.model_factory import build_architecture


def test_a_trusted_factory_from_config_builds_the_model() -> None:
    spec = ArchitectureSpec("tiny", (1, 8, 8), 10)
    model = build_architecture(spec, {"tiny": "tests.server.factories:tiny_linear"})
    assert sum(p.numel() for p in model.parameters()) == 650


def test_an_untrusted_architecture_name_is_refused() -> None:
    spec = ArchitectureSpec("os.system", (1, 8, 8), 10)
    with pytest.raises(FailedPrecondition, match="trusted factory"):
        build_architecture(spec, {})
