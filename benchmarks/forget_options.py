"""Forget options, served side by side on chosen cases: how defaults are picked (DESIGN 7).

``python -m benchmarks.forget_options --cases blobs_mlp_owner,shells_mlp_owner
--variant all:selection=all --variant lcodec:selection=lcodec_cg
[--setting forget_step_coverage=0.9]``

Each case goes through ``forget_bench``'s served path (the same training, server,
reference retrains and measures); each ``--variant NAME:KEY=VALUE,...`` is one ``Forget``
request with those options, on its own copy of the model; ``--setting`` serves every
case with that server setting. Choose defaults on development cases only: the script
refuses a held-out case unless ``--allow-held-out`` says the run is a report, not a choice.
Output: one line per case and variant, and ``--output`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.forget_bench import _cases, _run_case
from benchmarks.setting_args import parse_setting


def _pairs(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, value = parse_setting(item)
        out[key] = value
    return out


def _variant(text: str) -> tuple[str, dict[str, Any]]:
    name, _, options = text.partition(":")
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,40}", name):
        raise argparse.ArgumentTypeError(
            f"variant name {name!r}: a lower-case letter, then letters, digits or underscores"
        )
    return name, _pairs(options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", required=True, help="comma-separated case names")
    parser.add_argument("--variant", action="append", type=_variant, default=[])
    parser.add_argument("--setting", action="append", type=_pairs, default=[])
    parser.add_argument("--allow-held-out", action="store_true")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    known = {case.name: case for case in _cases(quick=False)}
    wanted = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {sorted(known)}")
    held_out = [name for name in wanted if known[name].split != "dev"]
    if held_out and not args.allow_held_out:
        parser.error(f"{held_out} are held-out cases: no default may be chosen on them")
    settings: dict[str, Any] = {}
    for pairs in args.setting:
        settings.update(pairs)
    variants = dict(args.variant) or None
    rows = []
    for name in wanted:
        case = known[name]
        case = replace(case, settings={**case.settings, **settings})
        with tempfile.TemporaryDirectory(prefix="forget-options-") as tmp:
            result = _run_case(case, Path(tmp), variants)
        for method, row in result["methods"].items():
            print(
                f"{name:28s} {method:14s} gap {row['gap_closed']:7.3f}  KL/noise "
                f"{row['kl_over_noise']:8.3g}  MIA gap {row['mia_gap']:.3f}  acc gap "
                f"{row['test_acc_gap_pts']:.2f}  entries {row.get('parameters_updated', '-')}"
                f"  {row['seconds']:.2f} s",
                flush=True,
            )
        rows.append(result)
    if args.output:
        summary = {
            "command": " ".join(["python -m benchmarks.forget_options", *(argv or sys.argv[1:])]),
            "settings": settings,
            "cases": rows,
        }
        args.output.write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
