"""``health`` and ``audit``: is the server serving, and what has been done to its models."""

from __future__ import annotations

import argparse
import json

from . import exit_codes
from .connection import open_client
from .output import Outcome, table
from .subcommands import Subparsers, add_command

SERVING = "SERVING"


def cmd_health(args: argparse.Namespace) -> Outcome:
    with open_client(args) as client:
        status = client.health(args.service)
    document = {"service": args.service, "status": status}
    if status == SERVING:
        return Outcome(document, [status])
    return Outcome(
        document, [status], exit_codes.RETRY_LATER, f"the server is {status}", "UNAVAILABLE"
    )


def cmd_audit(args: argparse.Namespace) -> Outcome:
    with open_client(args) as client:
        events = client.audit(args.model or "")
    header = ("TIME", "ACTOR", "ACTION", "RESOURCE", "DETAILS")
    rows = [
        (e.time, e.actor, e.action, e.resource, json.dumps(e.details, sort_keys=True))
        for e in events
    ]
    return Outcome({"events": events}, table(header, rows))


def register(sub: Subparsers) -> None:
    p = add_command(
        sub,
        "health",
        f"the standard gRPC health check: prints {SERVING} (exit 0) or another status (exit 8)",
        cmd_health,
    )
    p.add_argument(
        "--service",
        default="",
        help="service to check, e.g. expunge.v1.Expunge (default: the server as a whole)",
    )

    p = add_command(sub, "audit", "list audit events, oldest first", cmd_audit)
    p.add_argument("--model", default="", help="only this model's events (default: all)")
