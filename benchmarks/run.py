"""Every benchmark, one after the other: ``python -m benchmarks.run`` (``make bench``).

Each writes its own ``benchmarks/results/<name>.json``; the first that fails stops the run.
Together they take about two and a half hours on a 2-core CPU (the reliability run alone holds a
10-minute soak and 100 server restarts).
"""

from __future__ import annotations

import subprocess
import sys

MODULES = (
    "benchmarks.index_bench",
    "benchmarks.forget_bench",
    "benchmarks.scan_bench",
    "benchmarks.scale_bench",
    "benchmarks.scaleout_bench",
    "benchmarks.estimator_bench",
    "benchmarks.reliability",
)


def main() -> int:
    for module in MODULES:
        print(f"== python -m {module}", flush=True)
        code = subprocess.call([sys.executable, "-m", module])
        if code:
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
