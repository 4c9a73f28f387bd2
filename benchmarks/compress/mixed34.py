"""Mixed precision from widths {3, 4} only, at 3.5 bits: rows appended to rows-<workload>.jsonl.

    OMP_NUM_THREADS=1 .venv/bin/python mixed34.py minilm

run.py's mixed rows choose from {2, 3, 4, 8}; there the exact allocation puts many layers at 2
bits, where Ω (a second-order model of the loss) underestimates the damage. Restricting the
choice to the two widths around the budget keeps Ω in the range where it predicts well.
"""

from __future__ import annotations

import sys
import time

import run
import torch
import workloads

import hesse
from hesse import quant

NARROW = run.NARROW


def main(name: str) -> None:
    torch.set_num_threads(1)
    model = workloads.load(name)
    calib = workloads.calibration(name)
    layers = run.layers_of(model, name)
    start = time.perf_counter()
    obj = hesse.Objective(model, calib[:2])
    budget = 10 if name == "minilm" else 30
    grid = quant.Quantizer(4, "group", 128)
    sens = quant.sensitivity(obj, (3, 4), quantizer=grid, budget=budget, layers=layers, seed=0)
    sens_g = quant.gptq_sensitivity(sens, model, calib, full_range=NARROW)
    t_sens = time.perf_counter() - start
    params = dict(model.named_parameters())
    n = sum(params[p].numel() for p in quant.quantizable(model, layers).values())
    rows: list[dict] = []
    for label, s in (("Ω = trace x GPTQ/RTN error", sens_g), ("Ω = HAWQ-V2 trace", sens)):
        alloc = quant.allocate(s, n * 3.5 / 8)
        start = time.perf_counter()
        q = quant.gptq(model, calib, bits=alloc.bits, embeddings=None, full_range=NARROW)
        seconds = t_sens + time.perf_counter() - start
        saved = quant.save(q, run.OUT / name / f"hesse-mixed34-{len(rows)}")
        hist = {b: sum(v == b for v in alloc.bits.values()) for b in (3, 4)}
        run.measure(rows, f"hesse GPTQ mixed 3.5-bit from {{3,4}} ({label})", q, name, seconds,
                    saved.path, avg_bits=alloc.size_bytes * 8 / n, widths=hist)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
