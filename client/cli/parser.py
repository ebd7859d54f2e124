"""The ``expunge`` argument parser: global options, then one subcommand per RPC family."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata
from typing import Any, NoReturn

from . import (
    commands_data,
    commands_forget,
    commands_models,
    commands_operations,
    commands_server,
    commands_service,
    commands_state,
    exit_codes,
)
from .connection import default_target
from .failures import CommandError
from .subcommands import JSON_HELP

DISTRIBUTION = "expunge"
EPILOG = f"""\
Output: results on stdout (tables with a header row, or with --json exactly one JSON
document); progress, notes and errors on stderr, errors as one line. Progress bars
redraw only on a terminal. A long operation's name is printed as soon as it is
accepted: follow it again with 'expunge operations watch NAME'.

{exit_codes.help_epilog()}
"""


class Parser(argparse.ArgumentParser):
    """Usage errors raise instead of exiting, so ``main`` reports them like any other
    failure: one line on stderr (and a JSON error object with --json), exit 2."""

    def error(self, message: str) -> NoReturn:
        raise CommandError(f"{message} (see: {self.prog} --help)", prog=self.prog)


def version() -> str:
    """The installed distribution's version; the package's own when it is not installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        import expunge

        return str(getattr(expunge, "__version__", "unknown"))


class _Version(argparse.Action):
    """``--version``: ``expunge X.Y.Z``, or ``{"version": ...}`` after --json."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, *_: Any
    ) -> None:
        if getattr(namespace, "json", False):
            print(json.dumps({"version": version()}))
        else:
            print(f"{DISTRIBUTION} {version()}")
        sys.stdout.flush()
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="expunge",
        description="Expunge: make a served model forget training data, and scan inputs for "
        "training-set attacks.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version)
    parser.add_argument("--json", action="store_true", help=JSON_HELP + " (also after the command)")
    parser.add_argument(
        "--target",
        default=default_target(),
        help="server address (default: %(default)s; env EXPUNGE_TARGET)",
    )
    parser.add_argument("--token", default=None, help="bearer token (or env EXPUNGE_TOKEN)")
    parser.add_argument(
        "--tls-ca", default=None, metavar="FILE", help="CA certificate: connect with TLS"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="deadline of each call in seconds (default %(default)g)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (
        commands_server,
        commands_state,
        commands_models,
        commands_data,
        commands_forget,
        commands_operations,
        commands_service,
    ):
        module.register(sub)
    return parser
