"""Writing a results document: versioned JSON, PNG plots and one self-contained HTML page.

This package only formats; it knows the document (a JSON-able dict, see ``schema``) and
nothing of models or operators, so ``hesse.analysis.Report`` and the CLI both use it.

Example:
    >>> doc = report.to_dict()  # doctest: +SKIP
    >>> write_all(doc, "hesse-report")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hesse.report.html import render_html
from hesse.report.plots import render_plots
from hesse.report.schema import SCHEMA_NAME, SCHEMA_VERSION, validate
from hesse.report.text import render_text

from . import atomic

__all__ = [
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "render_html",
    "render_plots",
    "render_text",
    "validate",
    "write_all",
    "write_html",
    "write_json",
]


def write_json(doc: dict, path: str | os.PathLike) -> Path:
    """Write the document as indented JSON, atomically.

    Raises:
        ValueError: the document does not match the schema (the message lists where).
    """
    errors = validate(doc)
    if errors:
        raise ValueError("results document does not match its schema: " + "; ".join(errors))
    return atomic.write_text(path, json.dumps(doc, indent=1, allow_nan=False) + "\n")


def write_html(doc: dict, path: str | os.PathLike, plots: dict[str, bytes] | None = None) -> Path:
    """Write the self-contained HTML page atomically (plots are drawn when not given)."""
    plots = render_plots(doc) if plots is None else plots
    return atomic.write_text(path, render_html(doc, plots))


def write_all(doc: dict, folder: str | os.PathLike) -> dict[str, Path]:
    """Write ``results.json``, the PNG plots and ``report.html`` into ``folder``.

    Args:
        doc: the results document.
        folder: output folder, created when missing.

    Returns:
        ``{file name: path}`` of everything written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots = render_plots(doc)
    written = {"results.json": write_json(doc, folder / "results.json")}
    written |= {name: atomic.write_bytes(folder / name, png) for name, png in plots.items()}
    written["report.html"] = write_html(doc, folder / "report.html", plots)
    return written
