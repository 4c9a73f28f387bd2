"""SparseGPT on the compression workloads: hesse against llm-compressor and magnitude pruning.

Run from the repository root (about 10 minutes on one core, after ``workloads.py`` trained
the models)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compress/sparse.py

Every method prunes the same weights (the ``nn.Linear`` weights inside the transformer blocks;
embeddings, pooler, classifier and the tied LM head stay dense) at 50% per layer, unstructured
and 2:4, from the same 128 calibration sequences, one thread each. llm-compressor runs in the
peer venv ``benchmarks/compress/.venv`` (``_sparse_llmc.py``); its pruned weights come back
through a safetensors file and are evaluated here like hesse's. Writes ``SPARSE.md`` and
``sparse.json``; pruned folders go to ``.cache/sparse/``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import workloads  # noqa: E402

from hesse import Objective, prune  # noqa: E402
from hesse.prune._sequential import sparsegpt_plan  # noqa: E402

PEER = HERE / ".venv" / "bin" / "python"
OUT = workloads.CACHE / "sparse"
STRUCTURES = {"50%": ("unstructured", 0.5), "2:4": ("2:4", None)}


def block_weights(model) -> list[str]:
    """The ``nn.Linear`` weights inside the transformer blocks."""
    return [
        n for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and (".layer." in n or ".h." in n)
        for n in [n + ".weight"]
    ]  # fmt: skip


def hesse_rows(name: str, model, calib, names, structure, sparsity) -> list[dict]:
    obj = Objective(model, calib)
    runs = {
        "magnitude (hesse, per layer)": lambda: prune.prune(
            obj, sparsity, "magnitude", structure=structure, scope="layer", params=names
        ),
        "hesse sparsegpt": lambda: prune.prune(
            obj, sparsity, "sparsegpt", structure=structure, params=names
        ),
        "hesse sparsegpt, sweep only (paper)": lambda: sparsegpt_plan(
            obj, sparsity, structure, names, fallback=False
        ),
        "hesse sparsegpt, one pass (not sequential)": lambda: prune.prune(
            obj, sparsity, "sparsegpt", structure=structure, params=names, sequential=False
        ),
    }
    rows = []
    for method, run in runs.items():
        start = time.perf_counter()
        plan = run()
        pruned = plan.apply(model)
        seconds = time.perf_counter() - start
        c = plan.calibration
        peak = c.peak_bytes / 2**20 if c else None
        rows.append(measure(name, method, pruned, seconds, structure, peak))
        print(rows[-1], flush=True)
    return rows


def llmc_row(name: str, model, structure: str) -> dict:
    key = "2:4" if structure == "2:4" else "0.5"
    out = OUT / f"llmc-{name}-{key.replace(':', '-')}"
    cmd = [str(PEER), str(HERE / "_sparse_llmc.py"), name, key, str(out)]
    done = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, env=_env())
    if done.returncode:
        tail = (done.stderr or done.stdout)[-1500:]
        return {"method": "llm-compressor SparseGPTModifier", "structure": structure,
                "error": tail}  # fmt: skip
    run = json.loads((out / "run.json").read_text())
    pruned = workloads.load(name)
    pruned.load_state_dict(load_file(out / "weights.safetensors"), strict=False)
    row = measure(name, "llm-compressor SparseGPTModifier", pruned, run["seconds"], structure, None)
    row["peer"] = run
    return row


def _env() -> dict:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}


def measure(name, method, model, seconds, structure, peak_mib) -> dict:
    names = block_weights(model)
    params = dict(model.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in names)
    total = sum(params[n].numel() for n in names)
    slug = "".join(c if c.isalnum() else "-" for c in f"{name}-{structure}-{method}")
    folder = OUT / slug
    saved = prune.save(model, folder)
    bitmask = saved.weight_bytes - 4 * zeros + total // 8 if zeros else None
    row = {
        "workload": name, "method": method, "structure": structure,
        "sparsity": zeros / total if total else 0.0, **workloads.evaluate(model, name),
        "bytes": saved.total_bytes, "weight_bytes": saved.weight_bytes,
        "bitmask_bytes": bitmask, "seconds": seconds, "peak_mib": peak_mib,
    }  # fmt: skip
    return row


def structured_row(name: str, model, calib) -> dict:
    """MLP neurons removed (50%, magnitude): a shrunk folder, reloaded by ``prune.load``."""
    start = time.perf_counter()
    plan = prune.prune(Objective(model, calib), 0.5, "magnitude", structure="channels")
    pruned = plan.apply(model)
    seconds = time.perf_counter() - start
    folder = OUT / f"{name}-channels"
    saved = prune.save(pruned, folder)
    back = prune.load(folder)
    batch = {k: v for k, v in calib[0].items() if k != "labels"}
    with torch.no_grad():
        gap = float((back(**batch).logits - pruned(**batch).logits).abs().max())
    return {
        "workload": name, "method": "magnitude, MLP neurons removed (hesse)",
        "structure": "channels 50%", "sparsity": plan.removed_params / plan.total_params,
        **workloads.evaluate(back, name), "bytes": saved.total_bytes,
        "weight_bytes": saved.weight_bytes, "bitmask_bytes": None, "seconds": seconds,
        "peak_mib": None, "reload_max_abs_diff": gap, "params_on_disk": saved.params_on_disk,
    }  # fmt: skip


def run_workload(name: str) -> list[dict]:
    model = workloads.load(name)
    calib = workloads.calibration(name)
    names = block_weights(model)
    rows = [measure(name, "dense", model, 0.0, "dense", None)]
    print(rows[-1], flush=True)
    for structure, sparsity in STRUCTURES.values():
        rows += hesse_rows(name, model, calib, names, structure, sparsity)
        rows.append(llmc_row(name, model, structure))
        print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    metric = "acc" if "acc" in rows[0] else "ppl"
    head = f"| method | structure | sparsity | held-out loss | {metric} | folder bytes | "
    head += "bitmask bytes* | seconds | calib. peak MiB |\n|" + "---|" * 9 + "\n"
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['structure']} | failed: see notes | | | | | | |")
            continue
        peak = f"{r['peak_mib']:.1f}" if r["peak_mib"] is not None else ""
        bitmask = f"{r['bitmask_bytes']:,}" if r["bitmask_bytes"] and r["sparsity"] else ""
        lines.append(
            f"| {r['method']} | {r['structure']} | {r['sparsity']:.5f} | {r['loss']:.4f} | "
            f"{r[metric]:.4f} | {r['bytes']:,} | {bitmask} | {r['seconds']:.1f} "
            f"| {peak} |"
        )
    return head + "\n".join(lines) + "\n"


NOTES = """\
Every method prunes the same weights: the `nn.Linear` weights inside the transformer blocks
(MiniLM: 36 matrices, 10.6M weights; GPT: 16 matrices), 50% per layer, unstructured or 2:4,
from the same 128 calibration sequences of 64 tokens (`workloads.calibration`), no
retraining; embeddings, pooler, classifier and the tied LM head stay dense. One CPU thread per
run on a shared 2-core machine, so seconds are rough. Held-out data: `workloads.test`.

- **hesse sparsegpt** is `prune.prune(obj, 0.5, "sparsegpt")` (or `structure="2:4"`):
  block-by-block (sequential) calibration, the paper's sweep with blocks of 128 columns and
  damping 0.01, and the magnitude mask as a fallback candidate per layer (never chosen here:
  its rows equal the "sweep only" rows). **sweep only (paper)** switches the fallback off
  (`fallback=False`, tested equal to a float64 transcription of the paper's algorithm).
  **one pass** takes every layer's Hessian from the dense model (`sequential=False`, the same
  as `method="layer_obs"`).
- **llm-compressor SparseGPTModifier** (0.14.0.1, in `benchmarks/compress/.venv`, with
  transformers 5.17) runs on CPU with `oneshot`'s default pipeline (sequential through the
  blocks), `block_size=128`, `dampening_frac=0.01`, the same calibration batches in a
  `DataLoader`; its unstructured masks prune one weight more per block of 128 columns (its
  `tmp <= thresh`), hence 50.002% and 50.004%.
- **sparsity**: the fraction of zeros in the pruned block weights (the structured row: the
  fraction of the model's parameters removed).
- **folder bytes**: every row is saved by `hesse.prune.save` as a Hugging Face folder that
  `from_pretrained` loads, dense with the zeros in place: compressed-tensors 0.19/0.20 (the
  versions these transformers load through) have removed their sparse compressors
  (`sparse-bitmask`, `sparse-24-bitmask`), so no loadable sparse format exists; llm-compressor
  0.14 also saves dense. **bitmask bytes\\*** is what a bitmask format would take (kept float32
  values plus one bit per pruned-tensor weight), computed, not written.
- **calib. peak MiB**: `plan.calibration.peak_bytes`, the largest calibration state hesse
  held at once (one block's stored inputs and outputs and its float64 input Hessians; the
  one-pass rows hold every layer's Hessian at once), equal to `planned_bytes`, which hesse
  computes before forming any Hessian.
"""


def render(results: dict) -> str:
    text = "# SparseGPT: hesse vs llm-compressor vs magnitude pruning\n\n"
    text += "Produced by `benchmarks/compress/sparse.py` (numbers in `sparse.json`).\n\n"
    text += NOTES + "\n" + FINDINGS + "\n"
    for w, rows in results.items():
        text += f"## {w}\n\n" + table(rows) + "\n"
    return text + subsets_section()


def subsets_section() -> str:
    """The table of subsets.py: SparseGPT 50% of hesse and llm-compressor on other subsets."""
    path = HERE / "subsets-minilm.json"
    if not path.exists():
        return ""
    doc = json.loads(path.read_text())
    rows = {"0": {"hesse": _row("minilm", "hesse sparsegpt"),
                  "llmc": _row("minilm", "llm-compressor SparseGPTModifier")}}  # fmt: skip
    rows |= doc
    out = ["## minilm, 50% unstructured, other calibration subsets (`subsets.py`)", "",
           "128 training sequences from the given offset (0: the rows above); both tools get "
           "the same subset.", "",
           "| offset | hesse loss | hesse acc | llm-compressor loss | llm-compressor acc | "
           "hesse − llm-compressor |", "|---|---|---|---|---|---|"]  # fmt: skip
    gaps = []
    for key, r in sorted(rows.items(), key=lambda kv: int(kv[0])):
        h, m = r["hesse"], r["llmc"]
        if "error" in m or not h:
            continue
        gaps.append(h["loss"] - m["loss"])
        out.append(f"| {key} | {h['loss']:.4f} | {h['acc']:.4f} | {m['loss']:.4f} | "
                   f"{m['acc']:.4f} | {gaps[-1]:+.4f} |")  # fmt: skip
    if len(gaps) > 1:
        mean = sum(gaps) / len(gaps)
        sd = (sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1)) ** 0.5
        out += ["", f"Gap over {len(gaps)} subsets: mean {mean:+.4f}, standard deviation "
                f"{sd:.4f}."]  # fmt: skip
    return "\n".join(out) + "\n"


def _row(workload: str, method: str) -> dict:
    data = json.loads((HERE / "sparse.json").read_text())
    return next((r for r in data.get(workload, []) if r["method"] == method
                 and r["structure"] == "unstructured"), {})  # fmt: skip


FINDINGS = """\
Findings (measured 2026-12-07, CPU, one thread per run):

- **Parity with llm-compressor.** On the GPT workload hesse's SparseGPT and llm-compressor's
  agree to the fourth digit of the held-out loss (50%: 4.66487 against 4.66488; 2:4: 4.67237
  against 4.67221). On MiniLM, 2:4: hesse 0.4096 (acc 0.876) against 0.4162 (acc 0.865);
  50%: hesse 0.3325 (acc 0.903) against 0.3292 (acc 0.901): neither is better on both
  settings; the masks differ by float64 against float32 sweeps and llm-compressor's one
  extra zero per block. Both beat magnitude pruning by far (MiniLM 2:4: 0.537, acc 0.796).
- **Is MiniLM's 50% gap (0.3325 against 0.3292) inside the spread?** On three more
  calibration subsets of 128 sequences (`subsets.py`, table at the end; the same subset for
  both tools) hesse minus llm-compressor is +0.0014, -0.0008 and +0.0028 (+0.0033 on the
  original): mean +0.0017, standard deviation 0.0019, so hesse's loss is higher on 3 of 4
  subsets by less than each tool's own spread over subsets (hesse 0.3321-0.3343,
  llm-compressor 0.3292-0.3351), while its accuracy is equal or higher on all four (0.891-0.903
  against 0.891-0.901). A mean gap of 1.8 standard errors over 4 subsets is not a significant
  difference; a small systematic one (about 0.002, from float64 against float32 sweeps and the
  one-extra-zero masks) cannot be excluded either.
- **The fallback never fired**: the default rows equal the "sweep only" rows; it costs the
  time of a second sweep (84 s against 72 s on MiniLM).
- **Sequential calibration did not help here.** On MiniLM the one-pass Hessians (all from the
  dense model) gave lower held-out loss (50%: 0.3298 against 0.3325; 2:4: 0.3904 against
  0.4096); on GPT the two agree to 3e-5. The paper's sequential scheme is what bounds memory:
  49.6 MiB of calibration state per MiniLM block against 141.8 MiB of Hessians for all layers
  at once (GPT, 4 blocks of width 128: 12.4 against 9.5 MiB, where the stored hidden states
  outweigh the small Hessians).
- **Time**: hesse is slower on MiniLM (72 to 90 s against 43 to 51 s): it accumulates the
  input Hessians in float64 (a third of the time, mostly the 1536-wide MLP output layer) and
  runs two block passes per block; on GPT the times are alike (4 to 6 s).
- **Bytes**: every folder is dense (about 90.9 MB MiniLM, 5.45 MB GPT): no loadable sparse
  format exists in compressed-tensors 0.19/0.20. A bitmask format would save 22% (MiniLM,
  whose embeddings stay dense) to 27% (GPT). Structured pruning is what shrinks a folder
  today: removing half of MiniLM's MLP neurons (magnitude, global; `sparse.py --structured`)
  gives a 76.7 MB folder of 19.2M numbers (dense 90.9 MB, 22.7M), reloaded by `prune.load`
  with outputs within 6e-7 of the pruned model, at a held-out loss of 0.617 (acc 0.850)
  without retraining.
"""


def main() -> None:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    args = sys.argv[1:]
    path = HERE / "sparse.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if args == ["--structured"]:
        model = workloads.load("minilm")
        row = structured_row("minilm", model, workloads.calibration("minilm"))
        print(row)
        results["minilm"] = [r for r in results["minilm"] if "neurons" not in r["method"]] + [row]
        path.write_text(json.dumps(results, indent=2))
    elif args != ["--report"]:
        for w in args or ["minilm", "gpt"]:
            results[w] = run_workload(w)
        path.write_text(json.dumps(results, indent=2))
    text = render(results)
    (HERE / "SPARSE.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
