"""llm-compressor's SparseGPTModifier on one workload; run by ``sparse.py`` in the peer venv.

Usage: ``.venv/bin/python _sparse_llmc.py WORKLOAD STRUCTURE OUT [OFFSET]`` (STRUCTURE ``0.5``
or ``2:4``; OFFSET: the first calibration sequence, 0 by default). Writes
``OUT/weights.safetensors`` (the pruned block weights) and ``OUT/run.json`` (seconds of
``oneshot``, versions). The calibration batches are ``workloads.calibration`` (the
same as hesse's), without labels, in a ``DataLoader`` that yields them as they are.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import workloads
from safetensors.torch import save_file
from torch.utils.data import DataLoader


def main(workload: str, structure: str, out: Path, offset: int = 0) -> None:
    torch.set_num_threads(1)
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    model = workloads.load(workload)
    batches = [
        {k: v for k, v in b.items() if k != "labels"}
        for b in workloads.calibration(workload, offset=offset)
    ]
    samples = sum(len(b["input_ids"]) for b in batches)
    nm = structure == "2:4"
    recipe = SparseGPTModifier(
        sparsity=0.5, mask_structure="2:4" if nm else "0:0", block_size=128,
        dampening_frac=0.01, targets=["Linear"],
        ignore=["re:.*classifier.*", "re:.*pooler.*", "re:.*lm_head.*"],
    )  # fmt: skip
    tok = transformers.AutoTokenizer.from_pretrained(workloads.CACHE / workload)
    start = time.perf_counter()
    oneshot(
        model=model, tokenizer=tok, dataset=DataLoader(batches, batch_size=None),
        recipe=recipe, num_calibration_samples=samples,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    weights = {
        n: p.detach().contiguous()
        for n, p in model.named_parameters()
        if ".h." in n or ".layer." in n
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, out / "weights.safetensors")
    run = {
        "seconds": seconds,
        "llmcompressor": llmcompressor.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    (out / "run.json").write_text(json.dumps(run, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 0)
