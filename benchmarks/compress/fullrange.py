"""hesse GPTQ with compressed-tensors' full-range symmetric grid: rows appended to rows-<w>.jsonl.

OMP_NUM_THREADS=1 .venv/bin/python fullrange.py gpt
"""

from __future__ import annotations

import sys
import time

import run
import torch
import workloads

from hesse import quant


def main(name: str) -> None:
    torch.set_num_threads(1)
    model = workloads.load(name)
    calib = workloads.calibration(name)
    layers = run.layers_of(model, name)
    rows: list[dict] = []
    for b in (4, 3):
        start = time.perf_counter()
        q = quant.gptq(model, calib, bits={n: b for n in layers}, embeddings=None, full_range=True)
        seconds = time.perf_counter() - start
        saved = quant.save(q, run.OUT / name / f"hesse-w{b}-full")
        run.measure(rows, f"hesse GPTQ W{b} g128, full-range grid (as compressed-tensors)", q,
                    name, seconds, saved.path)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
