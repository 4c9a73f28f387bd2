"""Run the seven dynamics reproductions and gather their tables into RESULTS.md.

    .venv/bin/python benchmarks/dynamics/run.py [eos transfer sgd_stability logreg large_steps batch
        landscapes]

Each study writes ``<name>.md``, ``<name>.json`` and its PNG figures into this folder; this
script runs the ones named (all by default) and concatenates every ``<name>.md`` present.
"""

from __future__ import annotations

import importlib
import sys
import time

from common import HERE

STUDIES = ("eos", "transfer", "sgd_stability", "logreg", "large_steps", "batch", "landscapes")


def main(names: list[str]) -> None:
    seconds = {}
    for name in names or STUDIES:
        start = time.perf_counter()
        importlib.import_module(name).main()
        seconds[name] = time.perf_counter() - start
    parts = [
        "# Training dynamics and loss landscapes: reproductions",
        "Produced by `.venv/bin/python benchmarks/dynamics/run.py` (one CPU thread).",
    ]
    parts += [(HERE / f"{n}.md").read_text() for n in STUDIES if (HERE / f"{n}.md").exists()]
    parts.append(
        "Wall time of this run: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    )
    (HERE / "RESULTS.md").write_text("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
