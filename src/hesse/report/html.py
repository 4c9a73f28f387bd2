"""One self-contained HTML page of a results document.

Everything is inline: the style sheet in a ``<style>`` element and every plot as a
``data:image/png;base64`` URI. The page has no script and links nowhere, so it opens
offline, from an e-mail attachment or a CI artifact, exactly as it was written.
"""

from __future__ import annotations

import base64
import json
from html import escape

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto;
       padding: 0 1rem; color: #1d1d1f; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0; font-variant-numeric: tabular-nums; }
td, th { padding: .15rem .6rem; border-bottom: 1px solid #ddd; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.verdict { border-left: 4px solid #888; padding: .3rem .8rem; margin: .5rem 0;
           background: #f6f6f6; }
.stable { border-color: #2a9d3f; } .unstable { border-color: #c0392b; }
.edge, .inconclusive { border-color: #d68910; }
img { max-width: 100%; } pre { background: #f6f6f6; padding: .5rem; overflow-x: auto; }
"""


def render_html(doc: dict, plots: dict[str, bytes]) -> str:
    """The report page.

    Args:
        doc: a results document (see ``hesse.report.schema``).
        plots: ``{file name: PNG bytes}`` from ``render_plots``; each is inlined.

    Returns:
        The HTML text.
    """
    p = doc["problem"]
    parts = [
        f"<h1>hesse report: {escape(p['model'])}</h1>",
        f"<p>{escape(p['description'] or '')}</p>",
        _problem(doc),
        _stability(doc),
        _outliers(doc),
        _criteria(doc),
        _spectrum(doc, plots),
        _density(plots),
        _layers(doc, plots),
        _kfac(doc),
        _notes(doc),
        _reproduce(doc),
    ]
    body = "\n".join(part for part in parts if part)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>hesse report: {escape(p['model'])}</title><style>{STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(_fmt(cell))}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(cell: object) -> str:
    return f"{cell:.5g}" if isinstance(cell, float) else str(cell)


def _img(plots: dict[str, bytes], name: str, alt: str) -> str:
    if name not in plots:
        return ""
    data = base64.b64encode(plots[name]).decode("ascii")
    return f'<p><img alt="{escape(alt)}" src="data:image/png;base64,{data}"></p>'


def _problem(doc: dict) -> str:
    p, c = doc["problem"], doc["config"]
    rows = [
        ["parameters", p["n_params"]],
        ["samples", p["n_samples"] if p["n_samples"] is not None else "—"],
        [f"loss ({p['loss_name']})", p["loss"]],
        ["gradient norm", p["gradient_norm"]],
        ["curvature", c["curvature"]],
        ["learning rate η", c["lr"] if c["lr"] is not None else "—"],
    ]
    return "<h2>Problem</h2>" + _table(["quantity", "value"], rows)


def _stability(doc: dict) -> str:
    if "stability" not in doc:
        return ""
    items = "".join(
        f'<div class="verdict {escape(v["status"])}"><b>{escape(v["criterion"])}</b>: '
        f"{escape(v['text'])} <small>({escape(v['reference'])})</small></div>"
        for v in doc["stability"]["verdicts"]
    )
    return "<h2>Stability at the training learning rate</h2>" + items


def _outliers(doc: dict) -> str:
    if "outliers" not in doc:
        return ""
    return f"<h2>Bulk and outliers</h2><p>{escape(doc['outliers']['text'])}</p>"


def _criteria(doc: dict) -> str:
    if "criteria" not in doc:
        return ""
    c = doc["criteria"]
    rows = [[f"λmax / λ{c['k']}", c["ratio"], c["definitions"]["ratio"]],
            ["negative share", c["negative_share"], c["definitions"]["negative_share"]],
            ["Tr / λmax", c["trace_ratio"], c["definitions"]["trace_ratio"]]]  # fmt: skip
    return "<h2>Spectral criteria (LLA)</h2>" + _table(["criterion", "value", "definition"], rows)


def _spectrum(doc: dict, plots: dict[str, bytes]) -> str:
    parts = []
    if "eigs" in doc:
        largest, smallest = _eig_rows(doc["eigs"]["largest"]), _eig_rows(doc["eigs"]["smallest"])
        parts += ["<h2>Largest eigenvalues</h2>", _table(["i", "λ_i", "residual bound"], largest)]
        parts += ["<h2>Most negative eigenvalues</h2>", _table(["i", "λ", "residual"], smallest)]
        parts.append(_img(plots, "spectrum.png", "largest and smallest eigenvalues"))
    if "trace" in doc:
        parts += ["<h2>Trace</h2>", _trace_table(doc)]
    return "\n".join(parts)


def _eig_rows(eig: dict) -> list[list[object]]:
    """Table rows ``[i, value, residual]`` of an ``eigs`` entry, numbered from 1."""
    pairs = zip(eig["values"], eig["residuals"], strict=True)
    return [[i, value, res] for i, (value, res) in enumerate(pairs, start=1)]


def _trace_table(doc: dict) -> str:
    rows = [["Hessian", *_trace_row(doc["trace"])]]
    ggn = doc.get("ggn")
    if ggn and ggn["trace"]:
        rows.append(["GGN", *_trace_row(ggn["trace"])])
    table = _table(["", "trace", "std. error", "95% CI", "products"], rows)
    reason = f"<p>GGN: {escape(ggn['reason'])}</p>" if ggn and ggn["reason"] else ""
    return table + reason


def _trace_row(t: dict) -> list[object]:
    lo, hi = t["ci95"]
    return [t["value"], t["stderr"], f"{lo:.5g} – {hi:.5g}", t["n_matvecs"]]


def _density(plots: dict[str, bytes]) -> str:
    image = _img(plots, "density.png", "spectral density")
    return "<h2>Spectral density</h2>" + image if image else ""


def _layers(doc: dict, plots: dict[str, bytes]) -> str:
    if "layers" not in doc:
        return ""
    header = ["block", "kind", "parameters", "trace", "± std. error", "trace/param", "λ_max"]
    rows = [
        [r["name"], r["kind"], r["n_params"], r["trace"], r["trace_stderr"],
         r["trace_per_param"], r["top_eigenvalue"]]
        for r in doc["layers"]["rows"]
    ]  # fmt: skip
    return "<h2>Per-layer curvature</h2>" + _table(header, rows) + _img(plots, "layers.png", "")


def _kfac(doc: dict) -> str:
    """The gap of a Kronecker curvature K to the exact GGN G: top-k spectra, then per block."""
    if "kfac" not in doc:
        return ""
    q = doc["kfac"]
    status = "converged" if q["converged"] else f"not converged: {q['reason']}"
    about = (
        f"<p>{escape(q['approximation'])} (kind {escape(q['kind'])}, {escape(q['approx'])}) "
        f"measured against the exact GGN with {q['n_matvecs']} GGN products "
        f"(hesse.curvature_gap); eigenvalues {escape(status)}. Principal angles in radians, "
        "ascending; a block-diagonal K misses the off-diagonal blocks of G, which the whole "
        "row includes.</p>"
    )
    spectra = zip(q["exact_eigenvalues"], q["approx_eigenvalues"], q["eigenvalue_errors"],
                  q["principal_angles"], strict=True)  # fmt: skip
    top = [[i, g, k, "—" if e is None else e, a] for i, (g, k, e, a) in enumerate(spectra, 1)]
    header = ["i", "λ_i(G)", "λ_i(K)", "relative error", "principal angle θ_i"]
    gaps = [_gap_row(b) for b in [*q["blocks"], q["whole"]]]
    columns = ["block", "parameters", "tr(G − K)", "± std. error", "tr(K)", "‖G − K‖_F",
               "± std. error", "‖G‖_F", "‖G − K‖_F / ‖G‖_F"]  # fmt: skip
    title = "<h2>Kronecker factors against the exact GGN</h2>"
    return title + about + _table(header, top) + _table(columns, gaps)


def _gap_row(b: dict) -> list[object]:
    t, f = b["trace"], b["frobenius"]
    relative = "—" if b["relative_frobenius"] is None else b["relative_frobenius"]
    return [b["name"], b["dim"], t["value"], t["stderr"], b["approx_trace"], f["value"],
            f["stderr"], b["exact_frobenius"]["value"], relative]  # fmt: skip


def _notes(doc: dict) -> str:
    if not doc["notes"]:
        return ""
    items = "".join(f"<li>{escape(note)}</li>" for note in doc["notes"])
    return f"<h2>Notes</h2><ul>{items}</ul>"


def _reproduce(doc: dict) -> str:
    keep = {key: doc[key] for key in ("meta", "config", "timings")}
    text = escape(json.dumps(keep, indent=1))
    summary = "<summary>versions, options, timings</summary>"
    return f"<h2>Reproducibility</h2><details>{summary}<pre>{text}</pre></details>"
