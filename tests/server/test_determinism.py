"""The same forget on the same model version gives byte-identical weights in separate processes."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import sys
from pathlib import Path
from expunge.server.engine import Engine
from expunge.server.forget.service import ForgetService
from expunge.server.main import configure_torch
from expunge.server.settings import Settings
from expunge.server.state.store import Store
from expunge.server.forget.computation import UnlearningOptions

settings = Settings(state_dir=Path(sys.argv[1]))
configure_torch(settings)
store = Store(settings.state_dir)
service = ForgetService(Engine(store, settings))
service.jobs.start()
options = UnlearningOptions(selection=sys.argv[3])
service.submit("digits", [], [sys.argv[2]], "same-request", options, "test")
assert service.jobs.wait_idle(300)
row = store.request("same-request")
print(row.result["weights_sha256"], row.result["environment"])
assert service.close(60)  # as the server does before it exits
store.close()
"""


@pytest.mark.parametrize("selection", ["auto", "lcodec_cg"])
def test_same_request_same_bytes_in_separate_processes(
    state_dir: Path, tmp_path: Path, selection: str
) -> None:
    """auto takes the exact retrain on this model; lcodec_cg the targeted Newton update."""
    db = sqlite3.connect(state_dir / "expunge.db")
    owner = db.execute("SELECT owner_id FROM samples ORDER BY owner_id LIMIT 1").fetchone()[0]
    db.close()
    outputs = []
    for i in range(2):
        copy = tmp_path / f"copy{i}"
        shutil.copytree(state_dir, copy)
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(copy), owner, selection],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, f"exit {done.returncode}; stderr:\n{done.stderr[-4000:]}"
        outputs.append(done.stdout.strip().splitlines()[-1])
    sha = [o.split()[0] for o in outputs]
    assert len(sha[0]) == 64 and sha[0] == sha[1]
    assert "torch" in outputs[0] and "deterministic True" in outputs[0]
