"""The ``expunge`` command line: serve, train and demo (server extra), and client calls."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..client import Client
from ..errors import ExpungeError
from ..types import Operation

SERVER_HINT = "this command needs the server extra: pip install 'expunge[server]'"
# Exit codes: 0 done; 1 the server or the operation answered with an error; 2 usage (and
# a missing server extra); 3 the state directory or the port is held by another process.
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_IN_USE = 3
# The server's ``device`` setting (server/settings.py DEVICE_SETTINGS); repeated here
# because the client never imports the server (or torch).
DEVICES = ("auto", "cpu", "cuda")


def _client(args: argparse.Namespace) -> Client:
    return Client(
        args.target,
        token=args.token or os.environ.get("EXPUNGE_TOKEN"),
        root_certificates=Path(args.tls_ca) if args.tls_ca else None,
        timeout=args.timeout,
    )


def _load_inputs(path: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as data:
        key = "inputs" if "inputs" in data else "features"
        return np.asarray(data[key], dtype=np.float32)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from expunge.server.device import DeviceUnavailable
        from expunge.server.main import InsecureBindRefused, PortInUse, serve
        from expunge.server.settings import load_settings
        from expunge.server.state.state_lock import StateDirectoryInUse
    except ImportError:
        print(SERVER_HINT, file=sys.stderr)
        return EXIT_USAGE
    settings = load_settings(
        Path(args.config) if args.config else None,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        host=args.host,
        port=args.port,
        device=args.device,
    )
    try:
        serve(settings)
    except (StateDirectoryInUse, PortInUse) as exc:
        print(f"expunge serve: {exc}", file=sys.stderr)
        return EXIT_IN_USE
    except (InsecureBindRefused, DeviceUnavailable) as exc:
        print(f"expunge serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    try:
        from expunge.server.device import DeviceUnavailable
        from expunge.server.settings import Settings
        from expunge.server.state.state_lock import StateDirectoryInUse
        from expunge.server.training_job import train_model
    except ImportError:
        print(SERVER_HINT, file=sys.stderr)
        return EXIT_USAGE
    try:
        info = train_model(
            state_dir=Path(args.state_dir),
            name=args.name,
            dataset=args.dataset,
            architecture=args.architecture,
            epochs=args.epochs,
            seed=args.seed,
            hidden=tuple(args.hidden),
            settings=Settings(state_dir=Path(args.state_dir), device=args.device),
        )
    except StateDirectoryInUse as exc:
        print(f"expunge train: {exc}", file=sys.stderr)
        return EXIT_IN_USE
    except DeviceUnavailable as exc:
        print(f"expunge train: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"trained models/{info.row.name} version 1: {json.dumps(info.version.metrics, sort_keys=True)}"
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    if not args.state_dir:  # through the server: the repository is uploaded
        with _client(args) as client:
            served = client.import_model(Path(args.directory), args.name)
        print(
            f"imported {served.name} version {served.current_version}: "
            f"{json.dumps(served.metrics, sort_keys=True)}"
        )
        return 0
    try:
        from expunge.server.errors import ExpungeError as ServerError
        from expunge.server.import_job import import_model
        from expunge.server.state.state_lock import StateDirectoryInUse
    except ImportError:
        print(SERVER_HINT, file=sys.stderr)
        return EXIT_USAGE
    try:
        info = import_model(Path(args.state_dir), Path(args.directory), args.name)
    except StateDirectoryInUse as exc:
        print(f"expunge import: {exc}", file=sys.stderr)
        return EXIT_IN_USE
    except ServerError as exc:
        print(f"expunge import: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    print(
        f"imported models/{info.row.name} version 1: "
        f"{json.dumps(info.version.metrics, sort_keys=True)}"
    )
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    try:
        from expunge.server.state.state_lock import StateDirectoryInUse
        from expunge.server.state.store import Store
    except ImportError:
        print(SERVER_HINT, file=sys.stderr)
        return EXIT_USAGE
    try:
        store = Store(Path(args.state_dir))
    except StateDirectoryInUse as exc:
        print(f"expunge prune: {exc}", file=sys.stderr)
        return EXIT_IN_USE
    try:
        pruned = store.prune_superseded_weights()
    finally:
        store.close()
    print(f"pruned the weights of {pruned} superseded versions in {args.state_dir}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from expunge.server.demo import run_demo
    except ImportError:
        print(SERVER_HINT, file=sys.stderr)
        return EXIT_USAGE
    return run_demo(state_dir=Path(args.state_dir) if args.state_dir else None)


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for m in client.list_models():
            acc = m.metrics.get("test_accuracy", float("nan"))
            print(
                f"{m.name}  {m.architecture}  v{m.current_version}  samples={m.num_training_samples}"
                f"  owners={m.num_owners}  checkpoints={m.num_checkpoints}  test_acc={acc:.3f}"
            )
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for v in client.list_versions(args.model):
            note = "  (superseded by a forget)" if v.superseded_by_forget else ""
            print(
                f"{v.name}  parent={v.parent_version}  by={v.created_by}  {v.weights_sha256[:12]}{note}"
            )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    inputs = _load_inputs(args.inputs)
    with _client(args) as client:
        result = client.predict(args.model, inputs, version=args.version)
    for i, (label, probs) in enumerate(zip(result.labels, result.probabilities, strict=True)):
        print(f"{i}\t{label}\t{float(probs.max()):.3f}")
    return 0


def _progress(op: object) -> None:
    """One progress line on stderr, redrawn in place."""
    phase = getattr(op, "phase", "")
    done, total = getattr(op, "completed", 0), getattr(op, "total", 0)
    bar = "#" * int(20 * done / total) if total else ""
    print(f"\r{phase:<12} [{bar:<20}] {done}/{total}", end="", file=sys.stderr, flush=True)


def _operation_failed(op: Operation) -> bool:
    """End the progress line and print the operation's state; True (and why) if it failed."""
    print(file=sys.stderr)
    print(f"{op.name}: {op.state}")
    if op.error_message:
        print(f"error: {op.error_message}", file=sys.stderr)
    return bool(op.error_message)


def cmd_retrain(args: argparse.Namespace) -> int:
    with _client(args) as client:
        op = client.retrain(
            args.model, request_id=args.request_id, wait=not args.no_wait, on_progress=_progress
        )
    if _operation_failed(op):
        return EXIT_ERROR
    r = op.retrain_receipt
    if r is not None:
        print(
            f"version {r.parent_version} -> {r.new_version}: retrained on {r.training_samples} "
            f"samples; test accuracy {r.parent_test_accuracy:.3f} -> {r.test_accuracy:.3f}; "
            f"noise budget reset to {r.budget_total:g}; {r.seconds:.2f} s"
        )
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    with _client(args) as client:
        op = client.forget(
            args.model,
            sample_ids=args.sample,
            owner_ids=args.owner,
            sample_keys=args.sample_key,
            request_id=args.request_id,
            wait=not args.no_wait,
            on_progress=_progress,
            selection=args.selection,
            parameter_budget=args.budget,
        )
    if _operation_failed(op):
        return EXIT_ERROR
    if op.receipt is not None:
        r = op.receipt
        print(
            f"version {r.parent_version} -> {r.new_version}: removed {r.removed_samples} samples "
            f"of {r.removed_owners} owners; updated {r.parameters_updated}/{r.parameters_total} "
            f"parameters; test accuracy {r.before.test_accuracy:.3f} -> {r.after.test_accuracy:.3f}; "
            f"MIA AUC {r.before.mia_auc:.3f} -> {r.after.mia_auc:.3f}; {r.seconds:.2f} s"
        )
        print(f"path: {r.policy.path} ({r.policy.reason})")
        m = r.method
        if m.selection != "retrain":
            count = (
                f"{r.parameters_updated} entries: at least {m.parameter_budget}, grown to "
                f"{m.step_coverage:.0%} of the ranked step"
                if m.step_coverage
                else f"{m.parameter_budget} entries at most"
            )
            print(
                f"method: {m.selection} ({count}"
                + (f"; {m.candidate_parameters} candidates" if m.candidate_parameters else "")
                + f"), {m.hessian} Hessian "
                f"on {m.hessian_samples} samples, {m.newton_iterations_taken}/"
                f"{m.newton_iterations} Newton steps, seed {m.seed}; retained gradient before "
                f"{r.retained_gradient_norm_before:.3g}"
            )
        print(r.certificate.statement)
        if r.accuracy_collapse is not None:
            c = r.accuracy_collapse
            print(
                f"accuracy collapse: the update cost {c.drop_points:.1f} points (limit "
                f"{c.limit_points:g}); action: {c.action}"
                + (f", exact retrain {c.retrain_operation}" if c.retrain_operation else "")
            )
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    inputs = _load_inputs(args.inputs)
    with _client(args) as client:
        results = list(
            client.scan(
                args.model,
                inputs,
                estimator=args.estimator,
                mitigate=args.mitigate,
                dry_run=args.dry_run,
            )
        )
    for r in results:
        flag = "FLAGGED" if r.flagged else "clean"
        print(
            f"{r.index}\tlabel={r.predicted_label}\tp={r.p_value:.3g}\t"
            f"score={r.target_score:.2f}\t{flag}\t{r.decision}"
        )
    mitigation = next((r.mitigation for r in results if r.mitigation is not None), None)
    if mitigation is not None:
        print(f"mitigation: {mitigation.decision}")
        if mitigation.applied:
            print(f"forgot {len(mitigation.sample_ids)} samples: {mitigation.operation}")
        else:
            ids = " ".join(str(i) for i in mitigation.sample_ids)
            print(f"attack set ({'dry run' if mitigation.dry_run else 'not applied'}): {ids}")
    if args.report:
        from expunge.client.report import write_scan_report

        write_scan_report(Path(args.report), inputs, results)
        print(f"report written to {args.report}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for e in client.audit(args.model or ""):
            print(
                f"{e.time}  {e.actor}  {e.action}  {e.resource}  {json.dumps(e.details, sort_keys=True)}"
            )
    return 0


def _operation_arguments(p: argparse.ArgumentParser) -> None:
    """What every command that starts an operation takes."""
    p.add_argument("model", nargs="?", default="digits", help="model name (default: digits)")
    p.add_argument("--request-id", default=None, help="idempotency key (default: random)")
    p.add_argument("--no-wait", action="store_true", help="return the operation at once")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expunge",
        description="Expunge: make a served model forget training data, and scan inputs for "
        "training-set attacks.",
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("EXPUNGE_TARGET", "127.0.0.1:50051"),
        help="server address (default: %(default)s; env EXPUNGE_TARGET)",
    )
    parser.add_argument("--token", default=None, help="bearer token (or env EXPUNGE_TOKEN)")
    parser.add_argument("--tls-ca", default=None, help="CA certificate: connect with TLS")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-call deadline in seconds")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the server")
    p.add_argument("--config", help="TOML settings file")
    p.add_argument("--state-dir", help="state directory (database and blobs)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 50051)")
    p.add_argument(
        "--device",
        choices=DEVICES,
        default=None,
        help="where training, forgets, scans and the index compute (default: the "
        "config's, else auto: cuda when present)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="train a digits model, serve it, and call it (self-contained)")
    p.add_argument("--state-dir", help="keep the demo's state here (default: a temp dir)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a model into a state directory (version 1)")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--name", required=True, help="model name, e.g. digits")
    p.add_argument(
        "--dataset", default="digits", help="digits, breast_cancer, wine, or a .npz path"
    )
    p.add_argument("--architecture", default="mlp", help="logreg, mlp, cnn or resnet")
    p.add_argument("--hidden", type=int, nargs="*", default=[32], help="MLP hidden widths")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device", choices=DEVICES, default="auto", help="where to train (auto: cuda when present)"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "import",
        help="import a model trained elsewhere from a repository directory (expunge.toml) "
        "as version 1: uploaded to the server, or offline with --state-dir",
    )
    p.add_argument("directory", help="the repository: expunge.toml and the files it names")
    p.add_argument(
        "--state-dir",
        help="import offline into this state directory (server stopped); without it the "
        "repository is uploaded to the server at --target (admin token)",
    )
    p.add_argument("--name", required=True, help="model name to serve it under")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "prune",
        help="delete the weights of versions trained on forgotten samples (server stopped)",
    )
    p.add_argument("--state-dir", required=True)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("models", help="list the served models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("versions", help="list a model's versions")
    p.add_argument("model")
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser("predict", help="predict labels for inputs in a .npz ('inputs' array)")
    p.add_argument("model")
    p.add_argument("inputs")
    p.add_argument("--version", type=int, default=0)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("forget", help="forget samples and/or owners, with progress")
    _operation_arguments(p)
    p.add_argument("--owner", action="append", default=[], help="owner id (repeatable)")
    p.add_argument("--sample", action="append", type=int, default=[], help="sample id (repeatable)")
    p.add_argument(
        "--sample-key",
        action="append",
        default=[],
        help="string sample id of a model imported with them, e.g. a UUID (repeatable)",
    )
    p.add_argument(
        "--selection",
        default="",
        choices=["", "auto", "retrain", "lcodec_cg", "lcodec", "cg", "all", "output"],
        help="how to forget (default auto: the exact retrain when cheap, else Newton on "
        "every parameter when it fits, else lcodec_cg; the receipt says which and why)",
    )
    p.add_argument("--budget", type=int, default=0, help="most parameters touched (0: default)")
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser(
        "retrain", help="retrain exactly on the current data (a fresh noise budget), with progress"
    )
    _operation_arguments(p)
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("scan", help="scan inputs for training-set attack targets")
    p.add_argument("inputs", help=".npz with an 'inputs' array")
    p.add_argument("--model", default="digits")
    p.add_argument("--estimator", default="gas", help="gas, lgas, tracincp or gas+tracincp")
    p.add_argument(
        "--mitigate",
        action="store_true",
        help="forget the flagged inputs' attack set once its removal is confirmed, then rescan",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="show the attack set --mitigate would forget"
    )
    p.add_argument("--report", help="write an HTML report here")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("audit", help="list audit events")
    p.add_argument("--model", default="")
    p.set_defaults(func=cmd_audit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
    except ExpungeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.command in ("serve", "demo") and argv is None:
        # The server has stopped and everything is durable. Interpreter teardown with torch,
        # faiss (OpenMP) and gRPC threads loaded can abort in native destructors, which would
        # turn a clean exit into SIGABRT; end the process directly instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
