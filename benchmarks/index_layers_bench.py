"""Gradients of a layer subset against full gradients, on a case where both fit.

The server's ``index_layers = "auto"`` embeds every parameter's gradient while the
projections fit ``index_projection_cache_bytes`` and only the trailing layers beyond
(``expunge.server.index.layers``). This measures what the subset costs in agreement and
gains in time, on the CIFAR-shaped 532k-parameter CNN of the scale benchmark trained on
5,000 images (three epochs, a checkpoint at each, plus the final weights: T = 4), where
the full-gradient embedding fits too. For 50 held-out queries (labelled with the model's
prediction, as Scan and Neighbors do) it compares the GAS scores over all training
samples from each subset's embeddings with the full-gradient ones: Spearman correlation
per query, and the overlap of the top-10 proponents. Time: embedding 1,000 training
samples, with the projections already drawn (as the server keeps them).

Run ``python -m benchmarks.index_layers_bench``; results in
``benchmarks/results/index_layers.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from benchmarks.scale_bench import Recipe, cifar_shaped, train_plain
from expunge.defenses.embeddings import EmbeddingConfig, GradientEmbedder
from expunge.defenses.gradients import predicted_labels
from expunge.defenses.training import Checkpoint

RESULTS = Path(__file__).resolve().parent / "results" / "index_layers.json"
# Module names of benchmarks.scale_models.cifar_cnn: conv 0, conv 3, dense 7, output 9.
SUBSETS = {"all": None, "dense_and_output": ("7", "9"), "output": ("9",)}
QUERIES = 50
TOP = 10


def _param_names(model: torch.nn.Module, modules: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if modules is None:
        return None
    return tuple(n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] in modules)


def run(n_train: int) -> dict[str, Any]:
    torch.set_num_threads(2)
    images, labels = cifar_shaped(n_train + QUERIES, seed=0)
    x, y = torch.from_numpy(images[:n_train]), torch.from_numpy(labels[:n_train])
    queries = torch.from_numpy(images[n_train:])
    recipe = Recipe(epochs=3, checkpoint_every=1)
    model, states, _ = train_plain(x, y, recipe, seed=0)
    checkpoints = [Checkpoint(i, recipe.learning_rate, s) for i, s in enumerate(states)]
    checkpoints.append(Checkpoint(len(states), recipe.learning_rate, model.state_dict()))
    predicted = predicted_labels(model, queries)
    scores: dict[str, torch.Tensor] = {}
    figures: dict[str, Any] = {"training_samples": n_train, "checkpoints": len(checkpoints)}
    for name, modules in SUBSETS.items():
        names = _param_names(model, modules)
        config = EmbeddingConfig(
            kind="gas", projection_dim=128, param_names=names, projection_cache_bytes=2 << 30
        )
        embedder = GradientEmbedder(model, checkpoints, config)
        embedder.embed(x[:8], y[:8])  # draws and keeps the projections
        started = time.perf_counter()
        training = embedder.embed(x, y)
        seconds = time.perf_counter() - started
        scores[name] = embedder.embed(queries, predicted) @ training.T
        figures[name] = {
            "parameters": sum(p.numel() for n, p in model.named_parameters()
                              if names is None or n in names),
            "embed_s_per_1000": 1000 * seconds / n_train,
        }  # fmt: skip
    full = scores["all"]
    for name in SUBSETS:
        rho = [spearmanr(full[q], scores[name][q]).statistic for q in range(QUERIES)]
        top_full = full.topk(TOP, dim=1).indices.tolist()
        top_subset = scores[name].topk(TOP, dim=1).indices.tolist()
        overlap = [len(set(a) & set(b)) / TOP for a, b in zip(top_full, top_subset, strict=True)]
        figures[name]["spearman_mean"] = float(np.mean(rho))
        figures[name]["spearman_min"] = float(np.min(rho))
        figures[name]["top10_overlap_mean"] = float(np.mean(overlap))
        figures[name]["speedup_over_all"] = (
            figures["all"]["embed_s_per_1000"] / figures[name]["embed_s_per_1000"]
        )
        print(name, json.dumps(figures[name]), flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    figures = run(args.samples)
    figures["machine"] = f"{platform.processor() or platform.machine()}, torch threads 2"
    figures["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    args.out.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
