"""Estimator benchmark: target identification with influence estimators (DESIGN 4.7, 4.8).

The influence estimators side by side on the development attacks, computed in-process
(not through the server; the served scan is measured by ``benchmarks.scan_bench``).
``python -m benchmarks.estimator_bench`` runs on CPU (float32, 2 torch threads) these cases:

- ``digits_patch_src1``: digits patch backdoor (1.2k training samples, 30 poisons,
  source label 1 -> 0), seed 0;
- ``digits_patch_any``: digits patch backdoor, any source label -> 0, seed 1;
- ``digits_blend_src1``: digits blended-noise backdoor (alpha 0.2), source 1 -> 0, seed 2;
- ``digits_targeted``: targeted poisoning of 10 held-out digits, 10 label-flipped
  near-duplicates each, seed 0;
- ``breast_cancer_targeted``: targeted poisoning of 10 held-out inputs, 10 label-flipped
  near-duplicates each, seed 0.

Each trains a tanh MLP (hidden 32) for 30 epochs with 10 checkpoints. Positives are the
attack's targets that the model actually predicts with the adversarial label; negatives
are 60 clean held-out inputs; 100 further clean inputs calibrate the score threshold
(5% false-positive rate). Figures:

- ``auprc_<estimator>``: target identification as Scan decides it for models this small
  (``ScanSettings.confirmation="auto"`` -> retrain): a lenient first filter on Scan's
  score (below; threshold at a 50% clean pass rate on the calibration inputs), then
  retrain from scratch (same configuration and seed) without the input's top-30
  proponents of the estimator and score the fall of the predicted class's probability
  (-1 when filtered out); worst over cases (gas, lgas, tracincp; the influence-function
  and representer baselines, plain and renormalized, only where a probe on 5 inputs
  takes under 60 s), and ``gas+tracincp``: Scan's ensemble estimator, each input scored
  by the component (estimator and k) whose score is rarest among the clean calibration
  inputs (``targets.calibrated_surprise``). ``auprc_counterfactual_retrain`` is the GAS
  figure;
- ``auprc_zscore_<estimator>`` / ``auprc_zscore_only`` (GAS): the robust z-score target
  score alone at one k (10, DESIGN 4.8);
- ``auprc_zscore_multik_<estimator>``: Scan's score (``ScanSettings.ks``) alone: per
  input the largest calibrated surprise of its z-scores at k in ``MULTI_K`` (2 and 10),
  each against the clean calibration inputs' z-scores at the same k (for
  ``gas+tracincp`` the key is ``auprc_zscore_gas+tracincp``);
- ``auprc_counterfactual_fast[_<estimator>]``: the Newton removal instead of retraining,
  for every input: the shared-Hessian counterfactual (one damped Hessian per model,
  3 Newton iterations; ``defenses.counterfactual``); ``..._filtered``: only for inputs
  whose score passes the strict threshold (5% clean pass rate), -1 for the others;
- ``<case>_auprc_veto<d>_<estimator>`` (per case only): an alternative decision measured
  side by side, not Scan's: Scan's score ranks and the retrain confirmation only vetoes
  (an input passing the lenient filter whose probability falls by at most ``d`` goes to
  the bottom);
- ``poison_recall_at_zero_fp[_<estimator>]``: per turned target, share of its poisons
  whose influence z-score exceeds every clean training sample of the same label; mean
  over targets, worst case (GAS unsuffixed); ``..._spectral_signature`` and
  ``..._activation_clustering``: the target-agnostic baselines (Tran et al. 2018; Chen
  et al. 2018) on penultimate-layer features, share of poisons scoring above every
  clean sample of the poisons' label;
- ``scan_inputs_per_s``: GAS influence over the whole training set plus the target score,
  for 200 inputs, on a training set augmented to 10k digits by seeded pixel shifts, as the
  server computes it once its gradient index is built (the training side embedded once
  per model version, projected as ``IndexService`` does; the build time is
  ``scan_index_build_s``); ``scan_inputs_per_s_cold``: exact GAS with the training-side
  gradients recomputed for the batch.

Writes ``benchmarks/results/estimators.json`` (flat keys; a figure not measured is absent).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.defenses.attacks import (
    BackdoorConfig,
    TargetedConfig,
    backdoor_digits,
    targeted_poisoning,
)
from expunge.defenses.counterfactual import CounterfactualConfig, SharedHessianCounterfactual
from expunge.defenses.embeddings import EmbeddingConfig, GradientEmbedder
from expunge.defenses.gradients import predicted_labels
from expunge.defenses.influence import InfluenceConfig, influence_scores
from expunge.defenses.poison_filters import (
    activation_clustering,
    penultimate_features,
    recall_at_zero_false_positives,
    spectral_signature_scores,
)
from expunge.defenses.targets import (
    average_precision,
    calibrate_threshold,
    calibrated_surprise,
    implicated_samples,
    influence_z_scores,
    target_score,
)
from expunge.defenses.training import TrainConfig, train
from expunge.server.index.service import PROJECTION_DIM

THREADS = 2
WEIGHT_DECAY = 1e-3
N_NEG = 60
N_CALIB = 100
TOP = 30
ENSEMBLE = "gas+tracincp"
VETO_DROPS = (0.0, 0.02, 0.05)
MULTI_K = (2, 10)
RETRAIN_FILTER_FPR = 0.5  # ScanSettings.retrain_filter_false_positive_rate
OPTIONAL_ESTIMATORS = ("rif", "if", "rrepresenter", "representer")
OPTIONAL_LIMIT_S = 60.0
RETRAIN_BUDGET_S = 1200.0  # total wall time allowed for the retraining counterfactual
RESULTS = Path(__file__).resolve().parent / "results" / "estimators.json"


def _backdoor(trigger, source_label, seed):
    """A digits backdoor: 1.2k training samples, 30 poisons, 10 targets."""
    config = BackdoorConfig(
        trigger=trigger,
        n_train=1200,
        n_poison=30,
        n_targets=10,
        n_clean=200,
        source_label=source_label,
        seed=seed,
    )
    return lambda: backdoor_digits(config)


def _targeted(dataset):
    """Targeted poisoning: 10 targets, 10 label-flipped near-duplicates each, seed 0."""
    config = TargetedConfig(
        dataset=dataset, n_targets=10, n_poison_per_target=10, n_clean=N_NEG + N_CALIB, seed=0
    )
    return lambda: targeted_poisoning(config)


def _cases():
    """(name, attacked data set, training seed)."""
    return [
        ("digits_patch_src1", _backdoor("patch", 1, seed=0), 0),
        ("digits_patch_any", _backdoor("patch", None, seed=1), 1),
        ("digits_blend_src1", _backdoor("blend", 1, seed=2), 2),
        ("digits_targeted", _targeted("digits"), 0),
        ("breast_cancer_targeted", _targeted("breast_cancer"), 0),
    ]


def _spec(data) -> ArchitectureSpec:
    return ArchitectureSpec("mlp", tuple(data.train_x.shape[1:]), data.num_classes)


def _probs(model, x):
    with torch.no_grad():
        return torch.softmax(model(x), dim=1)


def _scores(infl, train_y, preds, k=10):
    return np.array(
        [target_score(infl[j], train_y, int(preds[j]), k=k).score for j in range(infl.shape[0])]
    )


def _surprises(zscores, n_eval):
    """k -> (evaluated, calibration) inputs' calibrated surprises of the z-score at k.

    ``zscores``: k -> z-scores of every input; the first ``n_eval`` are evaluated, the
    rest are the clean calibration inputs. Scan's score (``ScanSettings.ks``) is the
    largest over k (and over estimators for an ensemble), as ``ScanService._combine``
    takes it.
    """
    out = {}
    for k, scores in zscores.items():
        calib = scores[n_eval:]
        out[k] = (calibrated_surprise(calib, scores[:n_eval]), calibrated_surprise(calib, calib))
    return out


def _run_case(name, make, seed, deadline):
    out: dict[str, float] = {}
    data = make()
    spec = _spec(data)
    t0 = time.perf_counter()
    res = train(
        build_model(spec, seed=seed),
        data.train_x,
        data.train_y,
        TrainConfig(epochs=30, checkpoints=10, weight_decay=WEIGHT_DECAY, seed=seed),
    )
    train_s = time.perf_counter() - t0
    model, ckpts = res.model, res.checkpoints
    model.eval()
    tpred = predicted_labels(model, data.target_x)
    turned = torch.nonzero(tpred == data.target_adversarial_y).reshape(-1)
    neg_x, calib_x = data.clean_x[:N_NEG], data.clean_x[N_NEG : N_NEG + N_CALIB]
    eval_x = torch.cat([data.target_x[turned], neg_x])
    labels = np.r_[np.ones(len(turned)), np.zeros(len(neg_x))]
    all_x = torch.cat([eval_x, calib_x])
    preds = predicted_labels(model, all_x)
    n_eval = eval_x.shape[0]
    out.update(
        {
            f"{name}_train_samples": int(data.train_x.shape[0]),
            f"{name}_turned_targets": len(turned),
            f"{name}_targets": int(data.target_x.shape[0]),
            f"{name}_negatives": len(neg_x),
            f"{name}_train_s": round(train_s, 2),
        }
    )
    print(
        f"[{name}] trained in {train_s:.1f}s; turned {len(turned)}/{data.target_x.shape[0]}"
        f" targets; {len(neg_x)} negatives",
        flush=True,
    )
    if len(turned) == 0:
        return out
    out[f"{name}_chance_auprc"] = float(labels.mean())
    icfg = InfluenceConfig(weight_decay=WEIGHT_DECAY)
    gas_infl = None
    target_influence: dict[str, torch.Tensor] = {}
    eval_influence: dict[str, torch.Tensor] = {}
    # Scan's score per method: evaluated and calibration inputs; and per (method, k).
    scan_scores: dict[str, np.ndarray] = {}
    scan_calib: dict[str, np.ndarray] = {}
    components: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for method in ("gas", "lgas", "tracincp", *OPTIONAL_ESTIMATORS):
        x_in = all_x
        if method in OPTIONAL_ESTIMATORS:
            # Probe on 5 inputs; skip when the full set would take >= the limit.
            t1 = time.perf_counter()
            try:
                influence_scores(model, ckpts, data.train_x, data.train_y, x_in[:5], method, icfg)
            except Exception as exc:
                print(f"[{name}] {method}: failed ({type(exc).__name__}: {exc})", flush=True)
                continue
            # Most of an influence function's cost is the inverse Hessian, paid once
            # whatever the number of inputs: the probe's time bounds the whole run's.
            probe = time.perf_counter() - t1
            if probe >= OPTIONAL_LIMIT_S:
                print(
                    f"[{name}] {method}: 5 inputs took {probe:.0f}s >= "
                    f"{OPTIONAL_LIMIT_S}s, not reported",
                    flush=True,
                )
                continue
        t1 = time.perf_counter()
        try:
            infl = influence_scores(model, ckpts, data.train_x, data.train_y, x_in, method, icfg)
        except Exception as exc:
            print(f"[{name}] {method}: failed ({type(exc).__name__}: {exc})", flush=True)
            continue
        secs = time.perf_counter() - t1
        target_influence[method] = infl[: len(turned)]
        eval_influence[method] = infl[:n_eval]
        # Every input's z-score at each k, once: k = 10 alone is DESIGN 4.8's score.
        zscores = {k: _scores(infl, data.train_y, preds, k=k) for k in MULTI_K}
        sc = zscores[10][:n_eval]
        out[f"{name}_auprc_zscore_{method}"] = average_precision(labels, sc)
        out[f"{name}_{method}_influence_s"] = round(secs, 2)
        print(
            f"[{name}] {method}: z-score AUPRC {out[f'{name}_auprc_zscore_{method}']:.3f}"
            f" ({secs:.1f}s)",
            flush=True,
        )
        # Scan's score: the attack set's size is unknown (3 poisons per source class in
        # the any-source backdoor, 10 per target in targeted poisoning), so several k,
        # each calibrated on the clean inputs, the rarest kept.
        components[method] = _surprises(zscores, n_eval)
        scan_scores[method] = np.max([e for e, _ in components[method].values()], axis=0)
        scan_calib[method] = np.max([c for _, c in components[method].values()], axis=0)
        out[f"{name}_auprc_zscore_multik_{method}"] = average_precision(labels, scan_scores[method])
        print(
            f"[{name}] {method}: Scan's score (k in {MULTI_K}) AUPRC "
            f"{out[f'{name}_auprc_zscore_multik_{method}']:.3f}",
            flush=True,
        )
        if method == "gas":
            gas_infl, gas_scores = infl, scan_scores[method]
            calib_scores = scan_calib[method]

    if gas_infl is None:
        return out
    if "gas" in components and "tracincp" in components:
        # The union of the two detectors, as Scan's "gas+tracincp" estimator: each input
        # takes the component (estimator, k) whose score is rarer among the clean inputs.
        parts = [(e, k) for e in ("gas", "tracincp") for k in MULTI_K]
        eval_surprise = np.stack([components[e][k][0] for e, k in parts])
        best = eval_surprise.argmax(axis=0)
        scan_scores[ENSEMBLE] = eval_surprise.max(axis=0)
        scan_calib[ENSEMBLE] = np.stack([components[e][k][1] for e, k in parts]).max(axis=0)
        eval_influence[ENSEMBLE] = torch.stack(
            [eval_influence[parts[b][0]][j] for j, b in enumerate(best.tolist())]
        )
        out[f"{name}_auprc_zscore_{ENSEMBLE}"] = average_precision(labels, scan_scores[ENSEMBLE])
        print(
            f"[{name}] {ENSEMBLE}: Scan's score AUPRC {out[f'{name}_auprc_zscore_{ENSEMBLE}']:.3f}",
            flush=True,
        )
    # ---- poison recall at zero clean false positives: influence on each turned target
    # A backdoor's one trigger serves every target: all its poisons count for each.
    backdoor = data.name.startswith("backdoor_")
    for method, influence in target_influence.items():
        recalls = []
        for t_pos, t_idx in enumerate(turned.tolist()):
            y = int(preds[t_pos])
            z = influence_z_scores(influence[t_pos], data.train_y, y)
            pool = data.train_y == y
            mine = (
                data.poison_mask if backdoor else data.poison_mask & (data.poison_target == t_idx)
            )
            if mine.sum() == 0:
                continue
            # Clean = same label, not a poison of any target (as before the baselines).
            candidates = (pool & ~data.poison_mask) | mine
            recalls.append(recall_at_zero_false_positives(z, mine, candidates))
        if recalls:
            key = "" if method == "gas" else f"_{method}"
            out[f"{name}_poison_recall_at_zero_fp{key}"] = float(np.mean(recalls))
    # ---- the target-agnostic baselines on penultimate-layer features (DESIGN 4.8)
    features = penultimate_features(model, data.train_x)
    baselines = {
        "spectral_signature": spectral_signature_scores(features, data.train_y),
        "activation_clustering": activation_clustering(features, data.train_y, seed=seed).scores,
    }
    poison_labels = torch.unique(data.train_y[data.poison_mask]).tolist()
    for baseline, scores in baselines.items():
        recalls = [
            recall_at_zero_false_positives(scores, data.poison_mask, data.train_y == label)
            for label in poison_labels
        ]
        out[f"{name}_poison_recall_at_zero_fp_{baseline}"] = float(np.mean(recalls))
    print(
        f"[{name}] poison recall at zero FP: "
        + ", ".join(
            f"{k.removeprefix(name + '_poison_recall_at_zero_fp').lstrip('_') or 'gas'} {v:.3f}"
            for k, v in out.items()
            if k.startswith(f"{name}_poison_recall_at_zero_fp")
        ),
        flush=True,
    )

    # ---- Scan's decision: the fast counterfactual (shared Hessian, 3 Newton iterations)
    # on every input, with each estimator's top proponents; and behind the strict filter on
    # Scan's score (5% of the clean calibration inputs pass).
    threshold = calibrate_threshold(calib_scores, 0.05)
    t1 = time.perf_counter()
    solver = SharedHessianCounterfactual(
        model, data.train_x, data.train_y, WEIGHT_DECAY, CounterfactualConfig(iterations=3)
    )
    out[f"{name}_counterfactual_hessian_s"] = round(time.perf_counter() - t1, 2)
    tops: dict[int, torch.Tensor] = {}
    for method, influence in eval_influence.items():
        t1 = time.perf_counter()
        drops = np.zeros(n_eval)
        for j in range(n_eval):
            y = int(preds[j])
            top = implicated_samples(
                influence[j], data.train_y, y, cutoff=-float("inf"), limit=TOP
            ).indices
            if method == "gas":
                tops[j] = top
            drops[j] = solver.probability_drop(eval_x[j], top)
        per_input_ms = 1000 * (time.perf_counter() - t1) / n_eval
        out[f"{name}_auprc_counterfactual_fast_{method}"] = average_precision(labels, drops)
        out[f"{name}_counterfactual_fast_{method}_ms_per_input"] = round(per_input_ms, 1)
        if method == "gas":
            out[f"{name}_auprc_counterfactual_fast"] = out[f"{name}_auprc_counterfactual_fast_gas"]
            filtered = np.where(gas_scores >= threshold, drops, -1.0)
            out[f"{name}_auprc_counterfactual_fast_filtered"] = average_precision(labels, filtered)
        print(
            f"[{name}] {method}: shared-Hessian counterfactual AUPRC "
            f"{out[f'{name}_auprc_counterfactual_fast_{method}']:.3f}, {per_input_ms:.0f} ms/input",
            flush=True,
        )
    out[f"{name}_scan_score_threshold"] = float(threshold)
    out[f"{name}_passed_filter_pos"] = int((gas_scores[labels == 1] >= threshold).sum())
    out[f"{name}_passed_filter_neg"] = int((gas_scores[labels == 0] >= threshold).sum())

    # ---- Scan's decision (confirmation "auto" -> retrain for models this small): a lenient
    # first filter (half the clean calibration inputs pass), then retrain from scratch with
    # the model's own configuration and seed without the input's top-30 proponents; the
    # score is the fall of the predicted class's probability (-1 when filtered out).
    probs = _probs(model, eval_x)
    retrain_config = TrainConfig(epochs=30, checkpoints=1, weight_decay=WEIGHT_DECAY, seed=seed)
    retrained: dict[tuple[int, ...], torch.nn.Module] = {}
    for method, influence in eval_influence.items():
        if time.perf_counter() > deadline:
            print(f"[{name}] {method}: retrained decision skipped (out of time)", flush=True)
            continue
        lenient = calibrate_threshold(scan_calib[method], RETRAIN_FILTER_FPR)
        passed = scan_scores[method] >= lenient
        decision = np.full(n_eval, -1.0)
        t1 = time.perf_counter()
        for j in np.nonzero(passed)[0]:
            y = int(preds[j])
            top = implicated_samples(
                influence[j], data.train_y, y, cutoff=-float("inf"), limit=TOP
            ).indices
            key = tuple(sorted(top.tolist()))
            if key not in retrained:
                keep = torch.ones(data.train_x.shape[0], dtype=torch.bool)
                keep[top] = False
                m = build_model(spec, seed=seed)
                train(m, data.train_x[keep], data.train_y[keep], retrain_config)
                retrained[key] = m.eval()
            decision[j] = float(probs[j, y] - _probs(retrained[key], eval_x[j : j + 1])[0, y])
        out[f"{name}_auprc_{method}"] = average_precision(labels, decision)
        # Confirmation as a veto: Scan's score ranks; an input whose prediction does not
        # fall by more than ``veto`` without its proponents goes to the bottom.
        bottom = float(scan_scores[method].min()) - 1.0
        for veto in VETO_DROPS:
            vetoed = passed & (decision <= veto)
            ranked = np.where(vetoed, bottom, scan_scores[method])
            out[f"{name}_auprc_veto{veto:g}_{method}"] = average_precision(labels, ranked)
        print(
            f"[{name}] {method}: Scan's score with retrain veto AUPRC "
            + ", ".join(
                f"veto {v:g}: {out[f'{name}_auprc_veto{v:g}_{method}']:.3f}" for v in VETO_DROPS
            ),
            flush=True,
        )
        out[f"{name}_decision_{method}_passed_pos"] = int(passed[labels == 1].sum())
        out[f"{name}_decision_{method}_passed_neg"] = int(passed[labels == 0].sum())
        if method == "gas":
            out[f"{name}_auprc_counterfactual_retrain"] = out[f"{name}_auprc_gas"]
        print(
            f"[{name}] {method}: Scan decision (lenient filter + retrain) AUPRC "
            f"{out[f'{name}_auprc_{method}']:.3f}; passed {int(passed.sum())}/{n_eval}"
            f" ({time.perf_counter() - t1:.1f}s)",
            flush=True,
        )
    return out


def _augmented_digits(n_target: int = 10_000):
    data = backdoor_digits(BackdoorConfig(trigger="patch", source_label=1, seed=0))
    x, y = data.train_x, data.train_y
    g = torch.Generator().manual_seed(0)
    xs, ys = [x], [y]
    total = x.shape[0]
    while total < n_target:
        dy, dx = (torch.randint(-1, 2, (2,), generator=g)).tolist()
        shifted = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
        if dy == 1:
            shifted[..., 0, :] = 0
        if dy == -1:
            shifted[..., -1, :] = 0
        if dx == 1:
            shifted[..., :, 0] = 0
        if dx == -1:
            shifted[..., :, -1] = 0
        take = min(x.shape[0], n_target - total)
        xs.append(shifted[:take])
        ys.append(y[:take])
        total += take
    return torch.cat(xs), torch.cat(ys), data


def _throughput():
    x, y, data = _augmented_digits()
    spec = ArchitectureSpec("mlp", tuple(x.shape[1:]), 10)
    t0 = time.perf_counter()
    res = train(
        build_model(spec, seed=0),
        x,
        y,
        TrainConfig(epochs=5, checkpoints=10, weight_decay=WEIGHT_DECAY, seed=0),
    )
    train_s = time.perf_counter() - t0
    model = res.model.eval()
    inputs = data.clean_x[:200]
    t1 = time.perf_counter()
    preds = predicted_labels(model, inputs)
    infl = influence_scores(
        model, res.checkpoints, x, y, inputs, "gas", InfluenceConfig(weight_decay=WEIGHT_DECAY)
    )
    _scores(infl, y, preds)
    secs = time.perf_counter() - t1
    print(
        f"[throughput] cold: {inputs.shape[0]} inputs vs {x.shape[0]} training samples, "
        f"10 checkpoints: {secs:.2f}s (model trained 5 epochs in {train_s:.1f}s)",
        flush=True,
    )
    # Served: the training side is embedded once per model version by the gradient
    # index (projected GAS, as IndexService builds it); a scan embeds its inputs only.
    embedder = GradientEmbedder(
        model, res.checkpoints, EmbeddingConfig(kind="gas", projection_dim=PROJECTION_DIM, seed=0)
    )
    t2 = time.perf_counter()
    training_embeddings = embedder.embed(x, y)
    index_s = time.perf_counter() - t2
    t3 = time.perf_counter()
    preds = predicted_labels(model, inputs)
    served = embedder.embed(inputs, preds) @ training_embeddings.T
    _scores(served, y, preds)
    served_s = time.perf_counter() - t3
    print(
        f"[throughput] served (embeddings from the index, built once in {index_s:.1f}s): "
        f"{inputs.shape[0]} inputs in {served_s:.2f}s",
        flush=True,
    )
    return {
        "scan_inputs_per_s": inputs.shape[0] / served_s,
        "scan_inputs_per_s_cold": inputs.shape[0] / secs,
        "scan_index_build_s": round(index_s, 2),
        "scan_train_samples": int(x.shape[0]),
        "scan_inputs": int(inputs.shape[0]),
        "scan_checkpoints": len(res.checkpoints),
    }


def main() -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    start = time.perf_counter()
    results: dict[str, object] = {}
    cases = _cases()
    for _i, (name, make, seed) in enumerate(cases):
        # Share the retraining budget: each case may spend up to its slice.
        deadline = time.perf_counter() + 60 + RETRAIN_BUDGET_S / len(cases)
        results.update(_run_case(name, make, seed, deadline))
    results.update(_throughput())
    names = [c[0] for c in cases]

    def worst(suffix):
        vals = [results[f"{n}_{suffix}"] for n in names if f"{n}_{suffix}" in results]
        return min(vals) if len(vals) == len(names) else None

    flat = {}
    for est in ("gas", "lgas", "tracincp", ENSEMBLE, *OPTIONAL_ESTIMATORS):
        v = worst(f"auprc_{est}")
        if v is not None:
            flat[f"auprc_{est}"] = v
    for est in ("gas", "lgas", "tracincp", ENSEMBLE, *OPTIONAL_ESTIMATORS):
        v = worst(f"auprc_zscore_{est}")
        if v is not None:
            flat[f"auprc_zscore_{est}"] = v
    for est in ("gas", "lgas", "tracincp"):
        v = worst(f"auprc_zscore_multik_{est}")
        if v is not None:
            flat[f"auprc_zscore_multik_{est}"] = v
    if "auprc_zscore_gas" in flat:
        flat["auprc_zscore_only"] = flat["auprc_zscore_gas"]
    recall_keys = ["poison_recall_at_zero_fp"] + [
        f"poison_recall_at_zero_fp_{m}"
        for m in (
            "lgas",
            "tracincp",
            *OPTIONAL_ESTIMATORS,
            "spectral_signature",
            "activation_clustering",
        )
    ]
    for key in (
        "auprc_counterfactual_fast",
        "auprc_counterfactual_fast_filtered",
        "auprc_counterfactual_retrain",
        *recall_keys,
    ):
        v = worst(key)
        if v is not None:
            flat[key] = v
    chances = [results[f"{n}_chance_auprc"] for n in names if f"{n}_chance_auprc" in results]
    if chances:
        flat["chance_auprc"] = float(np.mean(chances))
        flat["chance_auprc_max"] = float(np.max(chances))
    flat["scan_inputs_per_s"] = results.pop("scan_inputs_per_s")
    flat.update(results)
    flat = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in flat.items()}
    flat["worst_case_over"] = ",".join(names)
    flat["device"] = (
        f"cpu ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores visible, torch threads {THREADS})"
    )
    flat["command"] = "python -m benchmarks.estimator_bench"
    flat["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    flat["wall_s"] = round(time.perf_counter() - start, 1)

    cols = [
        "chance_auprc",
        "auprc_gas",
        "auprc_lgas",
        "auprc_tracincp",
        f"auprc_{ENSEMBLE}",
        "auprc_zscore_gas",
        "auprc_zscore_tracincp",
        f"auprc_zscore_{ENSEMBLE}",
        "auprc_zscore_multik_gas",
        "auprc_zscore_multik_lgas",
        "auprc_zscore_multik_tracincp",
        "auprc_rif",
        "auprc_if",
        "auprc_rrepresenter",
        "auprc_representer",
        "auprc_counterfactual_fast",
        "auprc_counterfactual_retrain",
        "auprc_counterfactual_fast_filtered",
        *recall_keys,
    ]
    print()
    print(f"{'metric':32s}" + "".join(f"{n:>24s}" for n in names) + f"{'headline':>12s}")
    for c in cols:
        row = f"{c:32s}"
        for n in names:
            v = flat.get(f"{n}_{c}")
            row += f"{v:>24.3f}" if isinstance(v, (int, float)) else f"{'-':>24s}"
        h = flat.get(c)
        row += f"{h:>12.3f}" if isinstance(h, (int, float)) else f"{'-':>12s}"
        print(row)
    print(
        f"{'turned/targets':32s}"
        + "".join(
            f"{str(flat.get(f'{n}_turned_targets')) + '/' + str(flat.get(f'{n}_targets')):>24s}"
            for n in names
        )
    )
    print(
        f"scan_inputs_per_s: {flat['scan_inputs_per_s']:.1f} "
        f"({flat['scan_inputs']} inputs vs {flat['scan_train_samples']} training samples)"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(flat, indent=2) + "\n")
    print(f"wrote {RESULTS} ({flat['wall_s']}s)")


if __name__ == "__main__":
    sys.exit(main())
