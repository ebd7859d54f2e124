"""``train``, ``import`` and ``prune``: write a state directory (``import`` may instead
upload to a running server)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .connection import open_client
from .failures import CommandError
from .output import Outcome
from .server_side import DEVICES, refusals, require_state, server_module
from .subcommands import Subparsers, add_command, positive_int

# The data sets ``expunge train`` knows by name (server/state/datasets.py BUILTIN_DATASETS).
BUILTIN_DATASETS = ("digits", "breast_cancer", "wine")
MANIFEST = "expunge.toml"


def _created(name: str, metrics: dict[str, float], verb: str) -> Outcome:
    document = {"model": name, "version": 1, "metrics": metrics}
    return Outcome(document, [f"{verb} {name} version 1: {json.dumps(metrics, sort_keys=True)}"])


def cmd_train(args: argparse.Namespace) -> Outcome:
    is_path = args.dataset not in BUILTIN_DATASETS and "://" not in args.dataset
    if is_path and not Path(args.dataset).is_file():
        raise CommandError(
            f"--dataset {args.dataset}: no such file (and not one of {', '.join(BUILTIN_DATASETS)})"
        )
    if args.test is not None and not Path(args.test).is_file():
        raise CommandError(f"--test {args.test}: no such file")
    if not 0 < args.test_fraction < 1:
        raise CommandError(
            f"--test-fraction {args.test_fraction}: must lie strictly between 0 and 1"
        )
    settings = server_module("settings")
    training_job = server_module("training_job")
    state_dir = Path(args.state_dir)
    try:
        config = settings.Settings(state_dir=state_dir, device=args.device)
        with refusals():
            info = training_job.train_model(
                state_dir=state_dir,
                name=args.name,
                dataset=args.dataset,
                architecture=args.architecture,
                epochs=args.epochs,
                seed=args.seed,
                hidden=tuple(args.hidden),
                settings=config,
                test=args.test,
                test_fraction=args.test_fraction,
            )
    except ValueError as exc:  # an architecture, data set or option the trainer refused
        raise CommandError(str(exc)) from None
    return _created(f"models/{info.row.name}", dict(info.version.metrics), "trained")


def cmd_import(args: argparse.Namespace) -> Outcome:
    directory = Path(args.directory)
    if not directory.is_dir():
        raise CommandError(f"{directory}: no such directory")
    if not (directory / MANIFEST).is_file():
        raise CommandError(f"{directory}: no {MANIFEST} manifest here")
    if not args.state_dir:  # through the server: the repository is uploaded
        with open_client(args) as client:
            served = client.import_model(directory, args.name)
        return Outcome(
            served,
            [
                f"imported {served.name} version {served.current_version}: "
                f"{json.dumps(served.metrics, sort_keys=True)}"
            ],
        )
    import_job = server_module("import_job")
    with refusals():
        info = import_job.import_model(Path(args.state_dir), directory, args.name)
    return _created(f"models/{info.row.name}", dict(info.version.metrics), "imported")


def cmd_prune(args: argparse.Namespace) -> Outcome:
    state_dir = require_state(args.state_dir)
    store_module = server_module("state.store")
    with refusals():
        store = store_module.Store(state_dir)
    try:
        pruned = store.prune_superseded_weights()
    finally:
        store.close()
    return Outcome(
        {"state_dir": state_dir, "pruned_versions": pruned},
        [f"pruned the weights of {pruned} superseded versions in {state_dir}"],
    )


def register(sub: Subparsers) -> None:
    p = add_command(
        sub,
        "train",
        "train a model into a state directory as version 1 (server stopped)",
        cmd_train,
    )
    p.add_argument("--state-dir", required=True, metavar="DIR", help="state directory to write")
    p.add_argument(
        "--name",
        required=True,
        help="model name: lowercase letters, digits and '-', e.g. digits",
    )
    p.add_argument(
        "--dataset",
        default="digits",
        help=f"{', '.join(BUILTIN_DATASETS)}, or an .npz path with features, labels, "
        "sample_ids and owner_ids (default %(default)s)",
    )
    p.add_argument(
        "--architecture",
        default="mlp",
        help="logreg, mlp, cnn or resnet (default %(default)s)",
    )
    p.add_argument(
        "--hidden",
        type=positive_int,
        nargs="*",
        default=[32],
        metavar="WIDTH",
        help="MLP hidden layer widths (default: 32)",
    )
    p.add_argument(
        "--test",
        default=None,
        metavar="FILE.npz",
        help="the held-out set (same arrays as --dataset): metrics, the forget's accuracy "
        "guard and MIA, Scan's calibration; without it --test-fraction of the rows are held out",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="share of the rows held out (seeded; never trained on) when no --test is given "
        "(default %(default)s)",
    )
    p.add_argument(
        "--epochs", type=positive_int, default=30, help="training epochs (default %(default)s)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the split, initialisation and batches (default %(default)s)",
    )
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where to train (default auto: cuda when present)",
    )

    p = add_command(
        sub,
        "import",
        "import a model trained elsewhere from a repository directory (expunge.toml) "
        "as version 1: uploaded to the server, or offline with --state-dir",
        cmd_import,
    )
    p.add_argument("directory", help="the repository: expunge.toml and the files it names")
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="import offline into this state directory (server stopped); without it the "
        "repository is uploaded to the server at --target (admin token)",
    )
    p.add_argument("--name", required=True, help="model name to serve it under")

    p = add_command(
        sub,
        "prune",
        "delete the weights of versions trained on forgotten samples (server stopped)",
        cmd_prune,
    )
    p.add_argument("--state-dir", required=True, metavar="DIR", help="the state directory")
