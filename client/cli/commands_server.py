"""``serve`` and ``demo``: run the server (the server extra)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from .output import Outcome
from .server_side import (
    DEVICES,
    LOG_FORMATS,
    LOG_LEVELS,
    load_settings,
    refusals,
    server_module,
)
from .subcommands import Subparsers, add_command


def _narration(as_json: bool) -> contextlib.AbstractContextManager[object]:
    """With --json, what the server and the demo print goes to stderr: stdout keeps the
    one JSON document."""
    return contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()


def cmd_serve(args: argparse.Namespace) -> Outcome:
    main = server_module("main")
    settings = load_settings(
        args.config,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        host=args.host,
        port=args.port,
        device=args.device,
        metrics_port=args.metrics_port,
        log_level=args.log_level,
        log_format=args.log_format,
    )
    with refusals(), _narration(args.json):
        main.serve(settings)
    return Outcome({"served": True, "state_dir": settings.state_dir}, [])


def cmd_demo(args: argparse.Namespace) -> Outcome:
    demo = server_module("demo")
    with refusals(), _narration(args.json):
        code = demo.run_demo(state_dir=Path(args.state_dir) if args.state_dir else None)
    return Outcome({"demo": "done", "state_dir": args.state_dir}, [], int(code))


def register(sub: Subparsers) -> None:
    p = add_command(
        sub,
        "serve",
        "run the server until SIGTERM or Ctrl-C (settings: --config < EXPUNGE_* < options)",
        cmd_serve,
    )
    p.add_argument("--config", metavar="FILE", help="TOML settings file (a [server] table)")
    p.add_argument(
        "--state-dir", metavar="DIR", help="state directory: database and blobs (default .expunge)"
    )
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 50051; 0: a free one)")
    p.add_argument(
        "--device",
        choices=DEVICES,
        default=None,
        help="where training, forgets, scans and the index compute (default: the "
        "config's, else auto: cuda when present)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus /metrics over HTTP here (-1: off, the default; 0: a free port)",
    )
    p.add_argument("--log-level", choices=LOG_LEVELS, default=None, help="log level (default INFO)")
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=None,
        help="text (default), or json: one JSON object per line",
    )

    p = add_command(
        sub,
        "demo",
        "train a digits model, serve it, and call it (self-contained)",
        cmd_demo,
    )
    p.add_argument(
        "--state-dir", metavar="DIR", help="keep the demo's state here (default: a temp dir)"
    )
