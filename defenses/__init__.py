"""Expunge's algorithms on tensors: unlearning, influence, target identification, indexes.

Pure torch/numpy (faiss on first use); no transport, no storage. The public names load
their module on first access, so ``import expunge.defenses`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module (under expunge.defenses) that defines it
_PUBLIC = {
    # models and training
    "ArchitectureSpec": "architectures",
    "build_model": "architectures",
    "TrainConfig": "training",
    "Checkpoint": "training",
    "train": "training",
    "per_sample_gradients": "gradients",
    # L-CODEC parameter selection and the targeted Newton update
    "codec": "codec",
    "foci": "codec",
    "LcodecConfig": "lcodec",
    "select_markov_blanket": "lcodec",
    "select_by_newton_direction": "sparse_selection",
    "ParameterSelection": "selection",
    "ForgetRecipe": "recipe",
    "NewtonConfig": "newton",
    "newton_update": "newton",
    "newton_cg_update": "newton",
    "block_coordinate_newton": "newton",
    "apply_update": "newton",
    # certificate and verification
    "BudgetLedger": "certificate",
    "make_certificate": "certificate",
    "removal_bound": "certificate",
    "add_certified_noise": "certificate",
    "deletion_metrics": "evaluate",
    "retrain_gap": "evaluate",
    "membership_auc": "evaluate",
    # influence, targets, counterfactuals, peers
    "InfluenceConfig": "influence",
    "influence_scores": "influence",
    "target_score": "targets",
    "decide_target": "targets",
    "implicated_samples": "targets",
    "calibrate_threshold": "targets",
    "CounterfactualConfig": "counterfactual",
    "SharedHessianCounterfactual": "counterfactual",
    "activation_clustering": "poison_filters",
    "spectral_signature_scores": "poison_filters",
    # the gradient index
    "EmbeddingConfig": "embeddings",
    "GradientEmbedder": "embeddings",
    "GradientIndex": "index",
    "ExactTorchIndex": "index",
    "FaissIndex": "index",
    "TorchDeviceIndex": "index",
    "load_index": "index",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'expunge.defenses' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"expunge.defenses.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
