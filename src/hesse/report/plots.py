"""Plots of a results document (PNG bytes), drawn with matplotlib's object API.

The figures are built with ``matplotlib.figure.Figure`` rather than ``pyplot``, so that
plotting needs no display, leaves no global state behind and works in threads.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def render_plots(doc: dict) -> dict[str, bytes]:
    """All plots that the document has data for.

    Args:
        doc: a results document (see ``hesse.report.schema``).

    Returns:
        ``{file name: PNG bytes}``, e.g. ``{"spectrum.png": b"..."}``.
    """
    plots = {}
    if "eigs" in doc:
        plots["spectrum.png"] = _png(spectrum_figure(doc))
    if "density" in doc:
        plots["density.png"] = _png(density_figure(doc))
    if "layers" in doc:
        plots["layers.png"] = _png(layers_figure(doc))
    return plots


def spectrum_figure(doc: dict) -> Figure:
    """Top eigenvalues (Hessian and GGN, with residual bounds) and the most negative ones."""
    fig = figure(figsize=(9, 3.6), layout="constrained")
    top, bottom = fig.subplots(1, 2, width_ratios=(2, 1))
    largest = doc["eigs"]["largest"]
    index = np.arange(1, len(largest["values"]) + 1)
    top.errorbar(index, largest["values"], yerr=largest["residuals"], fmt="o", label="Hessian")
    ggn = doc.get("ggn") or {}
    if ggn.get("eigs"):
        values = ggn["eigs"]["values"]
        top.plot(np.arange(1, len(values) + 1), values, "s", mfc="none", label="GGN")
    _mark_outliers(top, doc.get("outliers"))
    _mark_threshold(top, doc.get("stability"), "2/η")
    top.set(xlabel="index i", ylabel="λᵢ", title="largest eigenvalues", yscale="symlog")
    top.legend(fontsize=8)
    smallest = doc["eigs"]["smallest"]
    bottom.errorbar(
        np.arange(1, len(smallest["values"]) + 1),
        smallest["values"],
        yerr=smallest["residuals"],
        fmt="o",
        color="C3",
    )
    bottom.axhline(0.0, color="grey", lw=0.8)
    bottom.set(xlabel="index i", title="smallest eigenvalues")
    return fig


def _mark_outliers(ax, outliers: dict | None) -> None:
    if outliers and outliers["n_outliers"]:
        ax.axvline(outliers["n_outliers"] + 0.5, ls="--", color="C2", label="largest gap")
    if outliers and outliers["expected"]:
        ax.axvline(outliers["expected"] + 0.5, ls=":", color="grey", label="expected outliers")


def _mark_threshold(ax, stability: dict | None, label: str) -> None:
    if stability:
        ax.axhline(stability["threshold"], ls="-.", color="C1", lw=1, label=label)


def density_figure(doc: dict) -> Figure:
    """The smoothed spectral density (log scale), as in Ghorbani et al. 2019, Fig. 1."""
    density = doc["density"]
    fig = figure(figsize=(9, 3.2), layout="constrained")
    ax = fig.subplots()
    values = np.maximum(np.asarray(density["values"]), 1e-12)
    ax.semilogy(density["grid"], values, color="C0")
    ax.set(xlabel="eigenvalue λ", ylabel="density", title="spectral density (SLQ)")
    ax.set_ylim(bottom=max(values.min(), 1e-8))
    if "stability" in doc and doc["stability"]["threshold"] <= density["grid"][-1]:
        ax.axvline(doc["stability"]["threshold"], ls="-.", color="C1", label="2/η")
        ax.legend(fontsize=8)
    return fig


def layers_figure(doc: dict) -> Figure:
    """Per-block trace per parameter and top eigenvalue (horizontal bars, log scale)."""
    rows = doc["layers"]["rows"]
    names = [row["name"] for row in rows]
    fig = figure(figsize=(9, 0.9 + 0.3 * len(rows)), layout="constrained")
    per_param, top = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(rows))
    per_param.barh(y, [abs(r["trace_per_param"]) for r in rows], color="C0")
    per_param.set(yticks=y, yticklabels=names, xscale="log", title="|trace| / parameter")
    top.barh(y, [abs(r["top_eigenvalue"]) for r in rows], color="C1")
    top.set(xscale="log", title="|top eigenvalue| of the block")
    per_param.invert_yaxis()
    return fig


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    return buffer.getvalue()


def figure(**kwargs: Any) -> Figure:
    """A new ``matplotlib.figure.Figure`` (matplotlib loads with the first plot, not hesse)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)
