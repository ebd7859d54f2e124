"""Model RPCs against a real server on 127.0.0.1 with the real client."""

from __future__ import annotations

import hashlib

import grpc
import numpy as np
import pytest

from expunge.client import (
    Client,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from expunge.server.state.weights import parse_state


def test_health_models_and_versions(client: Client) -> None:
    assert client.health() == "SERVING"
    (model,) = client.list_models()
    assert model.name == "models/digits" and model.architecture == "mlp"
    assert model.input_shape == (1, 8, 8) and model.input_dtype == "float32"
    assert model.num_classes == 10 and model.current_version == 1
    assert model.num_checkpoints == 10 and model.num_training_samples > 1000
    assert model.metrics["test_accuracy"] > 0.85
    assert client.get_model("digits") == client.get_model("models/digits")
    (version,) = client.list_versions("digits")
    assert version.version == 1 and version.parent_version == 0 and version.created_by == "train"


def test_predict_matches_the_engine_and_reports_accuracy(client: Client, server: object) -> None:
    test = server.engine.test_data("digits")  # type: ignore[attr-defined]
    result = client.predict("digits", test.features[:50])
    assert result.version == 1 and result.labels.shape == (50,)
    assert result.probabilities.shape == (50, 10)
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert float(np.mean(result.labels == test.labels[:50])) > 0.8


def test_export_streams_the_exact_safetensors_weights(client: Client) -> None:
    data = client.export_model("digits")
    (version,) = client.list_versions("digits")
    assert hashlib.sha256(data).hexdigest() == version.weights_sha256
    assert set(parse_state(data)) == {"1.weight", "1.bias", "3.weight", "3.bias"}


@pytest.mark.parametrize(
    ("inputs", "message", "field"),
    [
        (np.zeros((2, 64), np.float32), r"expected \(batch, 1, 8, 8\)", "inputs"),
        (np.zeros((2, 1, 8, 8), np.float64), "expected float32", "inputs"),
        (np.zeros((0, 1, 8, 8), np.float32), "empty", "inputs"),
        (np.full((1, 1, 8, 8), np.nan, np.float32), "NaN", "inputs[0]"),
        # The row at fault is named.
        (
            np.stack([np.zeros((1, 8, 8)), np.full((1, 8, 8), np.inf)]).astype(np.float32),
            "NaN",
            "inputs[1]",
        ),
    ],
)
def test_bad_predict_inputs_are_invalid_argument(
    client: Client, inputs: np.ndarray, message: str, field: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=message) as info:
        client.predict("digits", inputs)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.violations and info.value.violations[0].field == field


def test_a_malformed_tensor_is_invalid_argument(server: object) -> None:
    from expunge.v1 import expunge_pb2 as pb
    from expunge.v1 import expunge_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.target) as channel:  # type: ignore[attr-defined]
        stub = pb_grpc.ExpungeStub(channel)
        for tensor, field in (
            (pb.Tensor(dtype="complex64", shape=[1], data=b"12345678"), "inputs.dtype"),
            (pb.Tensor(dtype="float32", shape=[1, 1, 8, 8], data=b"123"), "inputs.data"),
            (pb.Tensor(dtype="float32", shape=[-1], data=b""), "inputs.shape"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(pb.PredictRequest(model="digits", inputs=tensor), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in info.value.details()


@pytest.mark.parametrize("token", ["x", "-1", str(2**63), "9" * 40])
def test_page_tokens_the_server_did_not_issue_are_invalid_argument(
    server: object, token: str
) -> None:
    from expunge.v1 import expunge_pb2 as pb
    from expunge.v1 import expunge_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.target) as channel:  # type: ignore[attr-defined]
        stub = pb_grpc.ExpungeStub(channel)
        for call, request in (
            (stub.ListVersions, pb.ListVersionsRequest(model="digits", page_token=token)),
            (stub.ListAudit, pb.ListAuditRequest(page_token=token)),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "page_token" in info.value.details()


def test_unknown_model_and_version_are_not_found(client: Client) -> None:
    with pytest.raises(NotFoundError, match="'nosuch' not found"):
        client.get_model("nosuch")
    with pytest.raises(NotFoundError, match="version 9"):
        client.predict("digits", np.zeros((1, 1, 8, 8), np.float32), version=9)
    with pytest.raises(NotFoundError):
        client.export_model("digits", version=7)
    with pytest.raises(InvalidArgumentError, match="model name"):
        client.get_model("Bad Name!")


def test_an_oversized_request_is_resource_exhausted(server: object) -> None:
    # The server's limits, met by a client told not to split (the default client splits
    # larger inputs under them: tests/client/test_batching.py).
    big = np.zeros((40_000, 1, 8, 8), np.float32)  # 10 MB within the 16 MB message limit
    unsplit = {"max_message_bytes": 1 << 30, "max_batch_inputs": 10**6}
    with Client(server.target, retries=0, **unsplit) as client:  # type: ignore[attr-defined]
        with pytest.raises(InvalidArgumentError, match="exceeds the limit of 4096"):
            client.predict("digits", big)
    huge = np.zeros((80_000, 1, 8, 8), np.float32)  # 20 MB: over the transport limit
    with Client(server.target, retries=0, **unsplit) as client:  # type: ignore[attr-defined]
        with pytest.raises(ResourceExhaustedError):
            client.predict("digits", huge)
    with Client(server.target, retries=0) as client:  # type: ignore[attr-defined]
        assert client.predict("digits", big).labels.shape == (40_000,)


def test_audit_lists_the_model_creation(client: Client) -> None:
    events = client.audit("digits")
    assert events[0].action == "create_model" and events[0].resource == "models/digits"
    assert events[0].details["training_samples"] > 1000
