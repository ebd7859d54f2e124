"""``models``, ``show``, ``versions``, ``export`` and ``rollback``: the served models and
their versions."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from .connection import open_client
from .failures import CommandError
from .output import Outcome, RawBytes, table
from .subcommands import Subparsers, add_command, non_negative_int, positive_int

STDOUT = "-"


def cmd_models(args: argparse.Namespace) -> Outcome:
    with open_client(args) as client:
        models = client.list_models()
    header = (
        "NAME",
        "ARCHITECTURE",
        "VERSION",
        "SAMPLES",
        "OWNERS",
        "CHECKPOINTS",
        "TEST_ACC",
        "INDEX",
    )
    rows = [
        (
            m.name,
            m.architecture,
            m.current_version,
            m.num_training_samples,
            m.num_owners,
            m.num_checkpoints,
            f"{m.metrics['test_accuracy']:.3f}" if "test_accuracy" in m.metrics else "-",
            m.index.state,
        )
        for m in models
    ]
    return Outcome({"models": models}, table(header, rows))


def cmd_show(args: argparse.Namespace) -> Outcome:
    with open_client(args) as client:
        m = client.get_model(args.model)
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(m.metrics.items()))
    index = f"{m.index.state}, version {m.index.embedded_version}, {m.index.size} samples"
    lines = [
        f"{m.name}: {m.architecture}, input {m.input_dtype}{list(m.input_shape)}, "
        f"{m.num_classes} classes, version {m.current_version}",
        f"training samples {m.num_training_samples} from {m.num_owners} owners; "
        f"{m.forgotten_samples} forgotten; {m.num_checkpoints} checkpoints",
        f"index: {index}" + ("" if m.index.progress >= 1 else f" ({m.index.progress:.0%})"),
        f"metrics: {metrics or '-'}",
    ]
    return Outcome(m, lines)


def cmd_versions(args: argparse.Namespace) -> Outcome:
    with open_client(args) as client:
        versions = client.list_versions(args.model)
    header = ("VERSION", "PARENT", "CREATED_BY", "SHA256", "CREATED", "SAMPLES", "NOTE")
    rows = [
        (
            v.version,
            v.parent_version or "-",
            v.created_by,
            v.weights_sha256[:12],
            v.create_time,
            v.num_training_samples,
            "superseded by a forget" if v.superseded_by_forget else "",
        )
        for v in versions
    ]
    return Outcome({"versions": versions}, table(header, rows))


def cmd_export(args: argparse.Namespace) -> Outcome:
    to_stdout = args.output == STDOUT
    if to_stdout and args.json:
        raise CommandError("--output - writes the weights to stdout; it cannot go with --json")
    with open_client(args) as client:
        data = client.export_model(args.model, version=args.version)
    if to_stdout:
        return Outcome(RawBytes(data))
    Path(args.output).write_bytes(data)
    which = f"version {args.version}" if args.version else "the current version"
    digest = hashlib.sha256(data).hexdigest()
    document = {
        "model": args.model,
        "version": args.version,
        "output": args.output,
        "bytes": len(data),
        "sha256": digest,
    }
    line = f"exported {which} of {args.model} to {args.output}: {len(data)} bytes, sha256 {digest}"
    return Outcome(document, [line])


def cmd_rollback(args: argparse.Namespace) -> Outcome:
    with open_client(args) as client:
        model = client.rollback(args.model, args.version)
    return Outcome(model, [f"{model.name} now serves version {model.current_version}"])


def register(sub: Subparsers) -> None:
    add_command(sub, "models", "list the served models", cmd_models)

    p = add_command(sub, "show", "one model in detail: data, index and metrics", cmd_show)
    p.add_argument("model", help="model name, e.g. digits")

    p = add_command(sub, "versions", "list a model's versions", cmd_versions)
    p.add_argument("model", help="model name, e.g. digits")

    p = add_command(sub, "export", "write a version's weights to a .safetensors file", cmd_export)
    p.add_argument("model", help="model name, e.g. digits")
    p.add_argument(
        "--version",
        type=non_negative_int,
        default=0,
        help="version to export (default 0: the current one)",
    )
    p.add_argument(
        "--output",
        "-o",
        required=True,
        metavar="FILE",
        help="where to write the weights (.safetensors); '-' writes them to stdout",
    )

    p = add_command(
        sub,
        "rollback",
        "serve an earlier version again (one trained on data forgotten since is refused)",
        cmd_rollback,
    )
    p.add_argument("model", help="model name, e.g. digits")
    p.add_argument("version", type=positive_int, help="the version to serve")
