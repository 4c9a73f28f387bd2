"""The result page of an application command (quantize, prune, landscape, influence, ...).

A :class:`Page` is a title, a JSON-able document of everything measured, sections of text,
tables and figures, and the figures' PNG bytes. It prints as plain-text tables and saves as
``results.json``, one PNG per figure and one offline ``report.html`` (the same style as the
analysis report; everything inlined).

Example:
    >>> page = Page("demo", {"x": 1}, [Section("numbers", columns=("a", "b"), rows=[[1, 2.5]])])
    >>> print(page.text())
    demo
    <BLANKLINE>
    numbers
      a  b
      1  2.5
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path

import numpy as np
import torch

from hesse.report.html import STYLE, _img, _table

from . import atomic

PAGE_SCHEMA = "hesse-page/1"


@dataclass(frozen=True)
class Section:
    """One part of a page: a heading, a paragraph, a table and a figure, each optional.

    Attributes:
        title: The heading.
        text: A paragraph (plain text).
        columns: Column names of the table.
        rows: The table's rows (numbers print with 4 significant digits).
        figure: Name of a figure in :attr:`Page.figures` (e.g. ``"frontier.png"``).
    """

    title: str
    text: str = ""
    columns: tuple[str, ...] = ()
    rows: list[list] = field(default_factory=list)
    figure: str | None = None


@dataclass(frozen=True)
class Page:
    """The result of an application command.

    Attributes:
        title: The page title.
        doc: Everything measured, JSON-able; written to ``results.json`` under ``"results"``.
        sections: What the page shows, in order.
        figures: ``{file name: PNG bytes}``.
    """

    title: str
    doc: dict
    sections: list[Section]
    figures: dict[str, bytes] = field(default_factory=dict)

    def text(self) -> str:
        """The page as plain text: each section's heading, paragraph and aligned table."""
        lines = [self.title]
        for s in self.sections:
            lines += ["", s.title] + ([f"  {s.text}"] if s.text else [])
            lines += _aligned(s.columns, s.rows)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """``{"schema", "title", "results", "sections"}``: what ``results.json`` holds."""
        sections = [asdict(s) | {"columns": list(s.columns)} for s in self.sections]
        return {
            "schema": PAGE_SCHEMA,
            "title": self.title,
            "results": self.doc,
            "sections": sections,
        }

    def html(self) -> str:
        """One self-contained HTML page (figures inlined as PNG data URIs)."""
        parts = [f"<h1>{escape(self.title)}</h1>"]
        for s in self.sections:
            parts.append(f"<h2>{escape(s.title)}</h2>")
            parts.append(f"<p>{escape(s.text)}</p>" if s.text else "")
            parts.append(_table(list(s.columns), s.rows) if s.columns else "")
            parts.append(_img(self.figures, s.figure, s.title) if s.figure else "")
        body = "\n".join(p for p in parts if p)
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(self.title)}</title><style>{STYLE}</style></head>"
            f"<body>\n{body}\n</body></html>\n"
        )

    def save(self, folder: str | os.PathLike) -> dict[str, Path]:
        """Write ``results.json``, every figure and ``report.html`` into ``folder``, atomically.

        Returns:
            ``{file name: path}`` of everything written.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        doc = json.dumps(self.to_dict(), indent=1, default=_plain)
        written = {"results.json": atomic.write_text(folder / "results.json", doc + "\n")}
        for name, png in self.figures.items():
            written[name] = atomic.write_bytes(folder / name, png)
        written["report.html"] = atomic.write_text(folder / "report.html", self.html())
        return written


def png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (no timestamp metadata, so reruns write equal files)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None}, bbox_inches="tight")
    return buffer.getvalue()


def _aligned(columns: tuple[str, ...], rows: list[list]) -> list[str]:
    if not columns:
        return []
    cells = [list(columns)] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    ]


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _plain(value: object) -> object:
    """JSON for tensors and numpy numbers that slipped into a document."""
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f"Page.save: {type(value).__name__} is not JSON-able; convert it in the doc.")
