"""GPTQ, Hessian-allocated mixed precision and the peers on the two workloads -> results-<w>.json.

    OMP_NUM_THREADS=1 .venv/bin/python run.py minilm     # then: run.py gpt; report.py

Same model, calibration (128 training sequences of 64 tokens) and held-out data for every row.
Quantized: every Linear layer except a classification head (``classifier``; the GPT's LM head
is tied to its embeddings); weights int, symmetric, groups of 128 inputs; embeddings in float
unless the row says so.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import peers
import torch
import workloads

import hesse
from hesse import quant

OUT = workloads.CACHE / "out"
BITS = (2, 3, 4, 8)
NARROW = False  # the rows in RESULTS.md used the narrow grid, the default until full-range
EMB = "hesse GPTQ W4 g128 + 8-bit embeddings (bfloat16 on disk)"


def folder_bytes(path: Path | None) -> int | None:
    return (
        None
        if path is None
        else sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    )


def measure(rows, label, model, name, seconds, path=None, **extra):
    ev = workloads.evaluate(model, name)
    rows.append({"row": label, **ev, "bytes": folder_bytes(path), "seconds": seconds, **extra})
    print(json.dumps(rows[-1]), flush=True)
    done = workloads.HERE / f"rows-{name}.jsonl"  # rows measured so far: a rerun skips them
    with open(done, "a") as f:
        f.write(json.dumps(rows[-1]) + "\n")


def cached(rows, name, label) -> bool:
    """Append the row ``label`` measured by an earlier run, if there is one."""
    done = workloads.HERE / f"rows-{name}.jsonl"
    old = [json.loads(line) for line in done.read_text().splitlines()] if done.exists() else []
    hit = [r for r in old if r["row"] == label]
    rows.extend(hit[-1:])
    return bool(hit)


def layers_of(model, name):
    skip = {"classifier"} if name == "minilm" else set()
    return [n for n in quant.quantizable(model) if n not in skip and n != "lm_head"]


def hesse_rows(rows, model, name, calib, layers):
    for b in (4, 3):
        if cached(rows, name, f"RTN W{b} g128 (hesse Quantizer)"):
            continue
        grid = quant.Quantizer(b, "group", 128)
        start = time.perf_counter()
        rtn = quant.quantize(model, {n: b for n in layers}, grid)
        measure(rows, f"RTN W{b} g128 (hesse Quantizer)", rtn, name, time.perf_counter() - start)
    for b in (4, 3):
        if cached(rows, name, f"hesse GPTQ W{b} g128"):
            continue
        start = time.perf_counter()
        q = quant.gptq(
            model, calib, bits={n: b for n in layers}, embeddings=None, full_range=NARROW
        )
        seconds = time.perf_counter() - start
        saved = quant.save(q, OUT / name / f"hesse-w{b}")
        measure(rows, f"hesse GPTQ W{b} g128", q, name, seconds, saved.path,
                hessian_mib=q.hesse_quantization.hessian_bytes / 2**20,
                rtn_kept=sum(r.rule == "rtn" for r in q.hesse_quantization.layers))  # fmt: skip


def emb_row(rows, model, name, calib, layers):
    if cached(rows, name, EMB):
        return
    start = time.perf_counter()
    q = quant.gptq(model, calib, bits={n: 4 for n in layers}, embeddings=8, full_range=NARROW)
    seconds = time.perf_counter() - start
    saved = quant.save(q, OUT / name / "hesse-w4-emb8")
    measure(rows, EMB, q, name, seconds,
            saved.path)  # fmt: skip


def mixed_rows(rows, model, name, calib, layers, budget):
    """Trace sensitivity x GPTQ error ratio -> exact allocation at 3.5 bits -> GPTQ."""
    start = time.perf_counter()
    obj = hesse.Objective(model, calib[:2])  # 32 sequences: the traces are per-weight means
    sens = quant.sensitivity(obj, BITS, quantizer=quant.Quantizer(4, "group", 128),
                             budget=budget, layers=layers, seed=0)  # fmt: skip
    sens_g = quant.gptq_sensitivity(sens, model, calib, full_range=NARROW)
    t_sens = time.perf_counter() - start
    params = dict(model.named_parameters())
    n = sum(params[p].numel() for p in quant.quantizable(model, layers).values())
    out = {}
    for label, s in (("Ω = HAWQ-V2 trace", sens), ("Ω = trace x GPTQ/RTN error", sens_g)):
        alloc = quant.allocate(s, n * 3.5 / 8)
        start = time.perf_counter()
        q = quant.gptq(model, calib, bits=alloc.bits, embeddings=None, full_range=NARROW)
        seconds = t_sens + time.perf_counter() - start
        saved = quant.save(q, OUT / name / f"hesse-mixed-{len(out)}")
        hist = {b: sum(v == b for v in alloc.bits.values()) for b in BITS}
        measure(rows, f"hesse GPTQ mixed 3.5-bit ({label})", q, name, seconds, saved.path,
                avg_bits=alloc.size_bytes * 8 / n, widths=hist)  # fmt: skip
        out[label] = s
    return out


def ranking(model, name, calib, layers, sens_by, test_batches=4):
    """Spearman correlation of each Ω at 3 bits with the measured loss rise of GPTQ on one layer."""
    base = workloads.evaluate(model, name)["loss"]
    rises = {}
    for n in layers:
        q = quant.gptq(model, calib, bits={n: 3}, embeddings=None, full_range=NARROW)
        rises[n] = workloads.evaluate(q, name)["loss"] - base
    out = {}
    for label, s in sens_by.items():
        omega = {r.name: r.omega[3] for r in s.layers}
        out[label] = _spearman([omega[n] for n in layers], [rises[n] for n in layers])
    return {"spearman_vs_single_layer_gptq_w3": out, "rises": rises}


def _spearman(a, b):
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def peer_rows(rows, model, name, calib, layers):
    tok = workloads.transformers.AutoTokenizer.from_pretrained(workloads.minilm_folder())
    ignore = ["classifier"] if name == "minilm" else ["lm_head"]
    for b in (4, 3):
        try:
            q, seconds, path = peers.llmcompressor_gptq(model, tok, calib, b, 128, ignore,
                                                        OUT / name / f"llmc-w{b}")  # fmt: skip
            measure(rows, f"llm-compressor GPTQModifier W{b} g128", q, name, seconds, path)
        except Exception as err:  # noqa: BLE001 - the row says why
            rows.append({"row": f"llm-compressor GPTQModifier W{b} g128", "error": repr(err)[:300]})
    q, seconds, _ = peers.torchao_int4_rtn(model, 128, ignore)
    path = OUT / name / "torchao-int4"
    path.mkdir(parents=True, exist_ok=True)
    torch.save(q.state_dict(), path / "state_dict.pt")
    measure(rows, "torchao int4 weight-only RTN g128", q, name, seconds, path)


def main(name: str) -> None:
    torch.set_num_threads(1)
    model = workloads.load(name)
    calib = workloads.calibration(name)
    layers = layers_of(model, name)
    rows: list[dict] = []
    if not cached(rows, name, "float32"):
        model.save_pretrained(OUT / name / "float")
        measure(rows, "float32", model, name, 0.0, OUT / name / "float")
    hesse_rows(rows, model, name, calib, layers)
    sens_by = mixed_rows(rows, model, name, calib, layers, budget=10 if name == "minilm" else 30)
    peer_rows(rows, model, name, calib, layers)
    emb_row(rows, model, name, calib, layers)
    rank = ranking(model, name, calib, layers, sens_by) if name == "gpt" else None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    doc = {"workload": name, "rows": rows, "ranking": rank, "peak_rss_mib": peak,
           "layers": len(layers), "torch_threads": torch.get_num_threads()}  # fmt: skip
    (workloads.HERE / f"results-{name}.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
