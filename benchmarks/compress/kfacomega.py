"""Ω = ½ tr(ΔW A ΔWᵀ G) (GPTQ error under the KFAC GGN): ranking and mixed 3.5-bit rows.

    OMP_NUM_THREADS=1 .venv/bin/python kfacomega.py gpt rank     # -> kfacomega-gpt.json
    OMP_NUM_THREADS=1 .venv/bin/python kfacomega.py gpt mixed    # rows -> rows-gpt.jsonl

``rank``: per layer, Ω at every width by ``gptq_sensitivity(measure="kfac")`` (factors of the
exact GGN on the 128 calibration sequences; the GPT's 4374-token vocabulary: one Monte-Carlo
target per token, ``kind="mc"``), the earlier Ω (Hutchinson trace x GPTQ/RTN error, as
run.py), and the held-out loss rise of that layer alone GPTQ'd at 2 and 3 bits; Spearman's ρ
of each Ω with the rise. ``mixed``: the exact allocation at 3.5 bits from {3,4} and from
{2,3,4,8} on each Ω, then GPTQ at those widths (full-range grid, the default), measured.
"""

from __future__ import annotations

import json
import sys
import time

import run
import torch
import workloads

import hesse
from hesse import quant
from hesse.quant.gptq_sensitivity import gptq_weights

BITS = (2, 3, 4, 8)
LABELS = {"kfac": "Ω = ½tr(ΔW A ΔWᵀ G), KFAC GGN", "ratio": "Ω = trace x GPTQ/RTN error"}


def sensitivities(model, name, calib, layers):
    """``{"kfac": Sensitivity, "ratio": Sensitivity}`` and the seconds each took."""
    obj = hesse.Objective(model, calib[:2])  # as run.py's mixed rows: 32 sequences
    start = time.perf_counter()
    budget = 10 if name == "minilm" else 30
    grid = quant.Quantizer(4, "group", 128)
    sens = quant.sensitivity(obj, BITS, quantizer=grid, budget=budget, layers=layers, seed=0)
    t_trace = time.perf_counter() - start
    ratio = quant.gptq_sensitivity(sens, model, calib)
    t_ratio = time.perf_counter() - start
    start = time.perf_counter()
    full = hesse.Objective(model, calib, params=[sens[n].param for n in layers])
    kind = "exact" if name == "minilm" else "mc"  # exact: one backward per class and row
    K = hesse.KFACOperator(full, kind=kind, seed=0)
    t_factors = time.perf_counter() - start
    kfac = quant.gptq_sensitivity(sens, model, calib, measure="kfac", curvature=K)
    t_kfac = time.perf_counter() - start
    seconds = {"trace": t_trace, "ratio": t_ratio, "kfac_factors": t_factors, "kfac": t_kfac}
    return {"kfac": kfac, "ratio": ratio}, seconds


def rises(model, name, calib, layers, widths=(2, 3)):
    """``{b: {layer: held-out loss rise with that layer alone GPTQ'd at b bits}}``."""
    base = workloads.evaluate(model, name)["loss"]
    out: dict[int, dict[str, float]] = {b: {} for b in widths}
    for item in gptq_weights(model, layers, widths, calib):
        keep = item.weight.detach().clone()
        with torch.no_grad():
            item.weight.copy_(item.result.weight)
        try:
            out[item.bits][item.name] = workloads.evaluate(model, name)["loss"] - base
        finally:
            with torch.no_grad():
                item.weight.copy_(keep)
    return out


def rank(name: str) -> None:
    torch.set_num_threads(1)
    model, calib = workloads.load(name), workloads.calibration(name)
    layers = run.layers_of(model, name)
    sens, seconds = sensitivities(model, name, calib, layers)
    torch.save(sens, workloads.CACHE / f"kfacomega-sens-{name}.pt")
    start = time.perf_counter()
    rise = rises(model, name, calib, layers)
    seconds["rises"] = time.perf_counter() - start
    per = [{"layer": n, "rise": {b: rise[b][n] for b in rise},
            **{key: s[n].omega for key, s in sens.items()}} for n in layers]  # fmt: skip
    doc = {"workload": name, "seconds": seconds, "layers": per}
    doc |= stats(per)
    (workloads.HERE / f"kfacomega-{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "layers"}), flush=True)


def stats(per: list[dict]) -> dict:
    """Spearman's ρ of each Ω with the single-layer rises, per width and pooled; Pearson; sums.

    Pooled: over (layer, width) pairs. Sums: Σ Ω against Σ rises per width.
    """
    widths = [b for b in per[0]["rise"]]
    rise = {b: [p["rise"][b] for p in per] for b in widths}
    out: dict[str, dict] = {"spearman": {}, "pearson_pooled": {}, "sum": {}}
    for key, label in LABELS.items():
        omega = {b: [p[key][b] for p in per] for b in widths}
        for b in widths:
            out["spearman"][f"{label} @ {b} bits"] = run._spearman(omega[b], rise[b])
            out["sum"][f"{label} @ {b} bits"] = (sum(omega[b]), sum(rise[b]))
        pooled_o = [v for b in widths for v in omega[b]]
        pooled_r = [v for b in widths for v in rise[b]]
        out["spearman"][f"{label}, pooled"] = run._spearman(pooled_o, pooled_r)
        out["pearson_pooled"][label] = float(
            torch.corrcoef(torch.tensor([pooled_o, pooled_r], dtype=torch.float64))[0, 1]
        )
    return out


def restat(name: str) -> None:
    path = workloads.HERE / f"kfacomega-{name}.json"
    doc = json.loads(path.read_text())
    doc = {k: v for k, v in doc.items() if k not in ("spearman_vs_single_layer_heldout_rise",)}
    doc |= stats(doc["layers"])
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "layers"}), flush=True)


def mixed(name: str, which: tuple[str, ...] = ("kfac", "ratio")) -> None:
    torch.set_num_threads(1)
    model, calib = workloads.load(name), workloads.calibration(name)
    layers = run.layers_of(model, name)
    sens = torch.load(workloads.CACHE / f"kfacomega-sens-{name}.pt", weights_only=False)
    params = dict(model.named_parameters())
    n = sum(params[p].numel() for p in quant.quantizable(model, layers).values())
    spent = json.loads((workloads.HERE / f"kfacomega-{name}.json").read_text())["seconds"]
    rows: list[dict] = []
    for key in which:
        for widths in ((3, 4), (3, 4, 8), BITS):
            among = ",".join(map(str, widths))
            label = f"hesse GPTQ mixed 3.5-bit from {{{among}}}, full-range ({LABELS[key]})"
            if run.cached(rows, name, label):
                continue
            alloc = quant.allocate(sens[key], n * 3.5 / 8, bits=widths)
            start = time.perf_counter()
            q = quant.gptq(model, calib, bits=alloc.bits, embeddings=None)
            seconds = spent[key] + time.perf_counter() - start  # Ω's cost included
            saved = quant.save(q, run.OUT / name / f"hesse-mixed-{key}-{len(widths)}")
            hist = {b: sum(v == b for v in alloc.bits.values()) for b in widths}
            run.measure(rows, label, q, name, seconds, saved.path,
                        avg_bits=alloc.size_bytes * 8 / n, widths=hist)  # fmt: skip


if __name__ == "__main__":
    {"rank": rank, "mixed": mixed, "stats": restat}[sys.argv[2]](sys.argv[1])
