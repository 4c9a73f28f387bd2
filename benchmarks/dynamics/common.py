"""Output helpers of the dynamics reproductions: markdown tables, JSON and PNG files here."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def table(columns: list[str], rows: list[list]) -> str:
    """A markdown table; floats with 4 significant digits."""

    def cell(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


def save(name: str, doc: dict, markdown: str, figures: dict | None = None) -> None:
    """Write ``<name>.json``, ``<name>.md`` and each figure ``<key>.png`` into this folder."""
    (HERE / f"{name}.json").write_text(json.dumps(doc, indent=1, default=float) + "\n")
    (HERE / f"{name}.md").write_text(markdown.rstrip() + "\n")
    for key, fig in (figures or {}).items():
        fig.savefig(HERE / f"{key}.png", dpi=100, bbox_inches="tight", metadata={"Software": None})
