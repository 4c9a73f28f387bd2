"""Hessian products of GPT-2 (124M, 355M, from configs) under FSDP2 on 1/2/4 gloo processes.

Each run spawns N processes (CPU, gloo, one thread each); with N > 1 every transformer block
and the root are wrapped with ``fully_shard``. The data are the same 4 sequences of ``--tokens``
tokens in every run, split over the processes. Each process reports the time of its products
(the first builds and keeps the graphs, the later ones reuse them), of top-1 and top-5 ``eigs``
and of a Hutchinson ``trace`` (all capped to a few products: times per product are what is
measured, not converged spectra), its peak resident memory, and what ``hesse.plan`` says it
holds: local parameters, the Lanczos basis of top-5 and the kept graphs.

    .venv/bin/python benchmarks/scale/run.py --sizes 124M 355M --procs 1 2 4

Writes ``benchmarks/scale/RESULTS.md`` (a table per run, appended as ``results.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).parent
F32 = torch.float32
SIZES = {
    "124M": (768, 12, 12),
    "355M": (1024, 24, 16),
    "tiny": (64, 2, 2),
}  # n_embd, n_layer, n_head


def _model(size: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    embd, layers, heads = SIZES[size]
    config = GPT2Config(n_embd=embd, n_layer=layers, n_head=heads, attn_implementation="eager")
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def _batches(tokens: int) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50257, (4, tokens), generator=gen)
    return [{"input_ids": ids[i : i + 1], "labels": ids[i : i + 1]} for i in range(4)]


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _work(
    rank: int,
    world: int,
    size: str,
    tokens: int,
    products: int,
    spectra: bool,
    folder: str,
    eigs: bool = True,
) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(
            "gloo", init_method=f"file://{folder}/rdv", rank=rank, world_size=world
        )
    import hesse

    model = _model(size)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    obj = hesse.Objective(model, _batches(tokens)[rank::world])
    # the kept graphs hold each batch's gathered weights: only where memory allows
    H = hesse.HessianOperator(obj, max_cache_bytes="auto" if spectra else 0)
    v = torch.randn(obj.dim, 1, generator=torch.Generator().manual_seed(rank))
    grad, grad_s = _timed(obj.gradient)
    times = [_timed(lambda: H @ v)[1] for _ in range(products)]
    # a float32 basis (float64 sums), the smallest ncv: the basis is (ncv + b) d 4 bytes
    none = (None, float("nan"))
    top1 = (
        _timed(lambda: hesse.eigs(H, k=1, ncv=3, max_matvecs=3, seed=0, basis_dtype=F32))
        if eigs
        else none
    )
    top5 = _timed(lambda: _top5(H)) if spectra else none
    tr = _timed(lambda: hesse.trace(H, budget=2, method="hutchinson", seed=0)) if spectra else none
    out = {
        "size": size,
        "procs": world,
        "rank": rank,
        "dim_total": obj.shard.dim if obj.shard else obj.dim,
        "dim_local": obj.dim,
        "first_product_s": times[0],
        "kept_product_s": sum(times[1:]) / max(1, len(times) - 1),
        "top1_s": top1[1],
        "top1_matvecs": top1[0].n_matvecs if top1[0] else 0,
        "top1_value": float(top1[0].values[0]) if top1[0] else float("nan"),
        "top5_s": top5[1],
        "top5_matvecs": top5[0].n_matvecs if top5[0] else 0,
        "trace_s": tr[1],
        "trace_value": tr[0].value if tr[0] else float("nan"),
        "local_param_mb": obj.dim * 4 / 2**20,
        "gradient_s": grad_s,
        "gradient_mb": grad.numel() * grad.element_size() / 2**20,
        "unit_mb": (obj._gatherer.largest if obj._gatherer else 0) * 4 / 2**20,
        "basis_top5_mb": 9 * obj.dim * 4 / 2**20,  # ncv=7 and a block of 2, float32
        "graphs_mb": H.cache_bytes / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    if world > 1:
        dist.destroy_process_group()


def _top5(H):
    import hesse

    return hesse.eigs(H, k=5, ncv=7, max_matvecs=6, seed=0, basis_dtype=F32)


def run(
    size: str, world: int, tokens: int, products: int, spectra: bool, eigs: bool = True
) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        args = (world, size, tokens, products, spectra, folder, eigs)
        mp.spawn(_work, args=args, nprocs=world)
        return [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]


def _table(rows: list[dict], tokens: int) -> str:
    head = (
        "| model | procs | params/proc (local, M) | gradient s | 1st product s | kept product s "
        "| top-1 s (matvecs) | top-5 s (matvecs) | trace s | local params MB | gradient MB "
        "| top-5 basis MB | largest unit gathered MB | kept graphs MB "
        "| peak RSS MB (max over procs) | top-1 Ritz value (3 products) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for group in _groups(rows):
        r0 = group[0]
        worst = {k: max(r[k] for r in group) for k in r0 if isinstance(r0[k], float)}
        lines.append(
            f"| GPT-2 {r0['size']} | {r0['procs']} | {r0['dim_local'] / 1e6:.1f} of "
            f"{r0['dim_total'] / 1e6:.1f} | {_num(worst, 'gradient_s', 1)} | "
            f"{worst['first_product_s']:.1f} | "
            f"{worst['kept_product_s']:.1f} | {worst['top1_s']:.1f} ({r0['top1_matvecs']}) | "
            f"{worst['top5_s']:.1f} ({r0['top5_matvecs']}) | {worst['trace_s']:.1f} | "
            f"{worst['local_param_mb']:.0f} | {_num(worst, 'gradient_mb', 0)} | "
            f"{worst['basis_top5_mb']:.0f} | {_num(worst, 'unit_mb', 0)} | "
            f"{worst['graphs_mb']:.0f} | {worst['peak_rss_mb']:.0f} | {r0['top1_value']:.6g} |"
        )
    return head + "\n".join(lines) + "\n"


def _num(row: dict, key: str, digits: int) -> str:
    """A number of a row, or "-" for rows measured before the column existed."""
    return f"{row[key]:.{digits}f}" if key in row else "-"


def _groups(rows: list[dict]) -> list[list[dict]]:
    keys = sorted({(r["size"], r["procs"]) for r in rows})
    return [[r for r in rows if (r["size"], r["procs"]) == k] for k in keys]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["124M"], choices=sorted(SIZES))
    parser.add_argument("--procs", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--products", type=int, default=2)
    parser.add_argument(
        "--no-spectra",
        nargs="*",
        default=[],
        help="sizes run with products and top-1 only, without kept graphs (memory)",
    )
    parser.add_argument(
        "--no-eigs",
        nargs="*",
        default=[],
        help="sizes run with the gradient and products only (no Lanczos basis: memory, time)",
    )
    parser.add_argument(
        "--table-only", action="store_true", help="rewrite RESULTS.md from results.json"
    )
    args = parser.parse_args()
    store = HERE / "results.json"
    rows = json.loads(store.read_text()) if store.exists() else []
    for size in [] if args.table_only else args.sizes:
        for world in args.procs:
            spectra, eigs = size not in args.no_spectra, size not in args.no_eigs
            fresh = run(size, world, args.tokens, args.products, spectra, eigs)
            rows = [r for r in rows if (r["size"], r["procs"]) != (size, world)] + fresh
            store.write_text(json.dumps(rows, indent=1))
            print(_table(fresh, args.tokens), flush=True)
            _write(rows, args.tokens)
    _write(rows, args.tokens)


def _write(rows: list[dict], tokens: int) -> None:
    text = (
        "# Curvature of FSDP2-sharded GPT-2 on CPU/gloo\n\n"
        "Commands (`OMP_NUM_THREADS=1`): `.venv/bin/python benchmarks/scale/run.py --sizes 124M "
        "--procs 1 2 4 --no-spectra 124M`, `... --sizes 355M --procs 1 2 --products 1 "
        "--no-spectra 355M --no-eigs 355M` and `... --sizes tiny --procs 1 2 4` "
        f"({tokens} tokens x 4 sequences, split over the processes; float32; GPT-2 built from "
        "its config: 124M = 768 wide, 12 layers; 355M = 1024 wide, 24 layers; tiny = 64 "
        "wide, 2 layers, the 50257-token "
        "vocabulary; per process, the slowest process shown). `--no-spectra`: products and "
        "top-1 only, graphs not kept (every product a fresh forward and double backward). "
        "top-1 and top-5 are capped at 3 and 6 products (a time per product, not a converged "
        "spectrum), with a float32 basis (float64 sums) and the smallest `ncv`.\n\n"
        "`--no-eigs`: the gradient and one product only (no Lanczos basis). 355M was run "
        "with `--products 1 --no-spectra 355M --no-eigs 355M` (its 1-process run peaks at 14 "
        "GB without any basis).\n\n"
        "**Rough timings**: a shared machine with 2 CPU cores and 3 other jobs running, one "
        "thread per process, so a process gets a fraction of a core and 4 processes share 2 "
        "cores: times are NOT a speed-up measurement. Peak RSS is measured per process (the "
        "model FSDP holds, the graph with its gathered weights, the double backward's "
        "temporaries, the basis); local params, gradient and the top-5 basis are counted "
        "(`d * 4` bytes, 9 float32 vectors for the basis). With N > 1 each process holds 1/N "
        "of the parameters, the gradient, every product vector and the Lanczos basis; each "
        "FSDP unit's parameters are gathered (differentiably) while it runs, the largest being "
        "GPT-2's root (the 50257 x 768 embedding, tied to the head); a graph kept for the "
        "second backward holds the gathered weights its operations saved (so kept graphs per "
        "process do not fall with N: one gathered copy, shared by the batches of the Hessian "
        "pass that built them).\n\n"
        "**Not measured**: GPT-2 355M on 4 processes was stopped before its first product: the "
        "4 processes held 5.0-5.5 GB each (21 GB of the 23 GB machine, which other jobs "
        "share) and were still growing. The same script runs it where memory allows; on "
        "GPUs/NCCL it needs `init_device_mesh('cuda', ...)`. `kept product s` is 0.0 where "
        "only one product ran.\n\n" + _table(rows, tokens)
    )
    (HERE / "RESULTS.md").write_text(text)


if __name__ == "__main__":
    main()
