"""Mixed 3.5-bit GPTQ on MiniLM from {2,3,4,8} with measured Ω: a row appended to rows-<w>.jsonl.

    OMP_NUM_THREADS=1 .venv/bin/python mixedloss.py minilm

run.py's mixed rows allocate on HAWQ-V2's trace Ω (x GPTQ/RTN error); on MiniLM they put 22 of
37 layers at 2 bits and break the model. Here Ω_i(b) is measured:
``gptq_sensitivity(..., measure="loss")``, the calibration-loss increase with layer i alone
GPTQ'd at b bits. Also writes mixedloss-<w>.json: per layer the trace, its standard error and
both Ω at each width, and Spearman's ρ between them, to say why the trace Ω failed.
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


def spearman(a, b) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main(name: str) -> None:
    torch.set_num_threads(1)
    model = workloads.load(name)
    calib = workloads.calibration(name)
    layers = run.layers_of(model, name)
    start = time.perf_counter()
    obj = hesse.Objective(model, calib[:2])  # as run.py's mixed rows
    sens = quant.sensitivity(obj, run.BITS, quantizer=quant.Quantizer(4, "group", 128),
                             budget=10, layers=layers, seed=0)  # fmt: skip
    t_trace = time.perf_counter() - start
    measured = quant.gptq_sensitivity(sens, model, calib, measure="loss")
    t_sens = time.perf_counter() - start
    params = dict(model.named_parameters())
    n = sum(params[p].numel() for p in quant.quantizable(model, layers).values())
    alloc = quant.allocate(measured, n * 3.5 / 8)
    t0 = time.perf_counter()
    q = quant.gptq(model, calib, bits=alloc.bits, embeddings=None)
    seconds = t_sens + time.perf_counter() - t0
    saved = quant.save(q, run.OUT / name / "hesse-mixed-loss")
    hist = {b: sum(v == b for v in alloc.bits.values()) for b in run.BITS}
    rows: list[dict] = []
    run.measure(rows, "hesse GPTQ mixed 3.5-bit (Ω = measured calibration-loss rise)", q, name,
                seconds, saved.path, avg_bits=alloc.size_bytes * 8 / n, widths=hist)  # fmt: skip
    per = [{"layer": r.name, "trace": r.score, "stderr": r.trace_stderr, "negative": r.negative,
            "omega_trace": r.omega, "omega_loss": measured[r.name].omega,
            "bits": alloc.bits[r.name]} for r in sens.layers]  # fmt: skip
    rho = {b: spearman([p["omega_trace"][b] for p in per], [p["omega_loss"][b] for p in per])
           for b in run.BITS}  # fmt: skip
    doc = {"seconds_trace": t_trace, "seconds_sensitivity": t_sens, "spearman": rho,
           "negative": sum(p["negative"] for p in per), "layers": per}  # fmt: skip
    (workloads.HERE / f"mixedloss-{name}.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: v for k, v in doc.items() if k != "layers"}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
