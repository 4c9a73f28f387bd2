"""KFAC and EKFAC: hesse against curvlinops, same machine, same run; and what only hesse takes.

    OMP_NUM_THREADS=1 benchmarks/.venv/bin/python benchmarks/kfac/run.py [--quick]
        [--transformers-from SITE_PACKAGES]

Writes benchmarks/kfac/RESULTS.md and results.json (with --quick: /tmp/hesse-kfac). Three parts:

- agreement (float64, d <= ~2400): the dense matrices of both tools, relative Frobenius
  difference, and one damped inverse product;
- cost (float32, larger models): build (factors; EKFAC: and its eigenvalue correction), one
  product, one inverse product (first: with the eigendecompositions; then repeated), each as
  the least of a few runs; peak memory of build + product + inverse in a fresh process;
- models curvlinops cannot take (``beyond.py``): hesse's numbers and ``curvature_gap``.

GPT-2 needs ``transformers``; if the bench venv lacks it, ``--transformers-from`` appends
another environment's site-packages (after ours, so torch stays the bench venv's).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import beyond  # noqa: E402
import tools as T  # noqa: E402
import workloads as W  # noqa: E402

import report  # noqa: E402

OPS, KINDS, TOOLS = ("KFAC", "EKFAC"), ("exact", "mc", "empirical"), ("hesse", "curvlinops")
AGREE = 1e-5
MAKERS = {
    "mlp": W.mlp,
    "cnn": W.cnn,
    "cnn_maxpool": lambda dt, size: W.cnn(dt, size, pool="max"),
    "block": W.block,
    "block_tokens": lambda dt, size: W.block(dt, size, per_token=True),
    "gpt2": W.gpt2,
}


def supported(w, op: str) -> bool:
    return op == "KFAC" or w.ekfac


def refusal(name: str, op: str, kind: str, size: str) -> str:
    """The error curvlinops raises, on a fresh copy (a failed build leaves hooks on the model)."""
    w = MAKERS[name](torch.float64, size)
    try:
        T.build_curvlinops(w, op, kind, T.objective(w).space.names)
    except Exception as e:  # noqa: BLE001 - recorded, not handled
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return "(no error)"


def agreement(name: str) -> list[dict]:
    """Dense float64 matrices of both tools on the small model."""
    w = MAKERS[name](torch.float64, "agree")
    obj = T.objective(w)
    names, d = obj.space.names, obj.dim
    E, v = torch.eye(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    rows = []
    for op in OPS:
        dense = {}
        for kind in KINDS:
            row = {"model": name, "d": d, "op": op, "kind": kind}
            if not supported(w, op):
                rows.append(
                    row | {"status": "refused", "curvlinops": refusal(name, op, kind, "agree")}
                )
                continue
            K = {t: T.build(t, w, op, kind, names) for t in TOOLS}
            dense[kind] = {t: K[t] @ E for t in TOOLS}
            Dh, Dc = dense[kind]["hesse"], dense[kind]["curvlinops"]
            ih, ic = (T.inverse(t, K[t]) @ v for t in TOOLS)
            row |= {"rel_frobenius": _rel(Dh, Dc), "rel_inverse": _rel(ih, ic)}
            if kind == "mc":  # independent draws: each tool against its own exact matrix
                row["mc_vs_exact"] = {t: _rel(dense["mc"][t], dense["exact"][t]) for t in TOOLS}
                row["status"] = "n/a (draws)"
            else:
                row["status"] = "agree" if row["rel_frobenius"] <= AGREE else "differs"
            rows.append(row)
            print("agree", row, flush=True)
    return rows


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def least(fn, reps: int, budget: float = 2.0) -> float:
    """Least wall time of up to ``reps`` calls, fewer once ``budget`` seconds are spent.

    The least, not the median: other processes only ever add time.
    """
    best, spent = float("inf"), 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        took = time.perf_counter() - t0
        best, spent = min(best, took), spent + took
        if spent > budget:
            break
    return best


def costs(name: str, quick: bool, memory: bool) -> list[dict]:
    """float32 timings of both tools on the larger model, and peak memory (kind="exact")."""
    w = MAKERS[name](torch.float32, "agree" if quick else "time")
    names = T.objective(w).space.names
    named = dict(w.model.named_parameters())
    grad_s = least(lambda: T.gradient(w, [named[n] for n in names]), 3)
    for tool in TOOLS:  # warm-up: first calls load kernels
        T.build(tool, w, "KFAC", "empirical", names)
    v = torch.randn(_dim(w))
    rows = []
    for op in OPS:
        for kind in KINDS:
            row = {"model": name, "d": len(v), "op": op, "kind": kind, "gradient_s": grad_s}
            for tool in TOOLS:
                if tool == "curvlinops" and not supported(w, op):
                    row[tool] = {"refused": True}
                    continue
                row[tool] = _tool_costs(tool, w, op, kind, names, v)
            if memory and kind == "exact":
                row["peak_mib"] = {
                    t: _memory(t, name, op, quick) for t in TOOLS if "refused" not in row[t]
                }
            rows.append(row)
            print("cost", row, flush=True)
    return rows


def _dim(w) -> int:
    return T.objective(w).dim


def _tool_costs(tool: str, w, op: str, kind: str, names: list[str], v: torch.Tensor) -> dict:
    box, out = {}, {}
    if tool == "hesse":  # the Objective (one forward; for HF, the loss inference) apart
        out["objective_s"] = least(lambda: box.update(obj=T.objective(w)), 3)

    def make():
        box["K"] = T.build(tool, w, op, kind, names, box.get("obj"))

    out["build_s"] = least(make, 3)
    K = box["K"]
    out["product_s"] = least(lambda: K @ v, 5)
    t0 = time.perf_counter()
    inv = T.inverse(tool, K)
    inv @ v
    out["inverse_first_s"] = time.perf_counter() - t0
    out["inverse_s"] = least(lambda: inv @ v, 5)
    return out


def _memory(tool: str, name: str, op: str, quick: bool) -> float:
    cmd = [sys.executable, __file__, "--memory", tool, name, op] + (["--quick"] if quick else [])
    cmd += ["--transformers-from", ARGS.transformers_from] if ARGS.transformers_from else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def memory_main(tool: str, name: str, op: str, quick: bool) -> None:
    """In a fresh process: MiB above the RSS before, at the peak of build + product + inverse."""
    from bench.memory import _peak_during

    torch.set_num_threads(1)

    def run(w):
        K = T.build(tool, w, op, "exact", T.objective(w).space.names)
        v = torch.randn(K.shape[0])
        K @ v
        T.inverse(tool, K) @ v

    # the same code on the small model first: lazy imports (torch.func's first call loads
    # about 150 MiB) and kernels are not the operator's memory
    run(MAKERS[name](torch.float32, "agree"))
    w = MAKERS[name](torch.float32, "agree" if quick else "time")
    print(json.dumps({"peak_mib": _peak_during(lambda: run(w))}))


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    has_hf = W.transformers_available(ARGS.transformers_from)
    models = [m for m in MAKERS if has_hf or m != "gpt2"]
    results = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "versions": report.versions(),
        "transformers": has_hf,
    }
    for part, fn in (
        ("agreement", lambda: [r for m in models for r in agreement(m)]),
        ("costs", lambda: [r for m in models for r in costs(m, ARGS.quick, not ARGS.no_memory)]),
        ("beyond", lambda: beyond.run(has_hf, ARGS.quick)),
    ):
        t = time.perf_counter()
        results[part] = fn()
        results[f"{part}_seconds"] = time.perf_counter() - t
    results["seconds"] = time.perf_counter() - t0
    out = Path("/tmp/hesse-kfac") if ARGS.quick else HERE
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "RESULTS.md").write_text(report.markdown(results))
    print(f"wrote {out}/RESULTS.md in {results['seconds']:.0f} s")


def _args():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--transformers-from", default=None)
    p.add_argument("--memory", nargs=3, metavar=("TOOL", "MODEL", "OP"))
    return p.parse_args()


if __name__ == "__main__":
    ARGS = _args()
    if ARGS.memory:
        W.transformers_available(ARGS.transformers_from)
        memory_main(*ARGS.memory, ARGS.quick)
    else:
        main()
