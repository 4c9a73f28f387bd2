"""Peak memory of hesse's GPTQ on a workload, measured in a fresh process, against gptq_plan.

OMP_NUM_THREADS=1 .venv/bin/python memory.py minilm      # prints one JSON line
"""

from __future__ import annotations

import json
import resource
import sys

import torch
import workloads

from hesse import quant


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS"))
    return int(line.split()[1]) / 2**10


def main(name: str) -> None:
    torch.set_num_threads(1)
    model = workloads.load(name)
    calib = workloads.calibration(name)
    with torch.no_grad():
        model(**{k: v for k, v in calib[0].items() if k != "labels"})  # warm the allocator
    before = rss_mib()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    q = quant.gptq(model, calib, bits=4, embeddings=None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    plan = quant.gptq_plan(model)
    print(json.dumps({
        "workload": name, "rss_before_mib": before, "peak_rss_mib": peak,
        "peak_before_mib": peak_before, "rise_mib": peak - before,
        "plan_extra_mib": (plan.total - plan.model_bytes) / 2**20,
        "plan": str(plan), "hessian_mib_held": quant.quantization_of(q).hessian_bytes / 2**20,
    }))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
