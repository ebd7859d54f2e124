"""Influence estimators over saved checkpoints (DESIGN 4.7, Hammoudeh & Lowd).

Every estimator returns a matrix ``(n_test, n_train)`` whose entry ``(j, i)`` says how
much training sample ``i`` pushed the model towards its prediction on test input ``j``;
**positive means proponent** for every method, so the sign conventions agree and
``targets.target_score`` can treat them alike.

Notation: checkpoints ``theta_t`` with learning rate ``eta_t`` (the rate SGD used from
that step; ``training.train`` records it), ``g_i^t`` the per-sample gradient of training
sample ``i`` at ``theta_t`` with its own label, ``g_te^t`` the gradient of the test input
with its **predicted** label.

- ``tracincp``: ``sum_t eta_t <g_i^t, g_te^t>``.
- ``gas``: ``sum_t eta_t cos(g_i^t, g_te^t)``: TracInCP renormalised.
- ``lgas``: ``sum_t eta_t sum_l cos(g_i^{t,l}, g_te^{t,l})``. A *layer* ``l`` is, by
  default (``layer_grouping="module"``), a module that owns parameters: the weight and
  bias of one ``Linear`` form one layer, as in ``embeddings.layer_groups``. With
  ``layer_grouping="parameter"`` each parameter tensor is its own layer.
- ``if``: influence functions on the final model, ``g_te^T (H + mu I)^{-1} g_i``, where
  ``H`` is the Hessian of the training objective
  ``J = mean loss + (weight_decay / 2) |theta|^2`` and ``mu`` the damping. This is
  Koh & Liang's ``-I_up,loss``: the sign is flipped so that positive means proponent.
  ``(H + mu I)^{-1} g_te`` comes from the exact dense Hessian (small models), LiSSA
  or Arnoldi (Schioppa et al. 2022).
- ``rif``: the same with both vectors normalised: ``cos((H + mu I)^{-1} g_te, g_i)``.
  (Only the training side matters for ranking; normalising the test side as well keeps
  the values in ``[-1, 1]``.)
- ``representer`` (Yeh et al. 2018): ``alpha_{i,y} f_i^T f_te`` with ``f`` the input of
  the final ``nn.Linear`` layer, ``y`` the predicted class and
  ``alpha_i = -1 / (2 lambda n) dL_i/dlogits_i`` where ``lambda = weight_decay / 2``,
  because our ``J`` carries ``(weight_decay / 2) |theta|^2``. The weight decay in
  ``training.train`` also reaches the bias, so when the layer has one the features get a
  constant 1 appended: at a stationary point of ``J``,
  ``logit_c(x_te) = sum_i alpha_{i,c} (f_i^T f_te + 1)`` exactly.
- ``rrepresenter``: ``sign(alpha_{i,y}) cos(f_i, f_te)``: both magnitudes removed.
  (Hammoudeh & Lowd's code keeps the raw feature product and takes only ``sign(alpha)``;
  the cosine also removes the feature norm, which is the point of renormalising.)

Test labels: by default the label the **final** model predicts, used at every checkpoint
(as in the paper: influence explains the prediction that was made, not what an early
checkpoint would have said). Pass ``test_labels`` to explain another class.

Cost: per-sample gradients come from ``gradients.per_sample_gradients`` (``vmap``), one
training chunk of ``config.batch_size`` at a time, so memory holds
``batch_size x parameters`` gradient entries plus ``n_test x parameters`` for the test
side and the ``(n_test, n_train)`` result; there is no per-sample Python loop.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from .gradients import flatten_gradients, per_sample_gradients, predicted_labels, sample_loss
from .task import task_of
from .training import Checkpoint

__all__ = [
    "INFLUENCE_METHODS",
    "InfluenceConfig",
    "InfluenceMethod",
    "influence_scores",
]

InfluenceMethod = Literal["tracincp", "gas", "lgas", "if", "rif", "representer", "rrepresenter"]
INFLUENCE_METHODS: tuple[str, ...] = get_args(InfluenceMethod)
HessianMethod = Literal["exact", "lissa", "arnoldi"]


@dataclass(frozen=True)
class InfluenceConfig:
    """How influence is estimated; stored beside the scan results it produced."""

    batch_size: int = field(
        default=256, metadata={"help": "training samples whose per-sample gradients exist at once"}
    )
    param_names: tuple[str, ...] | None = field(
        default=None, metadata={"help": "parameters whose gradients count (None: all)"}
    )
    layer_grouping: Literal["module", "parameter"] = field(
        default="module", metadata={"help": "LGAS layers: owning module, or parameter tensor"}
    )
    eps: float = field(
        default=1e-12, metadata={"help": "norm floor: the cosine of a zero gradient is 0"}
    )
    weight_decay: float = field(
        default=1e-3,
        metadata={
            "help": "L2 coefficient of J (TrainConfig.weight_decay): IF Hessian, representer"
        },
    )
    damping: float = field(default=1e-3, metadata={"help": "mu added to the IF Hessian"})
    hessian: HessianMethod = field(
        default="arnoldi", metadata={"help": "inverse-Hessian method for IF: exact, lissa, arnoldi"}
    )
    hessian_samples: int | None = field(
        default=None, metadata={"help": "seeded training subsample for the Hessian (None: all)"}
    )
    max_exact_parameters: int = field(
        default=8192, metadata={"help": "largest parameter count the dense exact Hessian accepts"}
    )
    lissa_depth: int = field(default=1000, metadata={"help": "LiSSA recursion steps"})
    lissa_scale: float = field(
        default=10.0, metadata={"help": "LiSSA scale; must exceed the top eigenvalue of H + mu I"}
    )
    lissa_batch_size: int | None = field(
        default=None, metadata={"help": "samples per LiSSA Hessian estimate (None: full batch)"}
    )
    lissa_repeats: int = field(default=1, metadata={"help": "independent LiSSA runs averaged"})
    arnoldi_iterations: int = field(
        default=100, metadata={"help": "Krylov dimension (capped at the parameter count)"}
    )
    arnoldi_top_k: int = field(
        default=50, metadata={"help": "eigenpairs of largest magnitude kept for the inverse"}
    )
    seed: int = field(
        default=0, metadata={"help": "Hessian subsample, LiSSA batches, Arnoldi start"}
    )

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be positive")
        if self.layer_grouping not in ("module", "parameter"):
            raise ValueError("layer_grouping must be 'module' or 'parameter'")
        if self.hessian not in get_args(HessianMethod):
            raise ValueError(f"hessian must be one of {get_args(HessianMethod)}")
        if self.weight_decay < 0 or self.damping < 0 or self.eps <= 0:
            raise ValueError("need weight_decay >= 0, damping >= 0 and eps > 0")
        if self.lissa_depth < 1 or self.lissa_repeats < 1 or self.lissa_scale <= 0:
            raise ValueError("need lissa_depth >= 1, lissa_repeats >= 1 and lissa_scale > 0")
        if self.arnoldi_iterations < 1 or self.arnoldi_top_k < 1:
            raise ValueError("arnoldi_iterations and arnoldi_top_k must be positive")
        if self.hessian_samples is not None and self.hessian_samples < 1:
            raise ValueError("hessian_samples must be positive")
        if self.lissa_batch_size is not None and self.lissa_batch_size < 1:
            raise ValueError("lissa_batch_size must be positive")


def influence_scores(
    model: nn.Module,
    checkpoints: Sequence[Checkpoint],
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    method: InfluenceMethod,
    config: InfluenceConfig | None = None,
    test_labels: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Influence of every training sample on every test input.

    model: the final model (its predictions give the test labels; ``if``, ``rif``,
    ``representer`` and ``rrepresenter`` use only it). checkpoints: the trajectory
    (``tracincp``, ``gas``, ``lgas`` use only them). train_x ``(n_train, *input_shape)``,
    train_y ``(n_train,)``, test_x ``(n_test, *input_shape)``, test_labels ``(n_test,)``
    (default: the final model's predictions). ``device``: where the scores are computed
    (None: the model's device); the data and a copy of the model are moved there.
    Returns ``(n_test, n_train)`` in the model's dtype on that device; positive means
    proponent. The caller's model is never modified.
    """
    config = config or InfluenceConfig()
    if method not in INFLUENCE_METHODS:
        raise ValueError(
            f"unknown influence method {method!r}; expected one of {INFLUENCE_METHODS}"
        )
    if train_x.shape[0] != train_y.shape[0]:
        raise ValueError(f"{train_x.shape[0]} training inputs but {train_y.shape[0]} labels")
    # A private copy in eval mode: loading checkpoints must not touch the caller's
    # module, and batch norm must use its running statistics so a sample's gradient
    # does not depend on the other samples of its chunk.
    final = copy.deepcopy(model).eval()
    if device is not None:
        final.to(device)
    on = next(final.parameters()).device
    train_x, train_y, test_x = train_x.to(on), train_y.to(on), test_x.to(on)
    if test_labels is None:
        test_labels = predicted_labels(final, test_x)
    test_labels = test_labels.to(on)
    if test_labels.shape[0] != test_x.shape[0]:
        raise ValueError(f"{test_x.shape[0]} test inputs but {test_labels.shape[0]} test labels")
    if method in ("tracincp", "gas", "lgas"):
        return _checkpoint_scores(
            final, checkpoints, train_x, train_y, test_x, test_labels, method, config
        )
    if method in ("if", "rif"):
        return _influence_function_scores(
            final, train_x, train_y, test_x, test_labels, method == "rif", config
        )
    return _representer_scores(
        final, train_x, train_y, test_x, test_labels, method == "rrepresenter", config
    )


# --- gradient similarity over checkpoints -------------------------------------------------


def _param_names(model: nn.Module, config: InfluenceConfig) -> list[str]:
    known = [name for name, _ in model.named_parameters()]
    if config.param_names is None:
        return known
    unknown = sorted(set(config.param_names) - set(known))
    if unknown:
        raise KeyError(f"unknown parameter names: {unknown}")
    wanted = set(config.param_names)
    return [name for name in known if name in wanted]


def _layers(names: Sequence[str], grouping: str) -> list[list[str]]:
    """Parameter names grouped into LGAS layers, in model order."""
    if grouping == "parameter":
        return [[name] for name in names]
    groups: dict[str, list[str]] = {}
    for name in names:
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        groups.setdefault(owner, []).append(name)
    return list(groups.values())


def _unit_rows(rows: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows scaled to unit length; a zero row stays zero (its cosine is defined as 0)."""
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(eps)


def _checkpoint_scores(
    model: nn.Module,
    checkpoints: Sequence[Checkpoint],
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_labels: torch.Tensor,
    method: str,
    config: InfluenceConfig,
) -> torch.Tensor:
    if not checkpoints:
        raise ValueError(f"{method} needs at least one checkpoint")
    names = _param_names(model, config)
    # One "layer" holding every parameter turns LGAS's per-layer sum into plain GAS.
    parts = _layers(names, config.layer_grouping) if method == "lgas" else [names]
    normalise = method != "tracincp"
    dtype = next(model.parameters()).dtype
    scores = torch.zeros((test_x.shape[0], train_x.shape[0]), dtype=dtype, device=test_x.device)
    for checkpoint in checkpoints:
        model.load_state_dict(checkpoint.state)
        test_grads = per_sample_gradients(model, test_x, test_labels, names, config.batch_size)
        test_parts = [flatten_gradients(test_grads, part) for part in parts]
        if normalise:
            test_parts = [_unit_rows(block, config.eps) for block in test_parts]
        for start in range(0, train_x.shape[0], config.batch_size):
            stop = start + config.batch_size
            train_grads = per_sample_gradients(
                model, train_x[start:stop], train_y[start:stop], names, config.batch_size
            )
            block_scores = torch.zeros_like(scores[:, start:stop])
            for part, test_block in zip(parts, test_parts, strict=True):
                train_block = flatten_gradients(train_grads, part)
                if normalise:
                    train_block = _unit_rows(train_block, config.eps)
                block_scores += test_block @ train_block.T
            scores[:, start:stop] += checkpoint.learning_rate * block_scores
    return scores


# --- influence functions --------------------------------------------------------------------


HessianProduct = Callable[[torch.Tensor], torch.Tensor]


def _hessian_product(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    weight_decay: float,
    batch_size: int,
) -> HessianProduct:
    """``V (m, p) -> V (H)`` for the Hessian ``H`` of ``J`` on the given data, ``(m, p)``.

    ``J = mean loss + (weight_decay / 2) |theta|^2`` over the parameters in ``names``
    (the others held fixed); ``p`` counts their entries in ``names`` order. The products
    are forward-over-reverse (``jvp`` of ``grad``), ``vmap``-ed over the ``m`` vectors and
    summed over chunks of ``batch_size`` samples so memory stays bounded.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    varying = {name: params[name] for name in names}
    fixed = {name: t for name, t in params.items() if name not in varying}
    shapes = [varying[name].shape for name in names]
    sizes = [varying[name].numel() for name in names]
    n = inputs.shape[0]

    def loss_sum(var: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**fixed, **var}, buffers), (x,))
        return sample_loss(model, out, y).sum()

    def product(
        vector: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        # Forward-over-reverse: the directional derivative of the gradient along vector.
        result = jvp(lambda var: grad(loss_sum)(var, x, y), (varying,), (vector,))
        return result[1]  # type: ignore[no-any-return]

    batched = vmap(product, in_dims=(0, None, None))

    def apply(vectors: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(vectors, sizes, dim=1)
        as_dict = {
            name: piece.reshape(vectors.shape[0], *shape)
            for name, piece, shape in zip(names, pieces, shapes, strict=True)
        }
        total = torch.zeros_like(vectors)
        for start in range(0, n, batch_size):
            out = batched(
                as_dict, inputs[start : start + batch_size], labels[start : start + batch_size]
            )
            total += flatten_gradients(out, names)
        return total / n + weight_decay * vectors

    return apply


def _influence_function_scores(
    model: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_labels: torch.Tensor,
    renormalise: bool,
    config: InfluenceConfig,
) -> torch.Tensor:
    names = _param_names(model, config)
    hessian_x, hessian_y = train_x, train_y
    if config.hessian_samples is not None and config.hessian_samples < train_x.shape[0]:
        generator = torch.Generator().manual_seed(config.seed)
        keep = torch.randperm(train_x.shape[0], generator=generator)[: config.hessian_samples]
        hessian_x, hessian_y = train_x[keep], train_y[keep]
    test_grads = flatten_gradients(
        per_sample_gradients(model, test_x, test_labels, names, config.batch_size), names
    )
    solved = _inverse_hessian_products(model, hessian_x, hessian_y, names, test_grads, config)
    if renormalise:
        solved = _unit_rows(solved, config.eps)
    scores = torch.zeros(
        (test_x.shape[0], train_x.shape[0]), dtype=test_grads.dtype, device=test_grads.device
    )
    for start in range(0, train_x.shape[0], config.batch_size):
        stop = start + config.batch_size
        train_grads = flatten_gradients(
            per_sample_gradients(
                model, train_x[start:stop], train_y[start:stop], names, config.batch_size
            ),
            names,
        )
        if renormalise:
            train_grads = _unit_rows(train_grads, config.eps)
        scores[:, start:stop] = solved @ train_grads.T
    return scores


def _inverse_hessian_products(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    vectors: torch.Tensor,
    config: InfluenceConfig,
) -> torch.Tensor:
    """``(H + mu I)^{-1} v`` for each row ``v`` of ``vectors (m, p)``: ``(m, p)``."""
    product = _hessian_product(model, inputs, labels, names, config.weight_decay, config.batch_size)
    p = vectors.shape[1]
    mu = config.damping
    if config.hessian == "exact":
        if p > config.max_exact_parameters:
            raise ValueError(
                f"the exact Hessian of {p} parameters exceeds max_exact_parameters="
                f"{config.max_exact_parameters}; use hessian='arnoldi' or 'lissa'"
            )
        hessian = _dense_hessian(product, p, vectors.dtype, config.batch_size, vectors.device)
        damped = hessian + mu * torch.eye(p, dtype=vectors.dtype, device=vectors.device)
        return torch.linalg.solve(damped, vectors.T).T
    if config.hessian == "arnoldi":
        values, vecs = _arnoldi_eigenpairs(
            product,
            p,
            min(config.arnoldi_iterations, p),
            config.seed,
            vectors.dtype,
            vectors.device,
        )
        # Keep the eigenpairs of largest magnitude: they carry the most curvature and
        # are the ones a short Krylov run resolves accurately (Schioppa et al. 2022).
        keep = values.abs().argsort(descending=True)[: config.arnoldi_top_k]
        values, vecs = values[keep], vecs[:, keep]
        return ((vectors @ vecs) / (values + mu)) @ vecs.T
    return _lissa(model, inputs, labels, names, vectors, product, config)


def _dense_hessian(
    product: HessianProduct, p: int, dtype: torch.dtype, batch_size: int, device: torch.device
) -> torch.Tensor:
    """The ``(p, p)`` Hessian, a block of columns at a time, symmetrised against round-off."""
    columns = [
        product(torch.eye(p, dtype=dtype, device=device)[start : start + batch_size])
        for start in range(0, p, batch_size)
    ]
    hessian = torch.cat(columns)
    return 0.5 * (hessian + hessian.T)


def _arnoldi_eigenpairs(
    product: HessianProduct,
    p: int,
    iterations: int,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz values ``(r,)`` and vectors ``(p, r)`` of ``H`` from ``iterations`` Arnoldi steps.

    Full re-orthogonalisation (twice, "twice is enough") keeps the Krylov basis
    orthonormal in floating point; the run stops early when the Krylov space becomes
    invariant. For a symmetric ``H`` the projected matrix is tridiagonal, so it is
    symmetrised and solved with ``eigh``.
    """
    generator = torch.Generator().manual_seed(seed)
    # Drawn on the CPU, so every device starts from the same vector.
    start = torch.randn(p, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    basis = [start / start.norm()]
    projected = torch.zeros((iterations + 1, iterations), dtype=dtype, device=device)
    size = iterations
    for j in range(iterations):
        w = product(basis[j].unsqueeze(0)).squeeze(0)
        q = torch.stack(basis)
        coefficients = q @ w
        w = w - q.T @ coefficients
        correction = q @ w
        w = w - q.T @ correction
        projected[: j + 1, j] = coefficients + correction
        beta = w.norm()
        projected[j + 1, j] = beta
        scale = float(projected[: j + 2, : j + 1].abs().max())
        if float(beta) <= 1e-10 * max(scale, 1e-30):
            size = j + 1
            break
        basis.append(w / beta)
    tridiagonal = projected[:size, :size]
    values, ritz = torch.linalg.eigh(0.5 * (tridiagonal + tridiagonal.T))
    return values, torch.stack(basis[:size]).T @ ritz


def _lissa(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    vectors: torch.Tensor,
    full_product: HessianProduct,
    config: InfluenceConfig,
) -> torch.Tensor:
    """LiSSA (Agarwal et al. 2017), written so that ``config.damping`` is the damping.

    ``h <- v + h - (H_b + mu I) h / scale`` has fixed point ``(H + mu I) h / scale = v``,
    so ``h / scale`` estimates ``(H + mu I)^{-1} v``. (Koh & Liang's form multiplies the
    previous estimate by ``1 - damp``, which makes the effective damping
    ``damp * scale``.) It converges when ``scale`` exceeds the top eigenvalue of
    ``H + mu I``; ``H_b`` is the full-batch Hessian or a seeded minibatch's.
    """
    generator = torch.Generator().manual_seed(config.seed)
    n = inputs.shape[0]
    total = torch.zeros_like(vectors)
    for _ in range(config.lissa_repeats):
        estimate = vectors.clone()
        for _ in range(config.lissa_depth):
            if config.lissa_batch_size is None or config.lissa_batch_size >= n:
                curvature = full_product(estimate)
            else:
                batch = torch.randperm(n, generator=generator)[: config.lissa_batch_size]
                curvature = _hessian_product(
                    model,
                    inputs[batch],
                    labels[batch],
                    names,
                    config.weight_decay,
                    config.batch_size,
                )(estimate)
            estimate = (
                vectors + estimate - (curvature + config.damping * estimate) / config.lissa_scale
            )
        if not torch.isfinite(estimate).all():
            raise ValueError(
                "LiSSA diverged: lissa_scale must exceed the largest eigenvalue of H + damping I"
            )
        total += estimate / config.lissa_scale
    return total / config.lissa_repeats


# --- representer points ---------------------------------------------------------------------


def _final_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("representer points need a model whose output layer is an nn.Linear")
    return linears[-1]


def _features_and_logits(
    model: nn.Module, layer: nn.Linear, inputs: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of ``layer`` ``(n, d)`` (with a constant 1 column when it has a bias) and logits."""
    captured: list[torch.Tensor] = []

    def keep_input(_: nn.Module, args: tuple[torch.Tensor, ...], __: torch.Tensor) -> None:
        captured.append(args[0].detach())

    handle = layer.register_forward_hook(keep_input)
    try:
        with torch.no_grad():
            logits = [
                model(inputs[s : s + batch_size]) for s in range(0, inputs.shape[0], batch_size)
            ]
    finally:
        handle.remove()
    features = torch.cat(captured).reshape(inputs.shape[0], -1)
    out = torch.cat(logits)
    if out.shape[1] != layer.out_features or features.shape[1] != layer.in_features:
        raise ValueError("representer points need the last nn.Linear to produce the logits")
    if layer.bias is not None:
        features = torch.cat([features, features.new_ones((features.shape[0], 1))], dim=1)
    return features, out


def _representer_scores(
    model: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_labels: torch.Tensor,
    renormalise: bool,
    config: InfluenceConfig,
) -> torch.Tensor:
    if config.weight_decay <= 0:
        raise ValueError("representer points need weight_decay > 0 (the L2 term of J)")
    layer = _final_linear(model)
    test_features, _ = _features_and_logits(model, layer, test_x, config.batch_size)
    if renormalise:
        test_features = _unit_rows(test_features, config.eps)
    n = train_x.shape[0]
    scores = torch.zeros((test_x.shape[0], n), dtype=test_features.dtype, device=test_x.device)
    for start in range(0, n, config.batch_size):
        stop = start + config.batch_size
        features, logits = _features_and_logits(
            model, layer, train_x[start:stop], config.batch_size
        )
        # dL/dlogits (cross-entropy: softmax - one-hot); 2 * lambda = weight_decay.
        residual = task_of(model).logit_gradient(logits, train_y[start:stop])
        alpha = -residual / (config.weight_decay * n)
        alpha_for_test = alpha[:, test_labels].T  # (n_test, chunk)
        if renormalise:
            scores[:, start:stop] = alpha_for_test.sign() * (
                test_features @ _unit_rows(features, config.eps).T
            )
        else:
            scores[:, start:stop] = alpha_for_test * (test_features @ features.T)
    return scores
