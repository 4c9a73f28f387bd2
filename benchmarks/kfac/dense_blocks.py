"""KFAC/EKFAC's exact dense blocks (LayerNorms, ...): group by group vs. all groups together.

``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kfac/dense_blocks.py`` (one CPU thread) times

1. building ``EKFACOperator`` on the bench transformer block (LayerNorms analysed too) and on
   GPT-2 from a config (every parameter), for the GGN and the empirical Fisher, with the
   former construction (one restricted operator and ``to_dense`` per dense group) and the
   current one (``hesse.operators._kfac_dense.dense_blocks``: one operator over the union,
   shared passes, wide column blocks), checking that the blocks are the same numbers;
2. ``hesse influence --method ekfac`` on benchmarks/influence_real's GPT-2 and BERT (run that script
   once first to write its ``.cache``), both ways, checking that the scores are the same.

The former construction is patched in (``hesse.operators.kfac.dense_blocks``), nothing else
changes. Writes a section of benchmarks/kfac/RESULTS.md (between the ``dense-blocks`` markers).
"""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
INFLUENCE = ROOT / "benchmarks" / "influence_real" / ".cache"
START, END = "<!-- dense-blocks:start -->", "<!-- dense-blocks:end -->"


def former_dense_blocks(objective, groups, kind, *, mc_samples=1, seed=0, **_):
    """The former construction: each dense group's own restricted operator, densified."""
    from hesse.operators._kfac_blocks import DenseBlock
    from hesse.operators.gauss_newton import FisherOperator, GGNOperator

    out = {}
    for gi, g in enumerate(groups):
        if not g.dense:
            continue
        sub = objective.restrict(list(g.names))
        if kind == "exact":
            op = GGNOperator(sub, psd=True)
        else:
            op = FisherOperator(sub, kind, mc_samples=mc_samples, seed=seed)
        M = op.to_dense()
        shapes = [objective.params[n].shape for n in g.names]
        out[gi] = DenseBlock(g.names, shapes, (M + M.T) / 2, g.label)
    return out


def _objectives():
    sys.path.insert(0, str(HERE))
    from workloads import block, gpt2_model

    from hesse import Objective

    w = block(torch.float64, "bench")
    yield "transformer block (d=64, 2 LayerNorms)", Objective(w.model, w.batches, w.loss)
    gpt = gpt2_model(torch.float64, "bench", tied=True)
    ids = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(3))
    batches = [{"input_ids": ids[s : s + 16], "labels": ids[s : s + 16]} for s in (0, 16)]
    yield "GPT-2 (2 layers, n_embd 64, 5 LayerNorms)", Objective(gpt, batches)


def operator_rows() -> list[dict]:
    import hesse.operators.kfac as kfac
    from hesse import EKFACOperator
    from hesse.operators._kfac_layers import find_groups

    current, rows = kfac.dense_blocks, []
    for name, obj in _objectives():
        for kind in ("exact", "empirical"):
            built, seconds = {}, {}
            for way, fn in (("former", former_dense_blocks), ("current", current)):
                kfac.dense_blocks = fn
                start = time.perf_counter()
                built[way] = EKFACOperator(obj, kind)
                seconds[way] = time.perf_counter() - start
            kfac.dense_blocks = current
            groups = find_groups(obj, 4096, "benchmark")
            for way, fn in (("former", former_dense_blocks), ("current", current)):
                times = []
                for _ in range(2):  # the best of two: the machine is shared
                    start = time.perf_counter()
                    fn(obj, groups, kind)
                    times.append(time.perf_counter() - start)
                seconds[f"{way} dense"] = min(times)
            diff, n = 0.0, 0
            for label, b in built["former"].factors.items():
                if hasattr(b, "matrix"):
                    new = built["current"].factors[label].matrix
                    diff = max(diff, float((new - b.matrix).abs().max() / b.matrix.abs().max()))
                    n += b.matrix.shape[0]
            rows.append({"case": name, "kind": kind, "dense params": n, **seconds, "diff": diff})
            print(json.dumps(rows[-1]), flush=True)
    return rows


CLI = {
    "GPT-2 (103,616 parameters, 200 lines)": ["--hf", "gpt2", "--data", "train.txt"],
    "BERT classifier (75,010 parameters, 200 lines)": ["--hf", "bert", "--data", "train.csv"],
}


def cli_rows() -> list[dict]:
    rows = []
    for case, data in CLI.items():
        scores = {}
        for way in ("former", "current"):
            queries = "queries.txt" if data[-1].endswith(".txt") else "queries.csv"
            argv = [*data, "--queries", queries, "--method", "ekfac", "--damping", "0.01"]
            argv += ["--quiet", "--threads", "1", "--out", f"dense-{way}"]
            start = time.perf_counter()
            cmd = [sys.executable, __file__, "--cli", way, *argv]
            out = subprocess.run(cmd, cwd=INFLUENCE, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if out.returncode:
                raise RuntimeError(out.stderr[-2000:])
            folder = INFLUENCE / f"dense-{way}"
            doc = json.loads((folder / "results.json").read_text())["results"]
            scores[way] = _tensor(torch.load(folder / "scores.pt"))
            row = {"case": case, "way": way, "wall": wall, "influence": doc["influence"]["seconds"]}
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
        a, b = scores["former"], scores["current"]
        rows[-1]["score diff"] = float((a - b).abs().max() / a.abs().max())
    return rows


def _tensor(saved) -> torch.Tensor:
    return torch.as_tensor(saved["scores"] if isinstance(saved, dict) else saved)


def report(ops: list[dict], cli: list[dict]) -> str:
    lines = [
        START,
        "## Exact dense blocks built together (LayerNorms and other unfactored groups)",
        "",
        "`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kfac/dense_blocks.py` (float64, one "
        "CPU thread, shared 2-core machine). *former*: one restricted GGN/Fisher operator and "
        "`to_dense` per dense group (a linearization of every batch, then a jvp and a vjp per "
        "column, for each group); *current*: `hesse.operators._kfac_dense.dense_blocks`, one "
        "linearization of each batch for all dense groups, a jvp per column and no vjp (GGN: "
        "⟨J e_i, H J e_j⟩ from the kept tangents; Fisher: the per-row coefficients "
        "⟨r_n, J_n e_i⟩, or the per-row gradients J_nᵀ r_n when a batch has fewer non-zero "
        "rows than dense parameters). `diff`: max |current − former| / max |former| over the "
        "blocks. Dense blocks alone: the best of two runs.",
        "",
        "| case | kind | dense params | EKFAC build s, former | current | dense blocks s, "
        "former | current | speed-up | diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ops:
        lines.append(
            f"| {r['case']} | {r['kind']} | {r['dense params']} | {r['former']:.2f} | "
            f"{r['current']:.2f} | {r['former dense']:.2f} | {r['current dense']:.2f} | "
            f"{r['former dense'] / r['current dense']:.1f}× | {r['diff']:.1e} |"
        )
    if cli:
        lines += [
            "",
            "`hesse influence --hf DIR --method ekfac` on benchmarks/influence_real's models "
            "(random weights; 2 queries, `--damping 0.01 --threads 1`, the CLI's default "
            "curvature; wall time includes start-up). `score diff`: max |current − former| / "
            "max |former| over the scores (float32 runs).",
            "",
            "| model | construction | wall s | influence s | score diff |",
            "|---|---|---|---|---|",
        ]
        for r in cli:
            diff = f"{r['score diff']:.1e}" if "score diff" in r else ""
            lines.append(
                f"| {r['case']} | {r['way']} | {r['wall']:.1f} | {r['influence']:.1f} | {diff} |"
            )
    return "\n".join([*lines, END])


def write(section: str) -> None:
    path = HERE / "RESULTS.md"
    text = path.read_text()
    if START in text:
        text = text[: text.index(START)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    if sys.argv[1:2] == ["--cli"]:  # a patched command-line run (see cli_rows)
        import hesse.operators.kfac as kfac

        if sys.argv[2] == "former":
            kfac.dense_blocks = former_dense_blocks
        sys.argv = ["hesse", "influence", *sys.argv[3:]]
        runpy.run_module("hesse.cli", run_name="__main__")
        return
    torch.set_num_threads(1)
    ops = operator_rows()
    cli = cli_rows() if (INFLUENCE / "gpt2").exists() else []
    write(report(ops, cli))


if __name__ == "__main__":
    main()
