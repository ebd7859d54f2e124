"""``predict``, ``neighbors``, ``scan`` and ``estimate``: calls that take inputs from an .npz."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from ..types import ESTIMATORS
from .connection import open_client
from .failures import CommandError
from .inputs import read_inputs
from .model_choice import choose_model
from .output import Outcome, table
from .subcommands import Subparsers, add_command, non_negative_int, positive_int

INPUTS_HELP = ".npz file with an 'inputs' array (n, *input_shape)"


def cmd_predict(args: argparse.Namespace) -> Outcome:
    inputs = read_inputs(args.inputs)
    with open_client(args) as client:
        result = client.predict(args.model, inputs, version=args.version)
    lines = [
        f"{i}\t{label}\t{float(probs.max()):.3f}"
        for i, (label, probs) in enumerate(zip(result.labels, result.probabilities, strict=True))
    ]
    return Outcome(result, lines)


def cmd_neighbors(args: argparse.Namespace) -> Outcome:
    inputs = read_inputs(args.inputs)
    with open_client(args) as client:
        result = client.neighbors(args.model, inputs, k=args.k, mode=args.mode, label=args.label)
    keyed = any(n.sample_key for lst in result.neighbors for n in lst)
    header = ("INPUT", "RANK", "SAMPLE", "OWNER", "LABEL", "SCORE") + (("KEY",) if keyed else ())
    rows = [
        (i, rank, n.sample_id, n.owner_id, n.label, f"{n.score:.4g}")
        + ((n.sample_key,) if keyed else ())
        for i, lst in enumerate(result.neighbors)
        for rank, n in enumerate(lst, start=1)
    ]
    notes = (
        [
            f"the index embeds version {result.embedded_version}; the model is at version "
            f"{result.model_version} (it is being rebuilt)"
        ]
        if result.stale
        else []
    )
    return Outcome(result, table(header, rows), notes=notes)


def cmd_scan(args: argparse.Namespace) -> Outcome:
    inputs = read_inputs(args.inputs)
    if args.report:
        _check_report(Path(args.report))
    with open_client(args) as client:
        model = choose_model(client, args.model)
        results = list(
            client.scan(
                model,
                inputs,
                estimator=args.estimator,
                max_implicated=args.max_implicated,
                mitigate=args.mitigate,
                dry_run=args.dry_run,
            )
        )
    lines = [
        f"{r.index}\tlabel={r.predicted_label}\tp={r.p_value:.3g}\t"
        f"score={r.target_score:.2f}\t{'FLAGGED' if r.flagged else 'clean'}\t{r.decision}"
        for r in results
    ]
    mitigation = next((r.mitigation for r in results if r.mitigation is not None), None)
    if mitigation is not None:
        lines.append(f"mitigation: {mitigation.decision}")
        if mitigation.applied:
            lines.append(f"forgot {len(mitigation.sample_ids)} samples: {mitigation.operation}")
        else:
            ids = " ".join(str(i) for i in mitigation.sample_ids)
            lines.append(
                f"attack set ({'dry run' if mitigation.dry_run else 'not applied'}): {ids}"
            )
    if args.report:
        from ..report import write_scan_report

        try:
            write_scan_report(Path(args.report), inputs, results)
        except ImportError as exc:
            raise CommandError(str(exc)) from None
        lines.append(f"report written to {args.report}")
    document = {"model": model, "results": results, "report": args.report}
    return Outcome(document, lines)


def _check_report(path: Path) -> None:
    """Refuse a report that cannot be written before scanning, not after."""
    if importlib.util.find_spec("matplotlib") is None:
        raise CommandError(
            "--report draws charts with matplotlib, which this install lacks: "
            "pip install matplotlib (or expunge[server])"
        )
    if not path.parent.is_dir():
        raise CommandError(f"--report {path}: no directory {path.parent}")


def cmd_estimate(args: argparse.Namespace) -> Outcome:
    inputs = read_inputs(args.inputs)
    with open_client(args) as client:
        e = client.estimate_scan(
            args.model, inputs, args.estimator, mitigate=args.mitigate, dry_run=args.dry_run
        )
    lines = [
        f"a scan of {e.inputs} inputs against {e.training_samples} training samples and "
        f"{e.checkpoints} checkpoints: about {e.estimated_seconds:.3g} s and "
        f"{e.estimated_bytes / 2**20:.1f} MiB",
        f"scoring {e.estimated_scoring_seconds:.3g} s; calibration "
        + (
            "stored already"
            if e.calibrated
            else f"{e.estimated_calibration_seconds:.3g} s (once per version)"
        )
        + f"; confirmation {e.estimated_confirmation_seconds:.3g} s; mitigation "
        f"{e.estimated_mitigation_seconds:.3g} s",
    ]
    return Outcome(e, lines)


def _estimator(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--estimator",
        default="",
        choices=("", *ESTIMATORS),
        metavar="{" + ",".join(ESTIMATORS) + "}",
        help="influence estimator (default: the server's, gas)",
    )


def _planning(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mitigate",
        action="store_true",
        help="forget the flagged inputs' attack set once its removal is confirmed, then rescan",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="show the attack set --mitigate would forget"
    )


def register(sub: Subparsers) -> None:
    p = add_command(
        sub,
        "predict",
        "predict labels; prints index, label and confidence per input, tab-separated",
        cmd_predict,
    )
    p.add_argument("model", help="model name, e.g. digits")
    p.add_argument("inputs", help=INPUTS_HELP)
    p.add_argument(
        "--version",
        type=non_negative_int,
        default=0,
        help="model version to ask (default 0: the current one)",
    )

    p = add_command(
        sub,
        "neighbors",
        "the training samples nearest each input in the gradient index (with owners)",
        cmd_neighbors,
    )
    p.add_argument("model", help="model name, e.g. digits")
    p.add_argument("inputs", help=INPUTS_HELP)
    p.add_argument(
        "-k", type=positive_int, default=10, help="neighbours per input (default %(default)s)"
    )
    p.add_argument(
        "--mode",
        default="proponents",
        choices=("proponents", "opponents"),
        help="proponents (support the prediction; default) or opponents",
    )
    p.add_argument("--label", type=int, default=None, help="only training samples with this label")

    p = add_command(sub, "scan", "scan inputs for training-set attack targets", cmd_scan)
    p.add_argument("inputs", help=INPUTS_HELP)
    p.add_argument(
        "--model",
        default=None,
        help="model name (may be left out when the server holds one model)",
    )
    _estimator(p)
    p.add_argument(
        "--max-implicated",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="training samples named per flagged input (default 0: the server's)",
    )
    _planning(p)
    p.add_argument("--report", metavar="FILE", help="also write an HTML report here")

    p = add_command(
        sub,
        "estimate",
        "what a scan of these inputs will cost (seconds, memory) before running it",
        cmd_estimate,
    )
    p.add_argument("model", help="model name, e.g. digits")
    p.add_argument("inputs", help=INPUTS_HELP)
    _estimator(p)
    _planning(p)
