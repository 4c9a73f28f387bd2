"""only-train-once's HESSO on the digits CNN and the small BERT, in its own venv (no hesse).

Setup (once): ``python3 -m venv benchmarks/hesso/.venv``, then with ``-c /tmp/torch-pin.txt``
``benchmarks/hesso/.venv/bin/pip install torch==2.13.0``, then ``only-train-once packaging
transformers==5.25.0``. Run ``benchmarks/hesso/run.py`` first (it exports the models and data
to ``.cache/*_for_oto.pt``), then ``benchmarks/hesso/.venv/bin/python
benchmarks/hesso/oto_run.py``, then ``run.py --report`` to add the table to RESULTS.md.

only-train-once 3.0.1 imports ``torch.onnx._globals`` and calls ``torch.onnx._optimize_graph``,
which torch 2.13 keeps under ``torch.onnx._internal.torchscript_exporter``, and it calls
``.cuda()`` unconditionally when it picks the redundant groups: ``_shim_torch`` points the two
names at their new home and makes ``Tensor.cuda`` the identity on this CPU-only machine. Its
ONNX trace has no ``scaled_dot_product_attention`` at opset 16, so BERT runs with eager
attention (the same function).
"""

from __future__ import annotations

import copy
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"


def _shim_torch() -> None:
    """Point only-train-once 3.0.1 at torch 2.13's TorchScript exporter (it moved) and CPU."""
    from torch.onnx._internal.torchscript_exporter import _globals, utils

    sys.modules["torch.onnx._globals"] = _globals
    torch.onnx._optimize_graph = utils._optimize_graph
    torch.Tensor.cuda = lambda self, *a, **k: self


def _logits_loss(model, batch):
    if isinstance(batch, dict):
        out = model(**batch)
        return out.logits, out.loss
    logits = model(batch[0])
    return logits, F.cross_entropy(logits, batch[1])


def measure(model, test) -> dict:
    right = total = 0
    loss = 0.0
    with torch.no_grad():
        for batch in test:
            logits, value = _logits_loss(model.eval(), batch)
            y = batch["labels"] if isinstance(batch, dict) else batch[1]
            right += int((logits.argmax(-1) == y).sum())
            loss += float(value) * len(y)
            total += len(y)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return {
        "widths": [p.shape[0] for p in model.parameters() if p.ndim > 1],
        "test_accuracy": right / total,
        "test_loss": loss / total,
        "params": sum(p.numel() for p in model.parameters()),
        "bytes": buf.tell(),
    }


def run(model, data, variant, steps, lr, sparsity, start, pruning, periods) -> dict:
    from only_train_once import OTO

    model = copy.deepcopy(model).train()
    first = data["tune_batches"][0]
    dummy = (first["input_ids"][:1],) if isinstance(first, dict) else first[0][:1]
    t0 = time.perf_counter()
    oto = OTO(model=model, dummy_input=dummy)
    opt = oto.hesso(
        variant=variant, lr=lr, target_group_sparsity=sparsity,
        start_pruning_step=start, pruning_steps=pruning, pruning_periods=periods,
    )  # fmt: skip
    batches = data["tune_batches"]
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(0))
    for step in range(steps):
        opt.zero_grad()
        _logits_loss(model, batches[int(order[step % len(order)])])[1].backward()
        opt.step()
    with tempfile.TemporaryDirectory() as out:
        oto.construct_subnet(out_dir=out)
        small = torch.load(oto.compressed_model_path, weights_only=False)
    seconds = time.perf_counter() - t0
    out = measure(small, data["test"])
    if isinstance(first, dict):
        out["widths"] = out["widths"][:3]  # word embeddings: the hidden size; BERT's first
    return {"steps": steps, "seconds": seconds, "groups": opt.total_num_groups, **out}


def rows_for(name: str, variant: str, sparsities) -> list[dict]:
    data = torch.load(CACHE / f"{name}_for_oto.pt", weights_only=False)
    for key in ("fresh", "dense"):
        if hasattr(data[key], "set_attn_implementation"):
            data[key].set_attn_implementation("eager")
    rows = []
    n = data["steps"]
    for s in sparsities:
        at = {"model": name, "sparsity": s}
        tuned = (data["dense"], variant, data["tune"], data["lr"], s, 0, 200, 4)
        scratch = (data["fresh"], variant, n, data["scratch_lr"], s, int(0.3 * n), int(0.4 * n), 5)
        for method, args in (("oto hesso tuned", tuned), ("oto hesso scratch", scratch)):
            try:
                rows.append({**at, "method": method, **run(args[0], data, *args[1:])})
            except Exception as e:  # noqa: BLE001  (recorded in the table: what failed and how)
                rows.append({**at, "method": method, "error": f"{type(e).__name__}: {e}"})
        print(f"oto {name} {s}: done", file=sys.stderr)
    return rows


def main() -> None:
    torch.set_num_threads(1)
    _shim_torch()
    rows = rows_for("digits", "sgd", (0.5, 0.75)) + rows_for("bert", "adam", (0.3, 0.6))
    out = {"rows": rows, "torch": torch.__version__}
    (CACHE / "oto.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
