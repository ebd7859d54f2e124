"""Token auth with roles, rate limits, TLS and mutual TLS, the loopback-only default."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from expunge.client import (
    Client,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from expunge.server.edge import interceptors
from expunge.server.edge.interceptors import METHOD_ROLES, check_rules_cover_service, token_digest
from expunge.server.main import InsecureBindRefused, start
from expunge.server.settings import Settings

TOKENS = {
    "admin-secret": "admin",
    "forget-secret": "forget",
    "scan-secret": "scan",
    "read-secret": "read",
}


@pytest.fixture
def secured(state_dir: Path) -> Iterator[object]:
    roles = {token_digest(t): r for t, r in TOKENS.items()}
    running = start(
        Settings(state_dir=state_dir, port=0, token_sha256_roles=roles, rate_limit_per_s=1.0)
    )
    yield running
    running.stop(0)


def test_every_rpc_has_a_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    check_rules_cover_service()
    reduced = dict(METHOD_ROLES)
    del reduced["Forget"]
    monkeypatch.setattr(interceptors, "METHOD_ROLES", reduced)
    with pytest.raises(RuntimeError, match="no rule for \\['Forget'\\]"):
        check_rules_cover_service()


def test_no_token_is_unauthenticated_and_health_stays_open(secured: object) -> None:
    with Client(secured.target, retries=0) as anonymous:  # type: ignore[attr-defined]
        assert anonymous.health() == "SERVING"
        with pytest.raises(UnauthenticatedError):
            anonymous.list_models()
    with Client(secured.target, token="wrong", retries=0) as wrong:  # type: ignore[attr-defined]
        with pytest.raises(UnauthenticatedError):
            wrong.get_model("digits")


def test_roles_are_enforced_before_any_lookup(secured: object) -> None:
    target = secured.target  # type: ignore[attr-defined]
    with Client(target, token="read-secret", retries=0) as reader:
        assert reader.get_model("digits").name == "models/digits"
        reader.predict("digits", np.zeros((1, 1, 8, 8), np.float32))
        # The same refusal whether or not the model or the samples exist.
        for model in ("digits", "no-such-model"):
            with pytest.raises(PermissionDeniedError, match="role 'read' may not call Forget"):
                reader.forget(model, sample_ids=[123456789], request_id="x")
        with pytest.raises(PermissionDeniedError):
            reader.export_model("digits")
        with pytest.raises(PermissionDeniedError):
            reader.audit()
    with Client(target, token="scan-secret", retries=0) as scanner:
        with pytest.raises(PermissionDeniedError):
            scanner.forget("digits", sample_ids=[1], request_id="y")
    with Client(target, token="admin-secret", retries=0) as admin:
        assert admin.export_model("digits")
        events = admin.audit()
        assert events and "secret" not in str(events)


def test_membership_revealing_calls_are_rate_limited(secured: object) -> None:
    with Client(secured.target, token="forget-secret", retries=0) as client:  # type: ignore[attr-defined]
        outcomes = []
        for _ in range(12):
            try:
                client.get_operation("none")
                outcomes.append("ok")
            except ResourceExhaustedError:
                outcomes.append("limited")
            except Exception:
                outcomes.append("answered")
        assert "limited" in outcomes and outcomes[0] != "limited"


def test_binding_beyond_loopback_without_tls_is_refused(state_dir: Path) -> None:
    with pytest.raises(InsecureBindRefused, match="without TLS"):
        start(Settings(state_dir=state_dir, host="0.0.0.0", port=0))


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_and_mutual_tls(state_dir: Path, tmp_path: Path) -> None:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=tmp_path,
    )
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=tmp_path,
        )
        (tmp_path / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            f"{name}.pem",
            cwd=tmp_path,
        )
    settings = Settings(
        state_dir=state_dir,
        port=0,
        tls_cert=tmp_path / "server.pem",
        tls_key=tmp_path / "server.key",
        tls_client_ca=tmp_path / "ca.pem",
    )
    running = start(settings)
    try:
        with Client(
            running.target,
            root_certificates=tmp_path / "ca.pem",
            client_certificate=tmp_path / "client.pem",
            client_key=tmp_path / "client.key",
        ) as client:
            assert client.list_models()[0].name == "models/digits"
        # Without a client certificate the handshake fails.
        with Client(
            running.target, root_certificates=tmp_path / "ca.pem", retries=0, timeout=5
        ) as client:
            with pytest.raises(Exception):  # noqa: B017 - transport-level failure, code varies
                client.list_models()
        # Plaintext to a TLS port fails too.
        with Client(running.target, retries=0, timeout=5) as client:
            with pytest.raises(Exception):  # noqa: B017
                client.list_models()
    finally:
        running.stop(0)
