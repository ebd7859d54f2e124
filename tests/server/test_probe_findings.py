"""The findings of an outside probe, each rerun against a real server as the probe ran it."""

from __future__ import annotations

import hashlib
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from expunge.client import (
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from expunge.server.edge.interceptors import token_digest
from expunge.server.errors import MESSAGE_LIMIT, PermissionDenied
from expunge.server.main import RunningServer, start
from expunge.server.roles import EFFECT_ROLES, ROLES, require_effect
from expunge.server.settings import Settings
from expunge.server.state.identifiers import SECRET_FILE_NAME
from expunge.server.training_job import train_model

TOKENS = {f"{role}-token": role for role in ROLES}
SMALL_LIMIT = 4  # calls in flight: a leak of four slots would lock everyone out
SMALL_MESSAGE = 64 * 1024
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _owner(state_dir: Path, skip: int = 0) -> str:
    db = sqlite3.connect(state_dir / "expunge.db")
    try:
        rows = db.execute(
            "SELECT owner_id FROM samples GROUP BY owner_id ORDER BY owner_id LIMIT 1 OFFSET ?",
            (skip,),
        ).fetchall()
    finally:
        db.close()
    return str(rows[0][0])


@pytest.fixture
def secured(state_dir: Path) -> Iterator[RunningServer]:
    running = start(
        Settings(
            state_dir=state_dir,
            port=0,
            token_sha256_roles={token_digest(t): r for t, r in TOKENS.items()},
            rate_limit_per_s=0,
            max_concurrent_rpcs=SMALL_LIMIT,
            max_message_bytes=SMALL_MESSAGE,
            reflection=True,
            build_index=False,
        )
    )
    yield running
    running.stop(5)


def _raw(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(method)  # bytes in, bytes out: no (de)serializer


# 1 and 2: admission that cannot leak; malformed bodies are the caller's error --------------


def test_malformed_and_oversize_calls_neither_leak_slots_nor_answer_internal(
    secured: RunningServer,
) -> None:
    metadata = (("authorization", "Bearer read-token"),)
    with grpc.insecure_channel(secured.target) as channel:
        list_models = _raw(channel, "/expunge.v1.Expunge/ListModels")
        for _ in range(200):
            with pytest.raises(grpc.RpcError) as bad:
                list_models(b"\xff" * 8, metadata=metadata, timeout=10)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid message" in bad.value.details()
        for _ in range(200):
            with pytest.raises(grpc.RpcError) as big:
                list_models(b"\x00" * (SMALL_MESSAGE + 1), metadata=metadata, timeout=10)
            assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with Client(secured.target, token="read-token", retries=0) as client:
        assert [m.name for m in client.list_models()] == ["models/digits"]
        assert client.health() == "SERVING"
    assert secured.interceptor.concurrency.in_flight == 0


@pytest.mark.parametrize(
    "method",
    [
        "/expunge.v1.Expunge/GetModel",
        "/expunge.v1.Expunge/Predict",
        "/expunge.v1.Expunge/Forget",
        "/grpc.health.v1.Health/Check",
    ],
)
def test_unparsable_bodies_are_invalid_argument_for_every_service(
    secured: RunningServer, method: str
) -> None:
    with grpc.insecure_channel(secured.target) as channel:
        with pytest.raises(grpc.RpcError) as bad:
            _raw(channel, method)(
                b"\xff" * 8, metadata=(("authorization", "Bearer admin-token"),), timeout=10
            )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unparsable_reflection_stream_is_invalid_argument(secured: RunningServer) -> None:
    with grpc.insecure_channel(secured.target) as channel:
        stream = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        )
        with pytest.raises(grpc.RpcError) as bad:
            list(stream(iter([b"\xff" * 8]), timeout=10))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# 3: authorisation of effects, not entry points ----------------------------------------------


@pytest.mark.parametrize("effect", sorted(EFFECT_ROLES))
@pytest.mark.parametrize("role", ROLES)
def test_each_role_may_cause_only_its_effects(role: str, effect: str) -> None:
    actor = f"{role}:0123abcd"
    if role == "admin" or role in EFFECT_ROLES[effect]:
        require_effect(effect, actor)
    else:
        with pytest.raises(PermissionDenied, match=f"may not cause a {effect}"):
            require_effect(effect, actor)


def test_a_scan_token_cannot_mitigate_and_nothing_is_forgotten(secured: RunningServer) -> None:
    x = secured.engine.test_data("digits").features[:1]
    with Client(secured.target, token="scan-token", retries=0) as scanner:
        with pytest.raises(PermissionDeniedError, match="may not cause a forget"):
            list(scanner.scan("digits", x, mitigate=True, request_id="m-1"))
        model = scanner.get_model("digits")
    assert (model.current_version, model.forgotten_samples) == (1, 0)
    assert secured.engine.store.request("m-1:0") is None


@pytest.mark.parametrize(
    ("token", "allowed"),
    [("read-token", False), ("scan-token", False), ("forget-token", True), ("admin-token", True)],
)
def test_forget_and_retrain_entry_points_follow_the_effect_rules(
    secured: RunningServer, state_dir: Path, token: str, allowed: bool
) -> None:
    owner = _owner(state_dir)
    with Client(secured.target, token=token, retries=0) as client:
        if allowed:
            assert client.forget("digits", owner_ids=[owner], wait=True).state == "SUCCEEDED"
            assert client.retrain("digits", wait=True).state == "SUCCEEDED"
        else:
            with pytest.raises(PermissionDeniedError):
                client.forget("digits", owner_ids=[owner])
            with pytest.raises(PermissionDeniedError):
                client.retrain("digits")


# 4 and 5: versions after a rollback, and the index that follows them --------------------------


def test_rollback_forget_retrain_rollback_chains_apply_and_the_index_follows(
    state_dir: Path,
) -> None:
    running = start(Settings(state_dir=state_dir, port=0))
    try:
        with Client(running.target, timeout=120) as client:
            _index_follows(client)
            assert client.retrain("digits", wait=True).state == "SUCCEEDED"
            assert client.get_model("digits").current_version == 2
            client.rollback("digits", 1)
            _index_follows(client)
            first = _owner(state_dir)
            op = client.forget("digits", owner_ids=[first], request_id="after-rollback", wait=True)
            assert op.state == "SUCCEEDED" and op.receipt is not None, op
            assert (op.receipt.parent_version, op.receipt.new_version) == (1, 3)
            _served_is_current(client, running, absent_owner=first)
            retrain = client.retrain("digits", wait=True)
            assert retrain.state == "SUCCEEDED" and retrain.retrain_receipt is not None
            assert retrain.retrain_receipt.new_version == 4
            client.rollback("digits", 3)
            _index_follows(client)
            second = _owner(state_dir)
            op = client.forget("digits", owner_ids=[second], wait=True)
            assert op.state == "SUCCEEDED" and op.receipt is not None, op
            assert (op.receipt.parent_version, op.receipt.new_version) == (3, 5)
            _served_is_current(client, running, absent_owner=second)
            assert first not in set(running.engine.training_data("digits").owner_ids.tolist())
            versions = client.list_versions("digits")
            assert [v.version for v in versions] == [1, 2, 3, 4, 5]
            assert [v.parent_version for v in versions] == [0, 1, 1, 3, 3]
            # Everything before the last forget was trained on data forgotten since.
            assert [v.superseded_by_forget for v in versions] == [True] * 4 + [False]
            _index_follows(client)
    finally:
        running.stop(5)


def _served_is_current(client: Client, running: RunningServer, absent_owner: str) -> None:
    model = client.get_model("digits")
    (current,) = [v for v in client.list_versions("digits") if v.version == model.current_version]
    assert hashlib.sha256(client.export_model("digits")).hexdigest() == current.weights_sha256
    assert absent_owner not in set(running.engine.training_data("digits").owner_ids.tolist())


def _index_follows(client: Client) -> None:
    """Never READY on another version; READY on the served one once re-embedded."""
    x = np.zeros((1, 1, 8, 8), np.float32)
    for _ in range(600):
        model = client.get_model("digits")
        if model.index.state == "READY":
            assert model.index.embedded_version == model.current_version
            answer = client.neighbors("digits", x, 3)
            assert answer.stale == (answer.embedded_version != answer.model_version)
            if not answer.stale:
                return
        else:
            assert model.index.state in ("STALE", "BUILDING", "ABSENT")
        time.sleep(0.1)
    raise AssertionError(f"the index never caught up with version {model.current_version}")


# 6: finite but extreme inputs ------------------------------------------------------------------


@pytest.mark.parametrize("value", [FLOAT32_MAX, -FLOAT32_MAX, 1e30])
def test_extreme_inputs_are_refused_naming_the_input(client: Client, value: float) -> None:
    x = np.zeros((2, 1, 8, 8), np.float32)
    x[1, 0, 3, 3] = value
    for call in (
        lambda: client.predict("digits", x),
        lambda: client.neighbors("digits", x, 3),
        lambda: list(client.scan("digits", x)),
    ):
        with pytest.raises(InvalidArgumentError) as refused:
            call()
        assert refused.value.violations[0].field == "inputs[1]"


def test_inputs_at_the_magnitude_limit_give_finite_answers(client: Client, server: object) -> None:
    limit = server.settings.max_input_magnitude  # type: ignore[attr-defined]
    x = np.full((1, 1, 8, 8), limit, np.float32)
    probabilities = client.predict("digits", x).probabilities
    assert np.isfinite(probabilities).all()


# 7: identifiers at rest --------------------------------------------------------------------------


@pytest.fixture
def distinctive_state(tmp_path: Path) -> Path:
    """Digits with ids that cannot occur by chance in a file: 10-digit sample ids and long
    owner ids, so a byte search that finds nothing means something."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.target)
    owners = np.array([f"owner-{7_300_000 + i // 5}" for i in range(n)])
    npz = tmp_path / "distinctive.npz"
    np.savez(
        npz,
        features=(digits.data / 16.0).reshape(n, 1, 8, 8).astype(np.float32),
        labels=digits.target.astype(np.int64),
        sample_ids=np.arange(9_100_000_000, 9_100_000_000 + n, dtype=np.int64),
        owner_ids=owners,
    )
    state = tmp_path / "state"
    train_model(state, "digits", str(npz), "mlp", epochs=3, settings=Settings(state_dir=state))
    return state


def _files_holding(root: Path, needles: list[bytes]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        hits = [n.decode() for n in needles if n in data]
        if hits:
            found[str(path.relative_to(root))] = hits
    return found


def test_forgotten_identifiers_are_in_no_file_after_the_commit_and_after_a_stop(
    distinctive_state: Path,
) -> None:
    db = sqlite3.connect(distinctive_state / "expunge.db")
    owner = "owner-7300042"
    ids = [
        int(r[0]) for r in db.execute("SELECT sample_id FROM samples WHERE owner_id = ?", (owner,))
    ]
    db.close()
    assert len(ids) >= 2  # five per owner, less the 20% held out for testing
    needles = [owner.encode(), *(str(i).encode() for i in ids)]
    assert _files_holding(distinctive_state, needles)  # the search finds them before
    running = start(Settings(state_dir=distinctive_state, port=0))
    try:
        with Client(running.target, timeout=120) as client:
            op = client.forget(
                "digits", owner_ids=[owner], sample_ids=ids[:2], request_id="forget-it", wait=True
            )
            assert op.state == "SUCCEEDED" and op.receipt is not None
            assert op.receipt.removed_samples == len(ids) and op.receipt.removed_owners == 1
            assert _files_holding(distinctive_state, needles) == {}
            # Still answerable: the same owner again is "already forgotten", by digest.
            again = client.forget("digits", owner_ids=[owner], wait=True)
            assert again.receipt is not None and again.receipt.already_forgotten_owners == 1
    finally:
        assert running.stop(10)
    assert _files_holding(distinctive_state, needles) == {}
    secret = distinctive_state / SECRET_FILE_NAME
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


# 8: a caller's huge strings are not echoed back --------------------------------------------------


def test_huge_strings_get_their_real_status_with_a_bounded_message(client: Client) -> None:
    huge = "x" * 100_000
    # The real status arrives (the probe saw RESOURCE_EXHAUSTED on metadata size instead).
    with pytest.raises((NotFoundError, InvalidArgumentError)) as missing:
        client.get_model(huge)
    assert len(missing.value.message) <= MESSAGE_LIMIT
    with pytest.raises(InvalidArgumentError) as invalid:
        client.forget("digits", owner_ids=["u0001"], request_id=huge)
    assert len(invalid.value.message) <= MESSAGE_LIMIT


# 9: an update that collapses accuracy is not served silently -------------------------------------


@pytest.mark.parametrize("policy", ["retrain", "hold", "serve"])
def test_a_collapsing_forget_is_handled_by_the_policy(state_dir: Path, policy: str) -> None:
    running = start(
        Settings(state_dir=state_dir, port=0, on_accuracy_collapse=policy, build_index=False)
    )
    x = running.engine.test_data("digits").features[:4]
    try:
        with Client(running.target, timeout=120) as client:
            op = client.forget(
                "digits",
                owner_ids=[_owner(state_dir)],
                epsilon=1e-9,
                delta=1e-5,
                selection="lcodec_cg",
                request_id="noisy",
                wait=True,
            )
            assert op.state == "SUCCEEDED" and op.receipt is not None, op
            collapse = op.receipt.accuracy_collapse
            assert collapse is not None and collapse.drop_points > collapse.limit_points == 5.0
            assert collapse.action == policy
            if policy == "serve":
                assert client.predict("digits", x).version == 2
                return
            if policy == "hold":
                with pytest.raises(FailedPreconditionError, match="is held"):
                    client.predict("digits", x)
                assert client.get_model("digits").current_version == 2
                return
            assert collapse.retrain_operation == "operations/noisy:retrain"
            retrained = client.wait(collapse.retrain_operation, timeout=300)
            assert retrained.state == "SUCCEEDED" and retrained.retrain_receipt is not None
            assert client.predict("digits", x).version == 3
            model = client.get_model("digits")
            assert model.metrics["test_accuracy"] > 0.8
    finally:
        running.stop(5)


def test_prune_collects_the_weights_of_superseded_versions(state_dir: Path) -> None:
    import subprocess
    import sys

    running = start(Settings(state_dir=state_dir, port=0, build_index=False))
    try:
        with Client(running.target, timeout=120) as client:
            client.forget("digits", owner_ids=[_owner(state_dir)], wait=True)
            old, new = client.list_versions("digits")
    finally:
        running.stop(5)
    blobs = state_dir / "blobs"
    held = {p.parent.name + p.name for p in blobs.rglob("*") if p.is_file()}
    assert old.weights_sha256 in held
    done = subprocess.run(
        [sys.executable, "-m", "expunge.client.cli", "prune", "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "pruned the weights of 1 superseded versions" in done.stdout
    left = {p.parent.name + p.name for p in blobs.rglob("*") if p.is_file()}
    assert old.weights_sha256 not in left and new.weights_sha256 in left
