"""``main``: parse, run one command, print its outcome; every foreseeable failure becomes
one line on stderr and an exit code from exit_codes (no traceback)."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence

from . import exit_codes
from .failures import CommandError, Failure, describe
from .output import Outcome, emit, error_document
from .parser import build_parser

# Commands after which the process ends at once (see main).
SERVER_COMMANDS = ("serve", "demo")


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    # Until the command line is parsed, a usage error answers in JSON if --json is there.
    as_json = "--json" in arguments
    prog = "expunge"
    command = ""
    try:
        args = build_parser().parse_args(arguments)
        as_json, prog, command = args.json, args.command_name, args.command
        code = _finish(args.func(args), as_json, prog)
    except BrokenPipeError:
        return _reader_gone()
    except (Exception, KeyboardInterrupt) as exc:
        failure = describe(exc)
        if failure is None:
            raise  # a bug: keep the traceback
        if isinstance(exc, CommandError) and exc.prog:
            prog = exc.prog
        try:
            code = _report(failure, prog, as_json)
        except BrokenPipeError:
            return _reader_gone()
    if command in SERVER_COMMANDS and argv is None:
        # The server has stopped and everything is durable. Interpreter teardown with torch,
        # faiss (OpenMP) and gRPC threads loaded can abort in native destructors, which would
        # turn a clean exit into SIGABRT; end the process directly instead, once the
        # server's log records still queued are written.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _finish(outcome: Outcome, as_json: bool, prog: str) -> int:
    emit(outcome, as_json)
    for note in outcome.notes:
        print(f"{prog}: {note}", file=sys.stderr)
    if outcome.error:
        print(f"{prog}: {outcome.error}", file=sys.stderr)
    return outcome.exit_code


def _report(failure: Failure, prog: str, as_json: bool) -> int:
    """One line on stderr; with --json also the error object on stdout."""
    print(f"{prog}: {failure.message}", file=sys.stderr, flush=True)
    if as_json:
        document = error_document(prog, failure.status, failure.exit_code, failure.message)
        print(json.dumps(document, sort_keys=True), flush=True)
    return failure.exit_code


def _reader_gone() -> int:
    """stdout's reader closed it (``| head``): stop quietly. Point stdout at /dev/null so
    the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (a test's capture)
        pass
    return exit_codes.BROKEN_PIPE
