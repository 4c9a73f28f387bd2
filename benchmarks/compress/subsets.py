"""SparseGPT 50% on MiniLM, hesse vs llm-compressor, on other calibration subsets.

    OMP_NUM_THREADS=1 .venv/bin/python subsets.py minilm 128 256 384   # -> subsets-minilm.json

Each subset is 128 training sequences from a different offset (0 is sparse.py's); both tools
get the same subset (llm-compressor in the peer venv through ``_sparse_llmc.py``). Says whether
the gap of sparse.py's row (hesse 0.3325 vs llm-compressor 0.3292) is inside the spread that
the choice of calibration data makes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import sparse
import torch
import workloads
from safetensors.torch import load_file

from hesse import Objective, prune


def hesse_loss(name: str, offset: int) -> dict:
    model = workloads.load(name)
    calib = workloads.calibration(name, offset=offset)
    names = sparse.block_weights(model)
    start = time.perf_counter()
    plan = prune.prune(Objective(model, calib), 0.5, "sparsegpt", params=names)
    pruned = plan.apply(model)
    return {**workloads.evaluate(pruned, name), "seconds": time.perf_counter() - start}


def llmc_loss(name: str, offset: int) -> dict:
    out = sparse.OUT / f"llmc-{name}-0.5-offset{offset}"
    cmd = [str(sparse.PEER), str(sparse.HERE / "_sparse_llmc.py"), name, "0.5", str(out),
           str(offset)]  # fmt: skip
    done = subprocess.run(cmd, cwd=sparse.HERE, capture_output=True, text=True, env=sparse._env())
    if done.returncode:
        return {"error": (done.stderr or done.stdout)[-800:]}
    pruned = workloads.load(name)
    pruned.load_state_dict(load_file(out / "weights.safetensors"), strict=False)
    run = json.loads((out / "run.json").read_text())
    return {**workloads.evaluate(pruned, name), "seconds": run["seconds"]}


def main(name: str, offsets: list[int]) -> None:
    torch.set_num_threads(1)
    path = workloads.HERE / f"subsets-{name}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    for offset in offsets:
        key = str(offset)
        if key in doc and "error" not in doc[key].get("llmc", {}):
            continue
        doc[key] = {"hesse": hesse_loss(name, offset), "llmc": llmc_loss(name, offset)}
        print(key, json.dumps(doc[key]), flush=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], [int(x) for x in sys.argv[2:]])
