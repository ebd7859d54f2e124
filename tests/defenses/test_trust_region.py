"""The Newton step's acceptance rule in float32: the trust-region ratio test.

A one-sample forget on thousands of samples predicts a decrease of J' far below
float32's resolution of J'. The rule it replaced (J' may rise by 16 eps32 max(|J'|, 1))
accepted the reversed step and five times it; the ratio test, computed in float64,
accepts the Newton step and rejects both.
"""

from __future__ import annotations

import torch
from sklearn.datasets import make_classification
from sklearn.preprocessing import StandardScaler

from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.defenses.newton import NewtonConfig, newton_update
from expunge.defenses.newton.damping import _newton_iterations
from expunge.defenses.newton.objective import RetainedObjective
from expunge.defenses.selection import ParameterSelection
from expunge.defenses.training import TrainConfig, train

WEIGHT_DECAY = 1e-3


def _one_sample_forget() -> tuple[
    torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    x, y = make_classification(
        n_samples=24000, n_features=20, n_informative=8, n_classes=3, random_state=3
    )
    x = StandardScaler().fit_transform(x).astype("float32")
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y).long()
    model = build_model(ArchitectureSpec("logreg", (20,), 3), seed=0)
    config = TrainConfig(epochs=2, weight_decay=WEIGHT_DECAY, polish_iterations=200)
    train(model, inputs, labels, config)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, inputs[:1], labels[:1], inputs[1:], labels[1:]


def test_the_reversed_step_is_rejected_where_the_old_tolerance_accepted_it() -> None:
    model, fx, fy, rx, ry = _one_sample_forget()
    selection = ParameterSelection.everything(model)
    config = NewtonConfig(iterations=1, damping=1e-6, max_damping_increases=0)
    result = newton_update(model, selection, fx, fy, rx, ry, WEIGHT_DECAY, config)
    assert result.accepted
    step = result.delta

    params = {n: p.detach() for n, p in model.named_parameters()}
    objective = RetainedObjective(model, params, selection, WEIGHT_DECAY, 1024)
    g = objective.gradient(objective.v0, rx, ry)
    h = objective.hessian(objective.v0, rx, ry, "exact", 512)
    before = objective.value(objective.v0, rx, ry)

    def judged(candidate: torch.Tensor):  # one iteration whose solver returns ``candidate``
        return _newton_iterations(
            objective,
            g,
            lambda gradient, mu: candidate,
            1e-6,
            1.0,
            rx,
            ry,
            config,
            lambda s: float(s.double() @ (h.double() @ s.double())),
        )

    for factor in (-1.0, -5.0):
        wrong = factor * step
        increase = objective.value(objective.v0 + wrong, rx, ry) - before
        assert increase > 0  # the wrong step does raise J' ...
        old_tolerance = 16.0 * torch.finfo(torch.float32).eps * max(abs(before), 1.0)
        assert increase < old_tolerance  # ... by less than the old rule could see
        steps = judged(wrong)
        assert not steps.accepted
        assert steps.steps == 0

    right = judged(step)
    assert right.accepted and right.after < right.before
