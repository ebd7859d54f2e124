"""A self-contained HTML report of a scan: charts and thumbnails inline, no JavaScript.

matplotlib is imported only when a report is written, so the base client install
(which has no matplotlib) can still import this module.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .types import ImplicatedSample, ScanResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["write_scan_report"]

# Beyond these the page gets long without telling an analyst more.
MAX_UNFLAGGED_ROWS = 50
MAX_FLAGGED_DETAILS = 100
THUMB_PX = 40
IMPLICATED_THUMB_PX = 28
DETAIL_THUMB_PX = 112

_FLAGGED_COLOR = "#c0392b"
_CLEAN_COLOR = "#7f95b5"
_UNCONFIRMED_COLOR = "#e0a33a"
_INSTALL_HINT = "pip install 'expunge[server]'"


def write_scan_report(
    path: Path,
    inputs: np.ndarray,
    results: Sequence[ScanResult],
    title: str = "Expunge scan report",
    training_images: Mapping[int, np.ndarray] | None = None,
) -> None:
    """Write one HTML file summarising a scan.

    inputs: the scanned batch, (n, *input_shape); (n, 1, H, W), (n, 3, H, W) and
    (n, H, W) are drawn as thumbnails, anything else (e.g. tabular (n, d)) is not.
    results: one ScanResult per input, ``result.index`` pointing into ``inputs``.
    training_images: sample id -> image ((1, H, W), (3, H, W) or (H, W)) for
    thumbnails of implicated training samples; ids missing from it are skipped.
    Raises ImportError (with an install hint) when matplotlib is missing.
    """
    _require_matplotlib()
    inputs = np.asarray(inputs)
    images = _ImageSource(inputs, results, training_images or {})
    flagged = sorted((r for r in results if r.flagged), key=_by_score)
    unflagged = sorted((r for r in results if not r.flagged), key=_by_score)
    mitigated = [r for r in results if r.mitigation is not None]

    parts = [
        _header(title, inputs, results, flagged),
        _score_section(results),
        _inputs_section(flagged, unflagged, images),
        _flagged_section(flagged, images),
    ]
    if mitigated:
        parts.append(_mitigation_section(mitigated))
    body = "\n".join(parts)
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )
    Path(path).write_text(page, encoding="utf-8")


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"write_scan_report draws its charts with matplotlib, which the client install leaves out: {_INSTALL_HINT}"
        ) from exc


def _by_score(r: ScanResult) -> tuple[float, float, int]:
    """Most suspicious first: smallest p-value, then largest influence score."""
    score = r.target_score if math.isfinite(r.target_score) else -math.inf
    return (r.p_value, -score, r.index)


def _passed(r: ScanResult) -> bool:
    return r.p_value <= r.threshold


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def _distinct(values: Iterable[float | int]) -> list[float | int]:
    return sorted(set(values))


# --- sections -----------------------------------------------------------------


def _header(
    title: str, inputs: np.ndarray, results: Sequence[ScanResult], flagged: list[ScanResult]
) -> str:
    scanned = str(len(results))
    if inputs.ndim > 0 and len(inputs) != len(results):
        scanned += f" <small>of {len(inputs)} sent</small>"
    thresholds = _distinct(r.threshold for r in results)
    versions = _distinct(r.model_version for r in results)
    applied = sum(r.mitigation is not None and r.mitigation.applied for r in results)
    stats = [
        ("inputs scanned", scanned),
        ("passed the filter", str(sum(_passed(r) for r in results))),
        ("flagged", f'<span class="{"bad" if flagged else "ok"}">{len(flagged)}</span>'),
        ("filter p-value cut", _e(", ".join(_num(t) for t in thresholds)) or "—"),
        ("model version", _e(", ".join(str(v) for v in versions)) or "—"),
    ]
    if applied:
        stats.append(("mitigated", str(applied)))
    cards = "".join(f"<div><dt>{label}</dt><dd>{value}</dd></div>" for label, value in stats)
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    shape = "×".join(str(d) for d in inputs.shape[1:]) or "scalar"
    return (
        f"<header><h1>{_e(title)}</h1>"
        f'<p class="muted">Generated {generated} · input shape {_e(shape)} · '
        "an input passes the first filter when its p-value against the clean calibration "
        "inputs is at most the cut; it is flagged when removing its top proponents lowers "
        "its predicted class's probability by at least the calibrated drop and removing as "
        "many random samples of that label does not</p>"
        f'<dl class="stats">{cards}</dl></header>'
    )


def _score_section(results: Sequence[ScanResult]) -> str:
    if not results:
        return '<section><h2>Target scores</h2><p class="muted">No results.</p></section>'
    png = _score_histogram(results)
    return (
        "<section><h2>p-values</h2>"
        f'<img class="chart" src="{_data_uri(png)}" alt="histogram of p-values with the filter cut">'
        '<p class="muted">Inputs at or left of a dashed line passed the filter; of those, the '
        "red ones were confirmed and flagged, the amber ones were not.</p>"
        "</section>"
    )


def _inputs_section(
    flagged: list[ScanResult], unflagged: list[ScanResult], images: _ImageSource
) -> str:
    out = ["<section><h2>Inputs</h2>"]
    if flagged:
        out.append(f"<h3>Flagged ({len(flagged)}, smallest p-value first)</h3>")
        out.append(_input_table(flagged, images, link=True))
    else:
        passed = sum(_passed(r) for r in unflagged)
        out.append(
            f'<p class="ok-note">No input was flagged: {passed} passed the filter and none '
            "was confirmed.</p>"
        )
    if unflagged:
        shown = unflagged[:MAX_UNFLAGGED_ROWS]
        count = (
            f"{len(unflagged)}"
            if len(shown) == len(unflagged)
            else f"showing {len(shown)} of {len(unflagged)}"
        )
        out.append(
            f"<details><summary>Not flagged ({count}, smallest p-value first)</summary>"
            f"{_input_table(shown, images, link=False)}"
        )
        if len(shown) < len(unflagged):
            out.append(f'<p class="muted">{len(unflagged) - len(shown)} more not shown.</p>')
        out.append("</details>")
    out.append("</section>")
    return "".join(out)


def _input_table(rows: list[ScanResult], images: _ImageSource, link: bool) -> str:
    thumbs = images.inputs_are_images
    head = "<th>index</th>" + ("<th>input</th>" if thumbs else "")
    head += (
        '<th>predicted label</th><th class="num">p-value</th><th class="num">score</th>'
        '<th class="num">drop (needed)</th><th class="num">control drop</th><th>flag</th>'
    )
    body = []
    for r in rows:
        index = f'<a href="#input-{r.index}">#{r.index}</a>' if link else f"#{r.index}"
        cells = f"<td>{index}</td>"
        if thumbs:
            cells += f"<td>{images.input_thumb(r.index, THUMB_PX)}</td>"
        cells += (
            f"<td>{r.predicted_label}</td>"
            f'<td class="num">{_num(r.p_value)}</td>'
            f'<td class="num">{_num(r.target_score)}</td>'
            f'<td class="num">{_confirmation_cell(r)}</td>'
            f'<td class="num">{_num(r.control_drop) if r.counterfactual_drop >= r.drop_threshold and _passed(r) else "—"}</td>'
            f"<td>{_flag_badge(r.flagged)}</td>"
        )
        body.append(f'<tr class="{"flagged" if r.flagged else ""}">{cells}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _confirmation_cell(r: ScanResult) -> str:
    if not _passed(r):
        return "—"
    return f"{_num(r.counterfactual_drop)} ({_num(r.drop_threshold)})"


def _flag_badge(flagged: bool) -> str:
    return (
        '<span class="badge bad">flagged</span>' if flagged else '<span class="badge">clean</span>'
    )


def _flagged_section(flagged: list[ScanResult], images: _ImageSource) -> str:
    if not flagged:
        return ""
    shown = flagged[:MAX_FLAGGED_DETAILS]
    out = ["<section><h2>Implicated training samples</h2>"]
    if len(shown) < len(flagged):
        out.append(
            f'<p class="muted">Details for the {len(shown)} most suspicious of {len(flagged)} flagged inputs.</p>'
        )
    out.extend(_flagged_detail(r, images) for r in shown)
    out.append("</section>")
    return "".join(out)


def _flagged_detail(r: ScanResult, images: _ImageSource) -> str:
    implicated = sorted(r.implicated, key=lambda s: (-s.z, s.sample_id))
    thumb = images.input_thumb(r.index, DETAIL_THUMB_PX) if images.inputs_are_images else ""
    facts = (
        f"predicted label <b>{r.predicted_label}</b> · p-value <b>{_num(r.p_value)}</b> "
        f"(cut {_num(r.threshold)}; influence alone {_num(r.influence_p_value)}; its top "
        f"proponents' training-side z {_num(r.group_outlier_z)}) · influence score "
        f"{_num(r.target_score)} · drop <b>{_num(r.counterfactual_drop)}</b> (needed "
        f"{_num(r.drop_threshold)}; control {_num(r.control_drop)}) · model version {r.model_version}"
    )
    out = [
        f'<article id="input-{r.index}"><h3>Input #{r.index}</h3>',
        f'<div class="detail-head">{thumb}<div><p>{facts}</p><p class="muted">{_e(r.decision)}</p>'
        f"{_implicated_summary(implicated)}</div></div>",
    ]
    if not implicated:
        out.append('<p class="muted">The scan returned no implicated samples.</p></article>')
        return "".join(out)
    chart = _data_uri(_z_bar_chart(implicated))
    out.append(
        '<div class="detail-body">'
        f"{_implicated_table(implicated, images)}"
        f'<img class="chart z" src="{chart}" alt="z-scores of the implicated samples of input {r.index}">'
        "</div></article>"
    )
    return "".join(out)


def _implicated_summary(implicated: list[ImplicatedSample]) -> str:
    if not implicated:
        return ""
    owners = Counter(s.owner_id for s in implicated).most_common(5)
    labels = Counter(s.label for s in implicated).most_common(5)
    owner_text = ", ".join(f"{_e(o)} ×{n}" for o, n in owners)
    label_text = ", ".join(f"{label} ×{n}" for label, n in labels)
    return (
        f'<p class="muted">{len(implicated)} implicated samples · '
        f"owners: {owner_text} · labels: {label_text}</p>"
    )


def _implicated_table(implicated: list[ImplicatedSample], images: _ImageSource) -> str:
    thumbs = images.has_training_images
    head = "<th>rank</th>" + ("<th>image</th>" if thumbs else "")
    head += (
        '<th>sample id</th><th>owner id</th><th>label</th><th class="num">influence</th>'
        '<th class="num">z</th><th class="num">class-outlier z</th><th>why named</th>'
    )
    rows = []
    for rank, s in enumerate(implicated, start=1):
        cells = f"<td>{rank}</td>"
        if thumbs:
            cells += f"<td>{images.training_thumb(s.sample_id, IMPLICATED_THUMB_PX)}</td>"
        cells += (
            f'<td>{s.sample_id}</td><td class="owner">{_e(s.owner_id)}</td><td>{s.label}</td>'
            f'<td class="num">{_num(s.influence)}</td><td class="num">{_num(s.z)}</td>'
            f'<td class="num">{_num(s.class_outlier_z)}</td><td>{_e(s.reason)}</td>'
        )
        rows.append(f"<tr>{cells}</tr>")
    return (
        f'<table class="implicated"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _mitigation_section(mitigated: list[ScanResult]) -> str:
    first = min(mitigated, key=lambda r: r.index).mitigation
    assert first is not None
    if first.applied:
        verdict = (
            f"The attack set of {len(first.sample_ids)} samples was forgotten "
            f"(<code>{_e(first.operation)}</code>, version {first.new_version}; test accuracy "
            f"{first.test_accuracy_before:.2%} → {first.test_accuracy_after:.2%}) and the "
            "flagged inputs were scanned again."
        )
    elif first.dry_run:
        verdict = f"Dry run: the attack set of {len(first.sample_ids)} samples was not forgotten."
    else:
        verdict = "Nothing was forgotten: the attack set was not confirmed."
    rows = []
    for r in sorted(mitigated, key=lambda r: r.index):
        m = r.mitigation
        assert m is not None
        if m.applied:
            changed = (
                '<span class="badge ok">changed</span>'
                if m.prediction_changed
                else '<span class="badge bad">unchanged</span>'
            )
            after = f"{r.predicted_label} → {m.predicted_label_after}"
            p_after = _num(m.p_value_after)
        else:
            changed, after, p_after = "—", f"{r.predicted_label}", "—"
        rows.append(
            f"<tr><td>#{r.index}</td><td>{after}</td><td>{changed}</td>"
            f'<td class="num">{_num(r.p_value)} → {p_after}</td></tr>'
        )
    ids = ", ".join(str(i) for i in first.sample_ids[:200])
    more = f" … ({len(first.sample_ids) - 200} more)" if len(first.sample_ids) > 200 else ""
    return (
        "<section><h2>Mitigation</h2>"
        f'<p>{verdict}</p><p class="muted">{_e(first.decision)}</p>'
        f'<p class="muted">Attack set: {ids}{more}</p>'
        "<table><thead><tr><th>input</th><th>prediction before → after</th><th>prediction</th>"
        '<th class="num">p-value before → after</th>'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


# --- images and charts ------------------------------------------------------------


class _ImageSource:
    """Thumbnails of inputs and training samples, on one grey scale per source."""

    def __init__(
        self,
        inputs: np.ndarray,
        results: Sequence[ScanResult],
        training_images: Mapping[int, np.ndarray],
    ) -> None:
        self.inputs = inputs
        self.inputs_are_images = (
            inputs.ndim >= 2 and len(inputs) > 0 and _display_image(inputs[0]) is not None
        )
        self.input_range = _value_range([inputs]) if self.inputs_are_images else (0.0, 1.0)
        wanted = {s.sample_id for r in results if r.flagged for s in r.implicated}
        self.training = {
            i: img
            for i in wanted
            if i in training_images
            and (img := _display_image(np.asarray(training_images[i]))) is not None
        }
        self.has_training_images = bool(self.training)
        self.training_range = _value_range(self.training.values())

    def input_thumb(self, index: int, px: int) -> str:
        if not 0 <= index < len(self.inputs):
            return ""
        image = _display_image(self.inputs[index])
        if image is None:
            return ""
        return _img_tag(image, self.input_range, px, f"input {index}")

    def training_thumb(self, sample_id: int, px: int) -> str:
        image = self.training.get(sample_id)
        if image is None:
            return '<span class="muted">—</span>'
        return _img_tag(image, self.training_range, px, f"training sample {sample_id}")


def _display_image(x: np.ndarray) -> np.ndarray | None:
    """(1, H, W) or (H, W) -> (H, W); (3, H, W) -> (H, W, 3); None for anything else."""
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    elif x.ndim == 3 and x.shape[0] == 3:
        x = np.moveaxis(x, 0, -1)
    elif x.ndim != 2:
        return None
    if min(x.shape[:2]) < 2 or not np.issubdtype(x.dtype, np.number):
        return None
    return np.asarray(x, dtype=np.float64)


def _value_range(arrays: Iterable[np.ndarray]) -> tuple[float, float]:
    lo, hi = math.inf, -math.inf
    for a in arrays:
        finite = np.asarray(a, dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    if not lo < hi:
        return (lo, lo + 1.0) if math.isfinite(lo) else (0.0, 1.0)
    return lo, hi


def _img_tag(image: np.ndarray, value_range: tuple[float, float], px: int, alt: str) -> str:
    from matplotlib.image import imsave

    lo, hi = value_range
    scaled = np.clip(np.nan_to_num((image - lo) / (hi - lo)), 0.0, 1.0)
    buf = io.BytesIO()
    # One image pixel per PNG pixel; the browser enlarges it without blurring.
    imsave(buf, scaled, cmap="gray", vmin=0.0, vmax=1.0, format="png")
    height, width = image.shape[:2]
    w = max(1, round(px * width / height))
    return (
        f'<img class="thumb" src="{_data_uri(buf.getvalue())}" width="{w}" height="{px}" '
        f'alt="{_e(alt)}">'
    )


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_png(fig: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _score_histogram(results: Sequence[ScanResult]) -> bytes:
    """Stacked histogram of p-values (log axis): not passing the filter, passing but not
    confirmed, flagged; every distinct filter cut as a dashed line."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    p = np.array([r.p_value for r in results], dtype=np.float64)
    p = np.clip(np.nan_to_num(p, nan=1.0), 1e-6, 1.0)
    flagged = np.array([r.flagged for r in results], dtype=bool)
    passed = np.array([_passed(r) for r in results], dtype=bool)
    cuts = [t for t in _distinct(r.threshold for r in results) if math.isfinite(t) and t > 0]
    fig = Figure(figsize=(10.0, 3.2))
    ax = fig.add_subplot()
    bins = np.logspace(np.log10(min(p.min(), *cuts) if cuts else p.min()) - 0.05, 0.0, 40)
    ax.hist(
        [p[~passed], p[passed & ~flagged], p[flagged]],
        bins=bins.tolist(),
        stacked=True,
        color=[_CLEAN_COLOR, _UNCONFIRMED_COLOR, _FLAGGED_COLOR],
        label=[
            f"did not pass the filter ({int((~passed).sum())})",
            f"passed, not confirmed ({int((passed & ~flagged).sum())})",
            f"flagged ({int(flagged.sum())})",
        ],
        edgecolor="white",
        linewidth=0.5,
    )
    ax.set_xscale("log")
    for t in cuts[:5]:
        ax.axvline(t, color="#222222", linestyle="--", linewidth=1.5)
        ax.annotate(
            f"filter cut {_num(t)}",
            xy=(t, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(4, -4),
            textcoords="offset points",
            va="top",
            fontsize=9,
        )
    ax.set_xlabel("p-value against the clean calibration inputs")
    ax.set_ylabel("inputs")
    # Above the axes, so it never hides the bars.
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=3, frameon=False, fontsize=9)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.spines[["top", "right"]].set_visible(False)
    return _figure_png(fig)


def _z_bar_chart(implicated: list[ImplicatedSample]) -> bytes:
    """Horizontal bars of z, highest first; labelled by sample id only (owner ids are user text)."""
    from matplotlib.figure import Figure

    z = np.array([s.z for s in implicated], dtype=np.float64)
    labels = [f"#{s.sample_id}" for s in implicated]
    fig = Figure(figsize=(3.6, 0.6 + 0.2 * len(implicated)))
    ax = fig.add_subplot()
    y = np.arange(len(implicated))
    ax.barh(y, np.nan_to_num(z), color=np.where(z >= 0, _FLAGGED_COLOR, _CLEAN_COLOR), height=0.7)
    ax.set_yticks(y, labels, fontsize=8)
    ax.margins(y=0.01)
    ax.invert_yaxis()
    ax.axvline(0.0, color="#222222", linewidth=0.8)
    ax.set_xlabel("z (standardised influence)", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return _figure_png(fig)


_CSS = """
:root { color-scheme: light; }
body { margin: 0; background: #f4f5f7; color: #1d232b;
  font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 0 0 12px; }
h3 { font-size: 15px; margin: 16px 0 8px; }
section, header { background: #fff; border-radius: 8px; padding: 18px 22px; margin-bottom: 18px;
  box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.muted { color: #68717d; }
.stats { display: flex; flex-wrap: wrap; gap: 12px; margin: 14px 0 0; }
.stats div { background: #f4f5f7; border-radius: 6px; padding: 8px 16px; min-width: 120px; }
.stats dt { font-size: 12px; color: #68717d; text-transform: uppercase; letter-spacing: .04em; }
.stats dd { margin: 0; font-size: 22px; font-weight: 600; }
.stats small { font-size: 13px; font-weight: 400; color: #68717d; }
.bad { color: #c0392b; } .ok { color: #2e7d32; }
.ok-note { color: #2e7d32; font-weight: 600; }
table { border-collapse: collapse; margin: 4px 0 8px; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 10px; text-align: left; vertical-align: middle; border-bottom: 1px solid #e6e8eb; }
th { font-size: 12px; color: #68717d; font-weight: 600; background: #fafbfc; }
td.num, th.num { text-align: right; }
tr.flagged td:first-child { border-left: 3px solid #c0392b; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px;
  background: #e6e8eb; color: #47505b; }
.badge.bad { background: #fbe3e0; color: #a93226; }
.badge.ok { background: #e3f2e5; color: #2e7d32; }
img.thumb { image-rendering: pixelated; image-rendering: crisp-edges; display: block;
  border: 1px solid #d5d9de; background: #000; }
img.chart { display: block; max-width: 100%; height: auto; }
img.chart.z { position: sticky; top: 8px; }
td.owner { max-width: 280px; overflow-wrap: anywhere; }
details summary { cursor: pointer; font-weight: 600; margin: 12px 0 6px; }
article { border-top: 1px solid #e6e8eb; padding-top: 6px; margin-top: 10px; }
article:first-of-type { border-top: 0; margin-top: 0; }
.detail-head { display: flex; gap: 16px; align-items: center; }
.detail-head p { margin: 2px 0; }
.detail-body { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
code { font-size: 12px; background: #f4f5f7; padding: 1px 4px; border-radius: 3px; }
"""
