"""The auto forget policy, the certificate's units and premises, batch norm, the compute process.

The policy is checked as a rule (``choose_path``) and end to end: the default Forget on
the digits model (training takes about a second) is the exact retrain, whose weights must
equal a retrain from scratch on the retained data. The certificate and batch-norm checks
run the server's forget computation (``unlearn``) on real models.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.preprocessing import StandardScaler

from expunge.client import Client
from expunge.client.errors import NotFoundError
from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.defenses.batchnorm import recompute_batchnorm_statistics
from expunge.defenses.certificate import noise_constant
from expunge.defenses.training import TrainConfig, train
from expunge.server.forget.computation import UnlearningOptions, recipe_for, unlearn
from expunge.server.forget.policy import CostEstimates, PolicySettings, TrainingCost, choose_path
from expunge.server.main import start
from expunge.server.settings import Settings
from expunge.server.state.store import Store

WD = 1e-3


def _estimates(retrain: float, newton_all: float, targeted: float, hessian: int) -> CostEstimates:
    return CostEstimates(retrain, newton_all, targeted, hessian, 1e-6)


def test_auto_prefers_the_exact_retrain_then_newton_all_then_the_targeted_update() -> None:
    settings = PolicySettings(
        retrain_below_s=30, hessian_memory_bytes=1000, approximate_time_share=0.1
    )
    cheap = choose_path("auto", _estimates(5.0, 0.1, 0.1, 10), settings)
    assert cheap.path == "retrain" and "within the 30 s" in cheap.reason
    fits = choose_path("auto", _estimates(100.0, 2.0, 1.0, 10), settings)
    assert fits.path == "all" and "fits" in fits.reason
    too_big = choose_path("auto", _estimates(100.0, 2.0, 1.0, 10_000), settings)
    assert too_big.path == "lcodec_cg" and "does not fit" in too_big.reason
    too_slow = choose_path("auto", _estimates(100.0, 50.0, 1.0, 10), settings)
    assert too_slow.path == "lcodec_cg" and "too slow" in too_slow.reason
    # The retrain also wins when the approximate update would cost more than it.
    dear = choose_path("auto", _estimates(100.0, 500.0, 200.0, 10), settings)
    assert dear.path == "retrain" and "no more than" in dear.reason
    explicit = choose_path("lcodec", _estimates(5.0, 0.1, 0.1, 10), settings)
    assert explicit.path == "lcodec" and explicit.requested == "lcodec"
    receipt = fits.receipt()
    assert receipt["estimated_retrain_s"] == 100.0 and receipt["estimated_newton_all_s"] == 2.0


def test_a_gauss_newton_hessian_of_few_samples_is_priced_in_the_sample_space() -> None:
    from expunge.defenses.recipe import ForgetRecipe
    from expunge.server.forget.policy import estimate_costs

    model = build_model(ArchitectureSpec("mlp", (64,), 10, hidden=(256,)), seed=0)
    p = sum(q.numel() for q in model.parameters())  # 19,210
    few = ForgetRecipe(selection="all", hessian="gauss_newton", hessian_samples=64)
    rows = 64 * 10
    sample_space = estimate_costs(model, few, 10_000, 12_000, 1e-6, 100.0)
    assert sample_space.hessian_bytes == 16 * rows * p + 3 * rows * rows * 8  # about 0.2 GB
    exact = estimate_costs(
        model, ForgetRecipe(selection="all", hessian_samples=64), 10_000, 12_000, 1e-6, 100.0
    )
    assert exact.hessian_bytes == 3 * p * p * 4  # the p x p matrix: 4.4 GB
    # So Newton on every parameter fits the default 1 GiB budget only in the sample space.
    assert sample_space.hessian_bytes <= PolicySettings().hessian_memory_bytes < exact.hessian_bytes
    assert sample_space.newton_all_s < exact.newton_all_s


def test_the_retrain_estimate_counts_the_passes_the_path_makes_besides_training() -> None:
    # Training's record (or an imported model's timed SGD steps) holds none of the retrain
    # path's gradient norms and metric passes; the Newton paths' estimates do hold theirs.
    from expunge.defenses.recipe import ForgetRecipe
    from expunge.server.forget.policy import RETRAIN_OVERHEAD_S, estimate_costs

    model = build_model(ArchitectureSpec("mlp", (64,), 10, hidden=(32,)), seed=0)
    unit = 1e-4
    whole = estimate_costs(model, ForgetRecipe(), 5_000, 6_200, unit, 40.0)
    passes = (5_000 + 5_000 + 2 * 6_200) * unit  # norm before, residual after, two metrics
    assert whole.retrain_s == pytest.approx(40.0 + passes + RETRAIN_OVERHEAD_S)
    subsampled = estimate_costs(
        model, ForgetRecipe(objective_samples=512), 5_000, 6_200, unit, 40.0
    )
    assert subsampled.retrain_s == pytest.approx(
        40.0 + (512 + 5_000 + 2 * 6_200) * unit + RETRAIN_OVERHEAD_S
    )


def test_the_default_forget_is_an_exact_retrain_when_it_is_cheap(state_dir: Path) -> None:
    running = start(Settings(state_dir=state_dir, port=0, build_index=False))
    try:
        data = running.engine.training_data("digits")
        owner = str(data.owner_ids[0])
        old_checkpoints = running.engine.model_row("digits").checkpoints_blob
        with Client(running.target, timeout=120) as client:
            op = client.forget("digits", owner_ids=[owner], wait=True)
            assert op.state == "SUCCEEDED" and op.receipt is not None
            receipt = op.receipt
            weights = client.export_model("digits")
        row = running.engine.model_row("digits")
        retained = running.engine.training_data("digits")
    finally:
        running.stop(grace=1.0)
    policy = receipt.policy
    assert (policy.requested, policy.path) == ("auto", "retrain")
    assert 0 < policy.estimated_retrain_s < 30 and "within the 30 s" in policy.reason
    assert policy.estimated_newton_all_s > 0 and policy.estimated_targeted_s > 0
    assert receipt.method.selection == "retrain"
    assert receipt.certificate.statement.startswith("Exact retrain")
    assert receipt.certificate.budget_used == 0.0
    assert receipt.retained_gradient_norm_before > 0
    # The checkpoints the scan reads are the retrain's, never the forgotten samples'.
    assert row.checkpoints_blob != old_checkpoints
    # Ground truth: training from scratch on what is left, with the model's own settings.
    spec = ArchitectureSpec.from_dict(row.spec)
    config = TrainConfig.from_dict(row.train_config)
    assert str(owner) not in {str(o) for o in retained.owner_ids}
    expected = build_model(spec, seed=config.seed)
    train(expected, retained.features, retained.labels, config)
    from expunge.server.state import weights as weights_io

    assert weights == weights_io.model_to_bytes(expected)


def test_an_exact_retrain_is_never_taken_for_an_accuracy_collapse(state_dir: Path) -> None:
    # Forgetting every class-0 sample costs the retrained model the class (about 10 points):
    # the truth, served as is, not held or retrained again like a collapsing update.
    running = start(Settings(state_dir=state_dir, port=0, build_index=False))
    try:
        data = running.engine.training_data("digits")
        zeros = sorted(int(i) for i in data.sample_ids[data.labels.numpy() == 0])
        with Client(running.target, timeout=120) as client:
            op = client.forget("digits", sample_ids=zeros, wait=True)
            assert op.state == "SUCCEEDED" and op.receipt is not None
            assert op.receipt.policy.path == "retrain"
            assert op.receipt.before.test_accuracy - op.receipt.after.test_accuracy > 0.05
            assert op.receipt.accuracy_collapse is None
            assert client.get_model("digits").current_version == 2
            # No retrain was journalled behind it (the collapse policy's would be "<id>:retrain").
            with pytest.raises(NotFoundError):
                client.get_operation(f"{op.name}:retrain")
    finally:
        running.stop(grace=1.0)


def test_the_compute_process_starts_with_the_server(state_dir: Path) -> None:
    running = start(Settings(state_dir=state_dir, port=0, build_index=False))
    try:
        compute = running.forget.compute
        assert compute is not None
        child = compute._child
        assert child is not None and child[0].is_alive()  # before any forget was sent
        assert compute.wait_ready(120)
    finally:
        running.stop(grace=1.0)


# --------------------------------------------------------------------------- computation


def _cancer() -> tuple[torch.Tensor, torch.Tensor]:
    raw = load_breast_cancer()
    x = torch.tensor(StandardScaler().fit_transform(raw.data), dtype=torch.float32)
    return x, torch.tensor(raw.target)


def _run(
    model: torch.nn.Module,
    spec: ArchitectureSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    options: UnlearningOptions,
    config: TrainConfig,
    **recipe: Any,
) -> dict[str, Any]:
    forget, keep = slice(0, 12), slice(12, None)
    for p in model.parameters():
        p.requires_grad_(True)
    outcome = unlearn(
        model=model,
        spec=spec,
        forget_x=x[forget],
        forget_y=y[forget],
        retained_x=x[keep],
        retained_y=y[keep],
        test_x=x[:40],
        test_y=y[:40],
        weight_decay=config.weight_decay,
        recipe=recipe_for(options, seed=3, **recipe),
        ledger={},
        default_budget=1.0,
        train_config=config.to_dict(),
        training_cost=TrainingCost(1.0, len(x)),
    )
    return outcome.receipt


def test_the_ledger_spends_what_the_noise_is_calibrated_to_and_proof_needs_its_premises() -> None:
    x, y = _cancer()
    spec = ArchitectureSpec("logreg", (x.shape[1],), 2)
    config = TrainConfig(epochs=5, weight_decay=WD)
    model = build_model(spec, seed=0)
    train(model, x, y, config)
    # A budget below the model's 62 entries: a true selection (unbudgeted, a model this small
    # is updated whole).
    options = UnlearningOptions(selection="lcodec_cg", parameter_budget=20, epsilon=0.5, delta=1e-5)
    receipt = _run(copy.deepcopy(model), spec, x, y, options, config)
    # The budget is a floor (the selection grows with the step): still a true selection.
    assert 20 <= receipt["parameters_updated"] < receipt["parameters_total"]
    whole = _run(copy.deepcopy(model), spec, x, y, UnlearningOptions(selection="lcodec_cg"), config)
    assert whole["parameters_updated"] == whole["parameters_total"] == 62
    cert = receipt["certificate"]
    bound = cert["residual_norm_all"] / WD  # r / lambda: the noise's eps'
    assert cert["budget_used"] == pytest.approx(bound, rel=1e-12)
    assert cert["noise_scale"] == pytest.approx(noise_constant(1e-5) * bound / 0.5, rel=1e-12)
    # Logistic regression is convex: a proof although only a selection was updated ...
    assert cert["convex"] and cert["proof"] and cert["statement"].startswith("The bound is a proof")
    # ... but not when the residual was measured on a subsample of the retained data,
    subsampled = _run(copy.deepcopy(model), spec, x, y, options, config, objective_samples=100)
    assert not subsampled["certificate"]["proof"]
    assert "subsample" in subsampled["certificate"]["statement"]
    # ... nor for a model that is not convex.
    mlp_spec = ArchitectureSpec("mlp", (x.shape[1],), 2)
    mlp = build_model(mlp_spec, seed=0)
    train(mlp, x, y, config)
    nonconvex = _run(mlp, mlp_spec, x, y, options, config)
    assert not nonconvex["certificate"]["proof"]
    assert "not convex" in nonconvex["certificate"]["statement"]


def test_correcting_non_convergence_lowers_the_residual_of_an_unpolished_model() -> None:
    x, y = _cancer()
    spec = ArchitectureSpec("mlp", (x.shape[1],), 2)
    config = TrainConfig(epochs=1, weight_decay=WD, polish_iterations=0)
    model = build_model(spec, seed=0)
    train(model, x, y, config)
    assumed = _run(copy.deepcopy(model), spec, x, y, UnlearningOptions(selection="all"), config)
    corrected = _run(
        copy.deepcopy(model),
        spec,
        x,
        y,
        UnlearningOptions(selection="all", correct_non_convergence=True),
        config,
    )
    assert assumed["method"]["assume_converged"] and not corrected["method"]["assume_converged"]
    before = assumed["retained_gradient_norm_before"]
    assert before == corrected["retained_gradient_norm_before"] > 1e-3
    corrected_residual = corrected["certificate"]["residual_norm_all"]
    assert corrected_residual < 0.5 * assumed["certificate"]["residual_norm_all"]
    assert corrected_residual < before


def test_a_convex_model_updated_whole_always_takes_its_measured_gradient() -> None:
    # J' of a logistic regression has one minimiser, the one retraining approaches: the
    # polish's leftover gradient must not keep the step from it. A true selection (20 of
    # 62 entries) still takes the model as converged unless asked. Served training (the
    # polish on): the steps stay in the trust region around the served model.
    x, y = _cancer()
    spec = ArchitectureSpec("logreg", (x.shape[1],), 2)
    config = TrainConfig(epochs=5, weight_decay=WD)
    model = build_model(spec, seed=0)
    train(model, x, y, config)
    whole = _run(copy.deepcopy(model), spec, x, y, UnlearningOptions(selection="lcodec_cg"), config)
    part = _run(
        copy.deepcopy(model),
        spec,
        x,
        y,
        UnlearningOptions(selection="lcodec_cg", parameter_budget=20),
        config,
    )
    assert whole["parameters_updated"] == whole["parameters_total"]
    assert not whole["method"]["assume_converged"] and part["method"]["assume_converged"]
    before = whole["retained_gradient_norm_before"]
    assert before > 1e-5
    # The unique optimum is reached: the residual falls by orders of magnitude (measured:
    # 1.5e-4 before, 4e-8 after).
    assert whole["certificate"]["residual_norm_all"] < 1e-2 * before


def test_batch_norm_statistics_are_recomputed_on_the_retained_data() -> None:
    raw = load_digits()
    x = torch.tensor(raw.data[:300] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(raw.target[:300])
    spec = ArchitectureSpec("resnet", (1, 8, 8), 10, channels=4)
    config = TrainConfig(epochs=2, weight_decay=WD)
    model = build_model(spec, seed=0)
    train(model, x, y, config)
    receipt = _run(model, spec, x, y, UnlearningOptions(selection="output"), config)
    assert receipt["batchnorm_recomputed"]
    retained_only, everything = copy.deepcopy(model), copy.deepcopy(model)
    recompute_batchnorm_statistics(retained_only, x[12:])
    recompute_batchnorm_statistics(everything, x)
    stats = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert stats
    for name, value in stats.items():
        assert torch.equal(value, retained_only.state_dict()[name]), name
    assert any(not torch.equal(v, everything.state_dict()[k]) for k, v in stats.items())


def test_training_records_its_time_for_the_retrain_estimate(state_dir: Path) -> None:
    store = Store(state_dir)
    try:
        metrics = store.version("digits", 1).metrics  # type: ignore[union-attr]
    finally:
        store.close()
    assert metrics["training_seconds"] > 0


def test_the_policy_reads_no_clock_so_the_same_request_takes_the_same_path() -> None:
    x, y = _cancer()
    spec = ArchitectureSpec("logreg", (x.shape[1],), 2)
    config = TrainConfig(epochs=5, weight_decay=WD)
    model = build_model(spec, seed=0)
    train(model, x, y, config)
    runs = [_run(copy.deepcopy(model), spec, x, y, UnlearningOptions(), config) for _ in range(2)]
    assert runs[0]["policy"] == runs[1]["policy"]
    # The unit comes from the training record: 1 s for 5 epochs over 569 samples, a quarter.
    assert runs[0]["policy"]["estimated_seconds_per_sample"] == pytest.approx(0.25 / (5 * len(x)))
