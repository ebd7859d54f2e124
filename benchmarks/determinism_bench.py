"""What deterministic mode costs on the forget and scan paths, and whether it repeats.

``python -m benchmarks.determinism_bench [--repeats 5]`` trains the demo digits MLP
(10 checkpoints), then in one process, alternating the two modes to share any drift of
the machine: the server's forget computation (``server.unlearning.unlearn`` with its
default options, forgetting one owner) and GAS influence of 100 test inputs over the
training set (the scan scoring path), each ``--repeats`` times with
``torch.use_deterministic_algorithms(True)`` (the server's setting) and with the default.
Reports the median times, the cost of deterministic mode as a fraction, and whether the
repeated forgets in deterministic mode gave byte-identical weights (SHA-256).
On CPU, PyTorch's deterministic mode changes few kernels; the figure that matters is on
CUDA (scatter/index kernels, cuDNN), where this task had no device.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.defenses.influence import InfluenceConfig, influence_scores
from expunge.defenses.recipe import ForgetRecipe
from expunge.defenses.training import TrainConfig, train
from expunge.server.forget.computation import unlearn
from expunge.server.state.datasets import builtin, train_test_split

WEIGHT_DECAY = 1e-3


@dataclass(frozen=True)
class DeterminismCost:
    forget_s_deterministic: float
    forget_s_default: float
    forget_cost_frac: float
    scan_s_deterministic: float
    scan_s_default: float
    scan_cost_frac: float
    repeated_forget_hashes_identical: bool
    repeats: int
    device: str


def _weights_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def measure(repeats: int = 5, threads: int = 1) -> DeterminismCost:
    torch.set_num_threads(threads)
    train_set, test_set = train_test_split(builtin("digits", seed=0), 0.2, seed=0)
    x, y = torch.from_numpy(train_set.features), torch.from_numpy(train_set.labels)
    tx, ty = torch.from_numpy(test_set.features), torch.from_numpy(test_set.labels)
    spec = ArchitectureSpec("mlp", train_set.input_shape, 10)
    config = TrainConfig(epochs=10, checkpoints=10, weight_decay=WEIGHT_DECAY, seed=0)
    trained = train(build_model(spec, seed=0), x, y, config)
    model, checkpoints = trained.model.eval(), trained.checkpoints
    owners, counts = np.unique(train_set.owner_ids, return_counts=True)
    forget = torch.from_numpy(train_set.owner_ids == owners[np.argmax(counts)])

    def forget_once() -> str:
        scratch = copy.deepcopy(model)
        unlearn(
            model=scratch,
            spec=spec,
            forget_x=x[forget],
            forget_y=y[forget],
            retained_x=x[~forget],
            retained_y=y[~forget],
            test_x=tx,
            test_y=ty,
            weight_decay=WEIGHT_DECAY,
            recipe=ForgetRecipe(seed=1234),
            ledger={},
            default_budget=1.0,
        )
        return _weights_sha256(scratch)

    def scan_once() -> None:
        influence_scores(
            model, checkpoints, x, y, tx[:100], "gas", InfluenceConfig(weight_decay=WEIGHT_DECAY)
        )

    times: dict[tuple[str, bool], list[float]] = {}
    hashes: list[str] = []
    for _ in range(repeats):
        for deterministic in (True, False):
            torch.use_deterministic_algorithms(deterministic)
            for name, job in (("forget", forget_once), ("scan", scan_once)):
                started = time.perf_counter()
                out = job()
                times.setdefault((name, deterministic), []).append(time.perf_counter() - started)
                if name == "forget" and deterministic:
                    hashes.append(str(out))
    torch.use_deterministic_algorithms(True)
    med = {key: statistics.median(values) for key, values in times.items()}
    return DeterminismCost(
        forget_s_deterministic=round(med[("forget", True)], 4),
        forget_s_default=round(med[("forget", False)], 4),
        forget_cost_frac=round(med[("forget", True)] / med[("forget", False)] - 1, 4),
        scan_s_deterministic=round(med[("scan", True)], 4),
        scan_s_default=round(med[("scan", False)], 4),
        scan_cost_frac=round(med[("scan", True)] / med[("scan", False)] - 1, 4),
        repeated_forget_hashes_identical=len(set(hashes)) == 1,
        repeats=repeats,
        device=f"cpu, torch {torch.__version__}, {threads} thread(s)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(asdict(measure(args.repeats)), indent=2))


if __name__ == "__main__":
    main()
