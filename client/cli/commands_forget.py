"""``forget`` and ``retrain``: submit, say the operation's name, follow it to its receipt."""

from __future__ import annotations

import argparse

from ..types import SELECTIONS
from .connection import open_client
from .failures import CommandError
from .following import add_wait_timeout, submitted
from .model_choice import choose_model
from .output import Outcome
from .subcommands import Subparsers, add_command


def cmd_forget(args: argparse.Namespace) -> Outcome:
    if not (args.owner or args.sample or args.sample_key):
        raise CommandError("name what to forget: --owner, --sample or --sample-key")
    with open_client(args) as client:
        model = choose_model(client, args.model)
        op = client.forget(
            model,
            sample_ids=args.sample,
            owner_ids=args.owner,
            sample_keys=args.sample_key,
            request_id=args.request_id,
            selection=args.selection,
            parameter_budget=args.budget,
        )
        return submitted(client, op, args)


def cmd_retrain(args: argparse.Namespace) -> Outcome:
    with open_client(args) as client:
        op = client.retrain(choose_model(client, args.model), request_id=args.request_id)
        return submitted(client, op, args)


def _operation_arguments(p: argparse.ArgumentParser) -> None:
    """What every command that starts an operation takes."""
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="model name, e.g. digits (may be left out when the server holds one model)",
    )
    p.add_argument(
        "--request-id",
        default=None,
        metavar="KEY",
        help="idempotency key: a retry with the same key returns the same operation "
        "(default: random)",
    )
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="print the operation's name and exit 0 once accepted; follow it later with "
        "'expunge operations watch NAME'",
    )
    add_wait_timeout(p)


def register(sub: Subparsers) -> None:
    p = add_command(
        sub,
        "forget",
        "forget samples and/or owners; prints the operation's name, follows its progress, "
        "then the receipt",
        cmd_forget,
    )
    _operation_arguments(p)
    p.add_argument(
        "--owner", action="append", default=[], metavar="ID", help="owner id (repeatable)"
    )
    p.add_argument(
        "--sample",
        action="append",
        type=int,
        default=[],
        metavar="ID",
        help="integer sample id (repeatable)",
    )
    p.add_argument(
        "--sample-key",
        action="append",
        default=[],
        metavar="KEY",
        help="string sample id of a model imported with them, e.g. a UUID (repeatable)",
    )
    p.add_argument(
        "--selection",
        default="",
        choices=SELECTIONS,
        metavar="{" + ",".join(s for s in SELECTIONS if s) + "}",
        help="how to forget (default auto: the exact retrain when cheap, else Newton on "
        "every parameter when it fits, else lcodec_cg; the receipt says which and why)",
    )
    p.add_argument(
        "--budget",
        type=int,
        default=0,
        metavar="N",
        help="most parameters a sparse update touches (default 0: the server's)",
    )

    p = add_command(
        sub,
        "retrain",
        "retrain exactly on the current data (a fresh noise budget); prints the operation's "
        "name, follows its progress, then the receipt",
        cmd_retrain,
    )
    _operation_arguments(p)
