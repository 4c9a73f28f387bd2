"""Assemble RESULTS.md from the tables in results/ and the verdicts below.

Run after the four benchmarks and the outlier check: ``python benchmarks/losses/report.py``.
"""

from __future__ import annotations

from _common import HERE, RESULTS

SECTIONS = [
    (
        "outliers",
        "The outlier count each loss predicts, on the digits demo",
        "python benchmarks/losses/outliers.py",
    ),
    (
        "noise",
        "GCE and MAE against cross-entropy under symmetric label noise",
        "python benchmarks/losses/noise.py --seeds 3 --epochs 100",
    ),
    (
        "zloss",
        "Z-loss against cross-entropy: top-k accuracy and time per step as C grows",
        "python benchmarks/losses/zloss.py",
    ),
    (
        "anyloss",
        "AnyLoss against cross-entropy and class-weighted cross-entropy, imbalanced binary data",
        "python benchmarks/losses/anyloss.py",
    ),
    (
        "ensloss",
        "EnsLoss against its fixed losses on eleven tabular tasks",
        "python benchmarks/losses/ensloss.py; python benchmarks/losses/ensloss.py --render",
    ),
]

INTRO = """# Losses and the curvature they make

Each section: the paper's claim, measured on data a CPU trains in minutes (scikit-learn's
bundled and generated sets), with lambda_max, trace and the outlier count of the trained
model's Hessian (`hesse.eigs`, `hesse.trace`) beside the accuracy. All runs on one CPU thread
of a shared 2-core machine (load average 10-13 during the runs, so the timings are noisy).
Run from the repository root with the project's `.venv`; `python benchmarks/losses/report.py`
then rebuilds this file from `results/*.md` (raw numbers in `results/*.json`).
"""


def main() -> None:
    """Write RESULTS.md."""
    parts = [INTRO]
    for name, title, command in SECTIONS:
        table = RESULTS / f"{name}.md"
        verdict = RESULTS / f"{name}.verdict.md"
        parts.append(f"## {title}\n\nCommand: `{command}`\n")
        parts.append(table.read_text() if table.is_file() else "(not run)\n")
        if verdict.is_file():
            parts.append(verdict.read_text())
    (HERE / "RESULTS.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
