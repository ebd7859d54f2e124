"""The HTML scan report: counts, charts, thumbnails, escaping, and no heavy imports on load."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from expunge.client.report import MAX_UNFLAGGED_ROWS, write_scan_report
from expunge.client.types import ImplicatedSample, Mitigation, ScanResult

THRESHOLD = 0.5  # the filter's p-value cut
MODEL_VERSION = 3
EVIL_OWNER = "<script>alert(1)</script>"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


class _Text(HTMLParser):
    """Visible text of a page, whitespace collapsed."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[str] = []

    def handle_data(self, data: str) -> None:
        self.chunks.append(data)


def _text(page: str) -> str:
    parser = _Text()
    parser.feed(page)
    return " ".join(" ".join(parser.chunks).split())


def _digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:n] / 16.0).astype(np.float32).reshape(n, 1, 8, 8)
    return images, digits.target[:n]


def _implicated(first_id: int, owners: list[str], label: int) -> list[ImplicatedSample]:
    return [
        ImplicatedSample(
            sample_id=first_id + k,
            owner_id=owner,
            label=label,
            influence=0.05 / (k + 1),
            z=6.0 - 0.8 * k,
            class_outlier_z=4.5 - k,
            reason=f"top-{k + 1} proponent of confirmed input(s) 2",
        )
        for k, owner in enumerate(owners)
    ]


def _results(labels: np.ndarray) -> list[ScanResult]:
    """Inputs 2 and 5 flagged (the attack set forgotten, 2 implicating a hostile owner id);
    inputs 0, 3 and 6 passed the filter but were not confirmed; the rest did not pass."""
    implicated = {
        2: _implicated(1000, ["alice", EVIL_OWNER, "alice", "bob"], label=7),
        5: _implicated(1100, ["carol", "carol", "dave"], label=1),
    }
    results = []
    for i, label in enumerate(labels):
        flagged = i in implicated
        passed = flagged or i in (0, 3, 6)
        results.append(
            ScanResult(
                index=i,
                predicted_label=int(label),
                target_score=4.0 + i / 10 if flagged else 0.3 * (i % 7) - 0.5,
                threshold=THRESHOLD,
                flagged=flagged,
                counterfactual_drop=0.6 if flagged else (0.1 if passed else 0.0),
                implicated=implicated.get(i, []),
                mitigation=(
                    Mitigation(
                        operation="operations/scan-req-17",
                        new_version=MODEL_VERSION + 1,
                        predicted_label_after=int(label) + 1,
                        prediction_changed=True,
                        test_accuracy_before=0.962,
                        test_accuracy_after=0.958,
                        applied=True,
                        sample_ids=(1000, 1001, 1002, 1003, 1100, 1101, 1102),
                        targets=2,
                        targets_affected=2,
                        control_affected=0,
                        p_value_after=0.6,
                        decision="attack set of 7 samples ...: confirmed: forgetting it",
                    )
                    if flagged
                    else None
                ),
                model_version=MODEL_VERSION,
                p_value=0.01 * (i + 1) if passed else 0.6 + i / 100,
                influence_p_value=0.02,
                group_outlier_z=4.0 if flagged else 0.2,
                control_drop=0.01 if flagged else 0.0,
                drop_threshold=0.5,
                decision=f"decision of input {i}",
            )
        )
    return results


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in DATA_URI.findall(page)]


def test_image_report_shows_counts_flags_implicated_samples_and_mitigation(
    tmp_path: Path,
) -> None:
    inputs, labels = _digits(12)
    results = _results(labels)
    training_images = {1000 + k: inputs[k, 0] for k in range(4)} | {1101: inputs[9]}
    path = tmp_path / "report.html"

    write_scan_report(path, inputs, results, training_images=training_images)

    assert path.exists()
    page = path.read_text(encoding="utf-8")
    text = _text(page)
    assert "inputs scanned 12" in text
    assert "passed the filter 5" in text
    assert "flagged 2" in text
    assert f"filter p-value cut {THRESHOLD}" in text
    assert f"model version {MODEL_VERSION}" in text
    for index in (2, 5):
        assert f'id="input-{index}"' in page
        assert f"Input #{index}" in text
    for sample_id in (1000, 1001, 1002, 1003, 1100, 1101, 1102):
        assert f"<td>{sample_id}</td>" in page
    assert "operations/scan-req-17" in text
    assert "96.20% → 95.80%" in text
    # Every cut that decided a flag is on the page with its value.
    for index in (2, 5):
        assert f"decision of input {index}" in text
    assert "drop 0.6 (needed 0.5; control 0.01)" in text
    assert "0.6 (0.5)" in text  # the table's drop and its calibrated threshold
    assert "top-1 proponent of confirmed input(s) 2" in text
    assert "The attack set of 7 samples was forgotten" in text
    assert "confirmed: forgetting it" in text

    pngs = _pngs(page)
    assert pngs and all(png.startswith(PNG_SIGNATURE) for png in pngs)
    # 12 input thumbnails in the tables, 2 larger ones beside the details, 5 training samples.
    assert page.count('class="thumb"') == 12 + 2 + 5
    # Histogram and one z-score chart per flagged input.
    assert page.count('class="chart') == 3


def test_owner_ids_and_title_are_escaped(tmp_path: Path) -> None:
    inputs, labels = _digits(12)
    path = tmp_path / "report.html"

    write_scan_report(path, inputs, _results(labels), title="<b>scan</b> & co")

    page = path.read_text(encoding="utf-8")
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>scan</b>" not in page
    assert "&lt;b&gt;scan&lt;/b&gt; &amp; co" in page


def test_tabular_report_has_charts_but_no_thumbnails(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(12, 30)).astype(np.float32)
    results = _results(rng.integers(0, 2, size=12))
    path = tmp_path / "report.html"

    write_scan_report(path, inputs, results)

    page = path.read_text(encoding="utf-8")
    assert 'class="thumb"' not in page
    assert page.count('class="chart') == 3
    assert all(png.startswith(PNG_SIGNATURE) for png in _pngs(page))
    assert "inputs scanned 12" in _text(page)


def test_unflagged_rows_are_collapsed_and_truncated(tmp_path: Path) -> None:
    n = MAX_UNFLAGGED_ROWS + 30
    inputs, labels = _digits(n)
    path = tmp_path / "report.html"

    write_scan_report(path, inputs, _results(labels))

    page = path.read_text(encoding="utf-8")
    text = _text(page)
    hidden = n - 2 - MAX_UNFLAGGED_ROWS
    assert "<details>" in page
    assert f"showing {MAX_UNFLAGGED_ROWS} of {n - 2}" in text
    assert f"{hidden} more not shown" in text


def test_report_of_nothing_flagged_says_so(tmp_path: Path) -> None:
    inputs, labels = _digits(4)
    results = [r for r in _results(labels) if not r.flagged]
    path = tmp_path / "report.html"

    write_scan_report(path, inputs, results)

    text = _text(path.read_text(encoding="utf-8"))
    assert "flagged 0" in text
    passed = sum(r.p_value <= r.threshold for r in results)
    assert passed == 2
    assert f"No input was flagged: {passed} passed the filter and none was confirmed." in text


def test_importing_the_report_module_loads_neither_matplotlib_nor_torch() -> None:
    code = (
        "import sys, expunge.client.report\n"
        "heavy = [m for m in ('matplotlib', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_matplotlib_raises_with_install_hint(tmp_path: Path) -> None:
    # A None entry in sys.modules makes `import matplotlib` fail as on a client-only install.
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None\n"
        "import numpy as np\n"
        "from expunge.client.report import write_scan_report\n"
        "try:\n"
        f"    write_scan_report(__import__('pathlib').Path({str(tmp_path / 'r.html')!r}), np.zeros((0, 3)), [])\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert "pip install 'expunge[server]'" in done.stdout
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("shape", [(5, 8, 8), (5, 3, 8, 8)])
def test_other_image_layouts_get_thumbnails(tmp_path: Path, shape: tuple[int, ...]) -> None:
    inputs = np.random.default_rng(1).random(shape).astype(np.float32)
    results = [r for r in _results(np.zeros(5, dtype=int)) if r.index < 5]
    path = tmp_path / "report.html"

    write_scan_report(path, inputs, results)

    page = path.read_text(encoding="utf-8")
    assert page.count('class="thumb"') == 5 + 1
    assert all(png.startswith(PNG_SIGNATURE) for png in _pngs(page))
