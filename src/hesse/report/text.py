"""The compact terminal summary of a results document."""

from __future__ import annotations

import textwrap

WIDTH = 100
SYMBOLS = {"hessian": "Tr(H)", "ggn": "Tr(G)", "fisher": "Tr(F)", "kfac": "Tr(K)", "ekfac": "Tr(K)"}
"""The trace's symbol for each analysed curvature."""


def render_text(doc: dict) -> str:
    """A few dozen lines for the terminal: spectrum, trace, outliers, layers, stability.

    Args:
        doc: a results document (see ``hesse.report.schema``).

    Returns:
        The summary, lines joined by newlines (no trailing newline).
    """
    sections = [_header(doc), _eigs(doc), _trace(doc), _outliers(doc), _criteria(doc)]
    sections += [_layers(doc), _kfac(doc)]
    sections += [_stability(doc), [_wrap(f"note: {note}") for note in doc["notes"]]]
    return "\n".join(line for lines in sections for line in lines)


def _g(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}g}"


def _header(doc: dict) -> list[str]:
    p, c = doc["problem"], doc["config"]
    samples = "" if p["n_samples"] is None else f", {p['n_samples']} samples"
    return [
        f"{p['model']}: {p['n_params']} parameters{samples}, "
        f"loss {_g(p['loss'])} ({p['loss_name']}), |gradient| {_g(p['gradient_norm'], 3)}",
        f"curvature {c['curvature']} · seed {c['seed']} · {c['dtype']} · {c['device']}",
    ]


def _eigs(doc: dict) -> list[str]:
    if "eigs" not in doc:
        return []
    largest, smallest = doc["eigs"]["largest"], doc["eigs"]["smallest"]
    ggn = (doc.get("ggn") or {}).get("eigs") or {"values": []}
    lines = ["", f"{'i':>3}  {'λ_i (largest)':>14}  {'residual':>9}  {'GGN λ_i':>10}"]
    for i, (value, res) in enumerate(zip(largest["values"], largest["residuals"], strict=True)):
        other = _g(ggn["values"][i]) if i < len(ggn["values"]) else ""
        lines.append(f"{i + 1:>3}  {_g(value, 6):>14}  {res:>9.1e}  {other:>10}")
    status = "converged" if largest["converged"] else "NOT converged"
    lines.append(f"     {status}, {largest['n_matvecs']} products")
    most_negative = ", ".join(_g(v) for v in smallest["values"])
    lines.append(f"smallest: {most_negative} (max residual {max(smallest['residuals']):.1e})")
    return lines


def _trace(doc: dict) -> list[str]:
    lines = []
    if "trace" in doc:
        symbol = SYMBOLS.get(doc["config"]["curvature"], "Tr")
        lines.append("trace:    " + _trace_line(symbol, doc["trace"]))
    ggn = doc.get("ggn")
    if ggn and ggn["trace"]:
        lines.append("GGN:      " + _trace_line("Tr(G)", ggn["trace"]))
    elif ggn:
        lines.append(f"GGN:      not computed: {ggn['reason']}")
    return [""] + lines if lines else []


def _trace_line(symbol: str, t: dict) -> str:
    lo, hi = t["ci95"]
    return (
        f"{symbol} = {_g(t['value'])} ± {_g(t['stderr'], 2)} "
        f"(95% CI {_g(lo)} – {_g(hi)}, {t['method']}, {t['n_matvecs']} products)"
    )


def _outliers(doc: dict) -> list[str]:
    return ["", _wrap("outliers: " + doc["outliers"]["text"])] if "outliers" in doc else []


def _criteria(doc: dict) -> list[str]:
    if "criteria" not in doc:
        return []
    c = doc["criteria"]
    return ["", f"criteria: λmax/λ{c['k']} {_g(c['ratio'])}, negative share "
            f"{_g(c['negative_share'])}, Tr/λmax {_g(c['trace_ratio'])}"]  # fmt: skip


def _wrap(text: str, indent: str = "  ") -> str:
    return textwrap.fill(text, WIDTH, subsequent_indent=indent)


def _layers(doc: dict) -> list[str]:
    if "layers" not in doc:
        return []
    width = max(5, *(len(row["name"]) for row in doc["layers"]["rows"]))
    head = f"{'block':<{width}}  {'kind':<10} {'params':>7} {'trace':>10} {'trace/param':>11}"
    lines = ["", head + f" {'λ_max':>10}"]
    for row in doc["layers"]["rows"]:
        lines.append(
            f"{row['name']:<{width}}  {row['kind']:<10} {row['n_params']:>7} "
            f"{_g(row['trace']):>10} {_g(row['trace_per_param']):>11} "
            f"{_g(row['top_eigenvalue']):>10}"
        )
    return lines


def _kfac(doc: dict) -> list[str]:
    """The gap of a Kronecker curvature K to the exact GGN G: top-k spectra, then per block."""
    if "kfac" not in doc:
        return []
    q = doc["kfac"]
    status = "converged" if q["converged"] else "NOT converged"
    title = (
        f"{q['approximation']} (kind {q['kind']}, {q['approx']}) against the exact GGN: "
        f"{q['n_matvecs']} GGN products, eigenvalues {status}"
    )
    head = f"{'i':>3}  {'λ_i(G)':>10}  {'λ_i(K)':>10}  {'rel. error':>10}  {'θ_i (rad)':>9}"
    lines = ["", _wrap(title), head]
    rows = zip(q["exact_eigenvalues"], q["approx_eigenvalues"], q["eigenvalue_errors"],
               q["principal_angles"], strict=True)  # fmt: skip
    for i, (g, k, err, angle) in enumerate(rows, start=1):
        lines.append(f"{i:>3}  {_g(g):>10}  {_g(k):>10}  {_g(err, 3):>10}  {angle:>9.3f}")
    blocks = [*q["blocks"], q["whole"]]
    width = max(5, *(len(b["name"]) for b in blocks))
    lines.append(f"{'block':<{width}}  {'params':>7}  {'tr(G−K) ± s.e.':>19}  {'tr(K)':>9}  "
                 f"{'‖G−K‖F ± s.e.':>19}  {'‖G‖F':>9}  {'‖G−K‖/‖G‖':>9}")  # fmt: skip
    return lines + [_gap_row(b, width) for b in blocks]


def _gap_row(b: dict, width: int) -> str:
    t, f = b["trace"], b["frobenius"]
    return (
        f"{b['name']:<{width}}  {b['dim']:>7}  {_pm(t['value'], t['stderr']):>19}  "
        f"{_g(b['approx_trace']):>9}  {_pm(f['value'], f['stderr']):>19}  "
        f"{_g(b['exact_frobenius']['value']):>9}  {_g(b['relative_frobenius'], 3):>9}"
    )


def _pm(value: float, stderr: float) -> str:
    return f"{_g(value)} ± {_g(stderr, 2)}"


def _stability(doc: dict) -> list[str]:
    if "stability" not in doc:
        return []
    s = doc["stability"]
    lines = ["", f"stability at η = {_g(s['lr'])} (2/η = {_g(s['threshold'])}):"]
    return lines + [_wrap(f"  {v['criterion']:>3}: {v['text']}", " " * 7) for v in s["verdicts"]]
