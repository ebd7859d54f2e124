"""Long operations: say the name as soon as the server accepts one, follow it with
progress, and when following stops early (deadline, Ctrl-C) say how to resume."""

from __future__ import annotations

import argparse
import sys

from ..client import Client
from ..errors import DeadlineExceededError
from ..types import Operation
from . import exit_codes
from .connection import command_prefix
from .failures import CommandError
from .output import Outcome
from .progress import Progress
from .receipts import operation_lines, state_line

DEFAULT_WAIT_TIMEOUT_S = 600.0
WAIT_TIMEOUT_HELP = (
    "follow the operation at most this many seconds (default %(default)g); it goes on on "
    "the server after that (exit 8 and how to resume)"
)


def add_wait_timeout(parser: argparse.ArgumentParser) -> None:
    """``--wait-timeout``: how long a command follows an operation before it stops."""
    parser.add_argument(
        "--wait-timeout",
        type=float,
        default=DEFAULT_WAIT_TIMEOUT_S,
        metavar="SECONDS",
        help=WAIT_TIMEOUT_HELP,
    )


def watch_command(args: argparse.Namespace, name: str) -> str:
    return f"{command_prefix(args)} operations watch {name}"


def accepted(op: Operation, args: argparse.Namespace) -> None:
    """One stderr line with the operation's name, before anything can go wrong."""
    print(
        f"operation {op.name} accepted; follow with: {watch_command(args, op.name)}",
        file=sys.stderr,
        flush=True,
    )


def submitted(client: Client, op: Operation, args: argparse.Namespace) -> Outcome:
    """What forget and retrain do once the server answered: name it, then follow it
    (unless ``--no-wait``, which ends here with exit 0)."""
    accepted(op, args)
    if args.no_wait:
        return Outcome(op, [state_line(op)])
    return finished(follow(client, op.name, args), args)


def follow(client: Client, name: str, args: argparse.Namespace) -> Operation:
    """The operation's final state, with progress on stderr."""
    progress = Progress()
    resume = watch_command(args, name)
    try:
        return client.wait(name, on_progress=progress.update, timeout=args.wait_timeout)
    except DeadlineExceededError:
        raise CommandError(
            f"stopped following {name} after {args.wait_timeout:g} s (DEADLINE_EXCEEDED); "
            f"it goes on on the server: resume with {resume}",
            exit_codes.RETRY_LATER,
            "DEADLINE_EXCEEDED",
        ) from None
    except KeyboardInterrupt:
        raise CommandError(
            f"interrupted; {name} goes on on the server: resume with {resume}, or stop it "
            f"with {command_prefix(args)} operations cancel {name}",
            exit_codes.INTERRUPTED,
        ) from None
    finally:
        progress.end()


def finished(op: Operation, args: argparse.Namespace) -> Outcome:
    """Exit 0 if it SUCCEEDED, 1 if it FAILED or was CANCELLED, 8 if it is still going."""
    lines = operation_lines(op)
    if op.state == "SUCCEEDED":
        return Outcome(op, lines)
    if not op.done:
        return Outcome(
            op,
            lines,
            exit_codes.RETRY_LATER,
            f"{op.name} is still {op.state}; resume with {watch_command(args, op.name)}",
            "DEADLINE_EXCEEDED",
        )
    reason = f": {op.error_message}" if op.error_message else ""
    return Outcome(op, lines, exit_codes.FAILED, f"{op.name} {op.state}{reason}", op.state)
