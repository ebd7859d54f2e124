"""How a command module registers its subcommands: each leaf takes ``--json`` too, so the
flag works before or after the command name."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .output import Outcome

Handler = Callable[[argparse.Namespace], Outcome]
Subparsers = argparse._SubParsersAction  # the object add_subparsers() returns

JSON_HELP = (
    "print exactly one JSON document on stdout (the result; with an error, "
    '{"error": {...}}); messages and progress stay on stderr'
)


def add_command(
    sub: Subparsers, name: str, help: str, handler: Handler, description: str = ""
) -> argparse.ArgumentParser:
    """A subcommand whose ``func`` is ``handler`` and whose ``command_name`` is its prog."""
    p: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=description or help[:1].upper() + help[1:] + ".",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # SUPPRESS: when absent here, the global --json (before the command) stands.
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=JSON_HELP)
    p.set_defaults(func=handler, command_name=p.prog)
    return p


def add_group(sub: Subparsers, name: str, help: str) -> Subparsers:
    """A command with subcommands of its own (``operations list|get|watch|cancel``)."""
    p = sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".")
    return p.add_subparsers(dest=f"{name}_command", required=True, metavar="SUBCOMMAND")


def non_negative_int(text: str) -> int:
    """An argparse ``type``: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not at least 1")
    return value
