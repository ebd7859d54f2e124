"""``operations list|get|watch|cancel``: the forget and retrain operations on the server."""

from __future__ import annotations

import argparse
from typing import cast

from ..types import OPERATION_STATES, OperationState
from .connection import open_client
from .following import add_wait_timeout, finished, follow
from .output import Outcome, table
from .receipts import operation_lines, state_line
from .subcommands import Subparsers, add_command, add_group, non_negative_int

DEFAULT_LIST_LIMIT = 50


def cmd_list(args: argparse.Namespace) -> Outcome:
    states = [cast(OperationState, s) for s in args.state]
    with open_client(args) as client:
        ops = client.list_operations(
            model=args.model or "", states=states, limit=args.limit or None
        )
    rows = [
        (
            o.name,
            o.kind,
            o.model.removeprefix("models/"),
            o.state,
            o.phase or "-",
            o.create_time or "-",
        )
        for o in ops
    ]
    header = ("NAME", "KIND", "MODEL", "STATE", "PHASE", "CREATED")
    return Outcome({"operations": ops}, table(header, rows))


def cmd_get(args: argparse.Namespace) -> Outcome:
    with open_client(args) as client:
        op = client.get_operation(args.name)
    return Outcome(op, operation_lines(op))


def cmd_watch(args: argparse.Namespace) -> Outcome:
    with open_client(args) as client:
        return finished(follow(client, args.name, args), args)


def cmd_cancel(args: argparse.Namespace) -> Outcome:
    with open_client(args) as client:
        op = client.cancel_operation(args.name)
    line = state_line(op)
    if not op.done:
        line += "; cancel requested: it stops before its commit"
    elif op.state != "CANCELLED":
        line += "; it had finished: nothing to cancel"
    return Outcome(op, [line])


def register(sub: Subparsers) -> None:
    group = add_group(
        sub, "operations", "list, inspect, follow or cancel forget and retrain operations"
    )
    p = add_command(group, "list", "list operations, newest first", cmd_list)
    p.add_argument("--model", default=None, help="only this model's operations")
    p.add_argument(
        "--state",
        action="append",
        default=[],
        choices=OPERATION_STATES,
        help="only operations in this state (repeatable)",
    )
    p.add_argument(
        "--limit",
        type=non_negative_int,
        default=DEFAULT_LIST_LIMIT,
        metavar="N",
        help="at most this many (default %(default)s; 0: all)",
    )

    name_help = "operation name: operations/ID or ID"
    p = add_command(group, "get", "show an operation's state (and its receipt when done)", cmd_get)
    p.add_argument("name", help=name_help)

    p = add_command(
        group,
        "watch",
        "follow an operation to its end with progress; exit 0 if it SUCCEEDED, 1 if it "
        "FAILED or was CANCELLED",
        cmd_watch,
    )
    p.add_argument("name", help=name_help)
    add_wait_timeout(p)

    p = add_command(
        group,
        "cancel",
        "cancel an operation: a queued one at once, a running one before its commit",
        cmd_cancel,
    )
    p.add_argument("name", help=name_help)
