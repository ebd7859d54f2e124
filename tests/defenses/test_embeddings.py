"""Gradient embeddings: their inner products are GAS, TracInCP and LGAS, computed by loops."""

from __future__ import annotations

import math
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from expunge.defenses.architectures import ArchitectureSpec, build_model
from expunge.defenses.embeddings import (
    EmbeddingConfig,
    EmbeddingKind,
    GradientEmbedder,
    embed_shard,
    embedding_dim,
    index_metadata,
    layer_groups,
)
from expunge.defenses.gradients import predicted_labels
from expunge.defenses.projection import ProjectionKind, RandomProjector, derive_seed
from expunge.defenses.training import Checkpoint, TrainConfig, train

RTOL = 1e-9
ATOL = 1e-10
MLP = ArchitectureSpec("mlp", (6,), 3, hidden=(5,))  # 53 parameters in 2 layers
RESNET = ArchitectureSpec("resnet", (1, 4, 4), 3, channels=2)


def _data(spec: ArchitectureSpec, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *spec.input_shape), generator=generator)
    y = torch.randint(0, spec.num_classes, (n,), generator=generator)
    return x, y


def _trained(spec: ArchitectureSpec) -> tuple[nn.Module, list[Checkpoint]]:
    x, y = _data(spec, 40, seed=0)
    config = TrainConfig(epochs=3, batch_size=10, checkpoints=3, learning_rate=0.1)
    result = train(build_model(spec, 0), x, y, config)
    return result.model, result.checkpoints


def _loop_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]
) -> torch.Tensor:
    """One sample's loss gradient by plain autograd, flattened in the order of ``names``."""
    params = dict(model.named_parameters())
    loss = nn.functional.cross_entropy(model(x.unsqueeze(0)), y.unsqueeze(0))
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return torch.cat([g.reshape(-1) for g in grads])


def _loop_parts(
    spec: ArchitectureSpec,
    checkpoint: Checkpoint,
    x: torch.Tensor,
    y: torch.Tensor,
    parts: list[list[str]],
) -> list[list[torch.Tensor]]:
    """Per sample, per part: the float64 gradient at the checkpoint, ``[[(p_l,), ...], ...]``."""
    model = build_model(spec, 0).double()
    model.load_state_dict(checkpoint.state)
    model.eval()
    return [
        [_loop_gradient(model, x[i].double(), y[i], names) for names in parts]
        for i in range(len(x))
    ]


def _double_model(spec: ArchitectureSpec) -> nn.Module:
    return build_model(spec, 0).double()


@pytest.fixture(scope="module")
def mlp() -> tuple[nn.Module, list[Checkpoint]]:
    return _trained(MLP)


def _loop_scores(
    checkpoints: list[Checkpoint],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    config: EmbeddingConfig | None,
    kind: str,
) -> torch.Tensor:
    """sum_t eta_t sum_l s(P g_i, P g_te) with s = cos or <.,.>, one pair at a time.

    ``config=None`` means no projection (the true GAS / TracInCP / LGAS).
    """
    names = [n for n, _ in MLP_PARAMS]
    parts = [names[0:2], names[2:4]] if kind == "lgas" else [names]
    scores = torch.zeros((len(x_train), len(x_test)), dtype=torch.float64)
    for t, checkpoint in enumerate(checkpoints):
        train_grads = _loop_parts(MLP, checkpoint, x_train, y_train, parts)
        test_grads = _loop_parts(MLP, checkpoint, x_test, y_test, parts)
        for part, part_names in enumerate(parts):
            if config is None:
                matrix = None
            else:
                size = sum(p for n, p in MLP_PARAMS if n in part_names)
                seed = (
                    derive_seed(config.seed, t, part)
                    if kind == "lgas"
                    else derive_seed(config.seed, t)
                )
                matrix = RandomProjector(
                    config.projection_kind, size, config.projection_dim, seed
                ).matrix(dtype=torch.float64)
            for i in range(len(x_train)):
                for j in range(len(x_test)):
                    a, b = train_grads[i][part], test_grads[j][part]
                    if matrix is not None:
                        a, b = a @ matrix, b @ matrix
                    similarity = a @ b if kind == "tracincp" else a @ b / (a.norm() * b.norm())
                    scores[i, j] += checkpoint.learning_rate * similarity
    return scores


MLP_PARAMS = [("1.weight", 30), ("1.bias", 5), ("3.weight", 15), ("3.bias", 3)]


@pytest.mark.parametrize("kind", ["gas", "tracincp", "lgas"])
@pytest.mark.parametrize("projection_kind", ["rademacher", "gaussian"])
def test_inner_products_equal_the_projected_scores_computed_by_loops(
    mlp: tuple[nn.Module, list[Checkpoint]], kind: EmbeddingKind, projection_kind: ProjectionKind
) -> None:
    final, checkpoints = mlp
    x_train, y_train = _data(MLP, 6, seed=1)
    x_test, _ = _data(MLP, 3, seed=2)
    y_test = predicted_labels(final, x_test)  # test inputs take the final model's label
    config = EmbeddingConfig(kind=kind, projection_dim=16, projection_kind=projection_kind, seed=5)
    e_train = embed_shard(_double_model(MLP), checkpoints, x_train, y_train, config)
    e_test = embed_shard(_double_model(MLP), checkpoints, x_test, y_test, config)
    expected = _loop_scores(checkpoints, x_train, y_train, x_test, y_test, config, kind)
    torch.testing.assert_close(e_train @ e_test.T, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["gas", "tracincp", "lgas"])
def test_with_k_above_p_the_embedding_recovers_the_true_score_within_jl_error(
    mlp: tuple[nn.Module, list[Checkpoint]], kind: EmbeddingKind
) -> None:
    final, checkpoints = mlp
    x_train, y_train = _data(MLP, 8, seed=3)
    x_test, _ = _data(MLP, 3, seed=4)
    y_test = predicted_labels(final, x_test)
    k = 4096  # > p = 53: the JL error is about 1/sqrt(k) per checkpoint
    config = EmbeddingConfig(kind=kind, projection_dim=k, seed=1)
    e_train = embed_shard(_double_model(MLP), checkpoints, x_train, y_train, config)
    e_test = embed_shard(_double_model(MLP), checkpoints, x_test, y_test, config)
    truth = _loop_scores(checkpoints, x_train, y_train, x_test, y_test, None, kind)
    error = e_train @ e_test.T - truth
    layers = 2 if kind == "lgas" else 1
    eta = sum(c.learning_rate for c in checkpoints)
    if kind == "tracincp":
        # Relative to the product of norms: sum_t eta_t |g_i^t| |g_te^t| bounds the scale.
        train_norms = e_train.reshape(8, len(checkpoints), k).norm(dim=2)
        test_norms = e_test.reshape(3, len(checkpoints), k).norm(dim=2)
        scale = train_norms @ test_norms.T
        assert float((error / scale).abs().max()) < 5 / math.sqrt(k)
    else:
        assert float(error.abs().max()) < layers * eta * 5 / math.sqrt(k)
        # ... and the projection is not a no-op: GAS is far from zero here.
        assert float(truth.abs().max()) > 10 * layers * eta / math.sqrt(k)


def test_gas_embeddings_have_norm_sqrt_of_summed_learning_rates(
    mlp: tuple[nn.Module, list[Checkpoint]],
) -> None:
    _, checkpoints = mlp
    x, y = _data(MLP, 5, seed=5)
    e = embed_shard(build_model(MLP, 0), checkpoints, x, y, EmbeddingConfig(projection_dim=8))
    eta = sum(c.learning_rate for c in checkpoints)
    torch.testing.assert_close(e.norm(dim=1), torch.full((5,), math.sqrt(eta)))
    assert e.dtype == torch.float32 and e.shape == (5, 3 * 8)


def test_shards_embed_independently_with_batch_norm_in_eval_mode() -> None:
    """embed(a ++ b) == embed(a) ++ embed(b), whatever the batch size; the caller's
    model is not changed; a factory gives the same as a module."""
    model, checkpoints = _trained(RESNET)
    model.train()  # the embedder must not depend on, or change, the caller's mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data(RESNET, 10, seed=6)
    config = EmbeddingConfig(kind="lgas", projection_dim=8, batch_size=4, seed=2)
    whole = embed_shard(model, checkpoints, x, y, config)
    parts = torch.cat(
        [
            embed_shard(model, checkpoints, x[:3], y[:3], config),
            embed_shard(lambda: build_model(RESNET, 1), checkpoints, x[3:], y[3:], config),
        ]
    )
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert whole.shape == (10, embedding_dim(model, len(checkpoints), config))


def test_parameter_subset_and_layer_groups(mlp: tuple[nn.Module, list[Checkpoint]]) -> None:
    model, checkpoints = mlp
    assert layer_groups(model) == [("1", ("1.weight", "1.bias")), ("3", ("3.weight", "3.bias"))]
    assert layer_groups(model, ["3.bias"]) == [("3", ("3.bias",))]
    with pytest.raises(KeyError, match="nope"):
        layer_groups(model, ["nope"])
    config = EmbeddingConfig(kind="lgas", projection_dim=4, param_names=("3.weight", "3.bias"))
    embedder = GradientEmbedder(model, checkpoints, config)
    x, y = _data(MLP, 2, seed=7)
    assert embedder.embed(x, y).shape == (2, len(checkpoints) * 1 * 4) == (2, embedder.dim)


def test_metadata_names_what_a_query_needs(mlp: tuple[nn.Module, list[Checkpoint]]) -> None:
    model, checkpoints = mlp
    config = EmbeddingConfig(kind="lgas", projection_dim=32, projection_kind="gaussian", seed=9)
    dim = embedding_dim(model, len(checkpoints), config)
    meta = index_metadata(config, len(checkpoints), dim, model_version="digits/3")
    assert (meta.dim, meta.projection_seed, meta.checkpoints, meta.embedding_kind) == (
        3 * 2 * 32,
        9,
        3,
        "lgas",
    )
    assert meta.projection_kind == "gaussian" and meta.model_version == "digits/3"


def test_invalid_arguments_are_refused(mlp: tuple[nn.Module, list[Checkpoint]]) -> None:
    model, checkpoints = mlp
    with pytest.raises(ValueError, match="embedding kind"):
        EmbeddingConfig(kind="lissa")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one checkpoint"):
        GradientEmbedder(model, [], EmbeddingConfig())
    x, y = _data(MLP, 3, seed=8)
    with pytest.raises(ValueError, match="labels"):
        embed_shard(model, checkpoints, x, y[:2], EmbeddingConfig(projection_dim=4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_embeddings_match_cpu(mlp: tuple[nn.Module, list[Checkpoint]]) -> None:
    model, checkpoints = mlp
    x, y = _data(MLP, 20, seed=9)
    config = EmbeddingConfig(projection_dim=16, batch_size=8)
    on_cpu = embed_shard(model, checkpoints, x, y, config)
    on_gpu = embed_shard(model, checkpoints, x, y, config, device="cuda")
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=1e-5)


def test_one_embedder_used_from_several_threads_gives_the_serial_answer(
    mlp: tuple[nn.Module, list[Checkpoint]],
) -> None:
    """The server shares one embedder between concurrent Neighbors and Scan calls."""
    _, checkpoints = mlp
    embedder = GradientEmbedder(build_model(MLP, 0), checkpoints, EmbeddingConfig(projection_dim=8))
    inputs = [_data(MLP, 3, seed=100 + i) for i in range(8)]
    expected = [embedder.embed(x, y) for x, y in inputs]
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            for _ in range(10):
                got = list(pool.map(lambda xy: embedder.embed(*xy), inputs))
                for g, e in zip(got, expected, strict=True):
                    torch.testing.assert_close(g, e, rtol=0, atol=0)
    finally:
        sys.setswitchinterval(previous)
