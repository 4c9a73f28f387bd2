"""Peak memory of hesse's GPTQ or SparseGPT, measured in a fresh process, against the plans.

OMP_NUM_THREADS=1 .venv/bin/python memory.py minilm gptq        # appends a line to memory.jsonl
OMP_NUM_THREADS=1 .venv/bin/python memory.py minilm sparsegpt
MALLOC_MMAP_THRESHOLD_=1048576 OMP_NUM_THREADS=1 .venv/bin/python memory.py minilm gptq

With glibc's default the threshold for giving large blocks their own mapping rises after each
free, so freed sweep arrays stay in the heap and later ones fragment it: the peak RSS is then
above the live bytes. A fixed threshold (the environment variable) returns every array of
1 MiB or more on free, so the RSS follows the live bytes that the plans count.

Planned: ``quant.gptq_plan(model, calib)`` and ``hesse.plan(obj, compress=...)`` (the
calibration memory model of ``hesse.problem.calibration``), before the run; measured: the rise
of the process's peak RSS (VmHWM, reset just before the run) over the RSS with the model loaded
and one batch run.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys

import sparse
import torch
import workloads

import hesse
from hesse import prune, quant


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS"))
    return int(line.split()[1]) / 2**10


def peak_mib() -> float:
    """The peak RSS since the last reset (VmHWM), else since the start (ru_maxrss)."""
    with open("/proc/self/status") as f:
        line = next((line for line in f if line.startswith("VmHWM")), None)
    if line is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    return int(line.split()[1]) / 2**10


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main(name: str, method: str) -> None:
    torch.set_num_threads(1)
    model = workloads.load(name)
    calib = workloads.calibration(name)
    names = sparse.block_weights(model)
    obj = hesse.Objective(model, calib, params=names if method == "sparsegpt" else None)
    with torch.no_grad():
        model(**{k: v for k, v in calib[0].items() if k != "labels"})  # warm the allocator
    peak_before = peak_mib()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back: the rise is then the run's
    reset_peak()
    before = rss_mib()
    if method == "gptq":
        q = quant.gptq(model, calib, bits=4, embeddings=None)
        held = quant.quantization_of(q).hessian_bytes
    else:
        held = prune.prune(obj, 0.5, "sparsegpt", params=names).calibration.peak_bytes
    peak = peak_mib()
    rise = peak - before
    # the plans (made after the run here, so that their own forward pass is not in the peak)
    planned = hesse.plan(obj, compress=method)  # the low-layer model, from the objective
    gptq_plan = quant.gptq_plan(model, calib) if method == "gptq" else None
    doc = {"workload": name, "method": method,
           "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
           "rss_before_mib": before, "peak_rss_mib": peak,
           "peak_before_mib": peak_before, "rise_mib": rise,
           "planned_extra_mib": planned.extra_bytes / 2**20,
           "planned_over_measured": planned.extra_bytes / 2**20 / rise, "plan": str(planned),
           "gptq_plan_extra_mib": gptq_plan.extra_bytes / 2**20 if gptq_plan else None,
           "calibration_state_mib": held / 2**20}  # fmt: skip
    print(json.dumps(doc), flush=True)
    with open(workloads.HERE / "memory.jsonl", "a") as f:
        f.write(json.dumps(doc) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "gptq")
