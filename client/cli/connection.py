"""The ``Client`` the global options describe (--target, --token, --tls-ca, --timeout)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..client import Client

DEFAULT_TARGET = "127.0.0.1:50051"


def default_target() -> str:
    return os.environ.get("EXPUNGE_TARGET", DEFAULT_TARGET)


def open_client(args: argparse.Namespace) -> Client:
    return Client(
        args.target,
        token=args.token or os.environ.get("EXPUNGE_TOKEN"),
        root_certificates=Path(args.tls_ca) if args.tls_ca else None,
        timeout=args.timeout,
    )


def command_prefix(args: argparse.Namespace) -> str:
    """``expunge`` with the --target this run used unless it is the default, for hints
    that tell the user what to run next."""
    target = getattr(args, "target", default_target())
    return "expunge" if target == default_target() else f"expunge --target {target}"
