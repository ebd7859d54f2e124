"""Does checkpoint 0 (the random initialisation) help GAS find attack targets?

``python -m benchmarks.checkpoint0_bench`` on the scan's development attacks only (the
digits patch backdoor from one source class and from any class, label-flipped
near-duplicates on digits and on breast cancer): each model is trained with the served
``TrainConfig`` (30 epochs, 10 checkpoints, the first at initialisation with the
largest learning rate), and GAS is computed over every checkpoint and over all but the
first. Figure per case: the AUPRC of the robust target score (k = 2 and 10, the larger
calibrated surprise, as Scan scores) of the turned targets against 100 clean inputs,
calibrated on 100 other clean inputs; and checkpoint 0's share of the GAS weight
(learning rate x mean squared cosine contribution is not separable, so the share of
the learning-rate weight is reported). Writes ``benchmarks/results/checkpoint0.json``.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.defenses.attacks import (
    AttackedDataset,
    BackdoorConfig,
    TargetedConfig,
    backdoor_digits,
    targeted_poisoning,
)
from expunge.defenses.gradients import predicted_labels
from expunge.defenses.influence import InfluenceConfig, influence_scores
from expunge.defenses.targets import average_precision, calibrated_surprise, target_score
from expunge.defenses.training import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint0.json"


def _cases() -> list[tuple[str, AttackedDataset]]:
    return [
        ("digits_patch_src1", backdoor_digits(BackdoorConfig(source_label=1, seed=0))),
        ("digits_patch_any", backdoor_digits(BackdoorConfig(seed=1))),
        ("digits_targeted", targeted_poisoning(TargetedConfig("digits", n_targets=10))),
        (
            "cancer_targeted",
            targeted_poisoning(TargetedConfig("breast_cancer", n_targets=10, n_clean=170)),
        ),
    ]


def _scores(
    model: torch.nn.Module, checkpoints: list[Any], attack: AttackedDataset, x: torch.Tensor
) -> np.ndarray:
    config = InfluenceConfig(weight_decay=TrainConfig().weight_decay)
    infl = influence_scores(model, checkpoints, attack.train_x, attack.train_y, x, "gas", config)
    labels = predicted_labels(model, x)
    out = []
    for k in (2, 10):
        out.append(
            [
                target_score(infl[i].double(), attack.train_y, int(labels[i]), k=k).score
                for i in range(len(x))
            ]
        )
    return np.array(out)


def main() -> int:
    torch.set_num_threads(2)
    rows = []
    for name, attack in _cases():
        spec = ArchitectureSpec("mlp", tuple(attack.train_x.shape[1:]), attack.num_classes)
        model = build_model(spec, seed=0)
        result = train(model, attack.train_x, attack.train_y, TrainConfig(epochs=30))
        model.eval()
        turned = predicted_labels(model, attack.target_x) == attack.target_adversarial_y
        calibration = attack.clean_x[:100]
        clean = attack.clean_x[100:200]
        x = torch.cat([attack.target_x[turned], clean, calibration])
        positives = int(turned.sum())
        labels = np.r_[np.ones(positives), np.zeros(len(clean))]
        lrs = np.array([c.learning_rate for c in result.checkpoints])
        row: dict[str, Any] = {
            "case": name,
            "targets_turned": positives,
            "checkpoint0_lr_share": float(lrs[0] / lrs.sum()),
        }
        for key, checkpoints in (("all", result.checkpoints), ("without0", result.checkpoints[1:])):
            scores = _scores(model, checkpoints, attack, x)
            evaluated, reference = (
                scores[:, : positives + len(clean)],
                scores[:, positives + len(clean) :],
            )
            surprise = np.max(
                [calibrated_surprise(reference[j], evaluated[j]) for j in range(2)], axis=0
            )
            row[f"auprc_{key}"] = average_precision(labels, surprise) if positives else float("nan")
        print(row, flush=True)
        rows.append(row)
    summary = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.checkpoint0_bench",
        "device": f"cpu: {platform.machine()}, torch threads {torch.get_num_threads()}",
        "auprc_all_min": min(r["auprc_all"] for r in rows),
        "auprc_without0_min": min(r["auprc_without0"] for r in rows),
        "cases": rows,
    }
    RESULTS.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "cases"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
