"""``python -m bench [--quick] [--threads N] [--out RESULTS.md] [--json results.json]``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, {platform.system()} {platform.release()}"


def _versions() -> str:
    from importlib.metadata import version

    names = [
        "hesse",
        "torch",
        "PyHessian",
        "hessian-eigenthings",
        "curvlinops-for-pytorch",
        "backpack-for-pytorch",
        "scipy",
        "numpy",
    ]
    return ", ".join(f"{n} {version(n)}" for n in names) + f", Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--threads", type=int, default=1, help="torch threads for every tool")
    p.add_argument("--out", default="RESULTS.md", help="markdown report")
    p.add_argument("--json", default="results.json", help="raw results")
    p.add_argument(
        "--headline", default="/tmp/hesse/README_bench.md", help="short table for the README"
    )
    p.add_argument("--render", metavar="JSON", help="only rewrite the reports from a JSON file")
    p.add_argument("--workloads", nargs="*", help="run only these workloads")
    p.add_argument("--cache", default=".cache", help="folder of cached reference spectra")
    args = p.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    from bench import report

    if args.render:
        data = json.loads(Path(args.render).read_text())
        _write(data, data["meta"], args)
        return

    from bench.run import Config, run

    cfg = Config.quick() if args.quick else Config()
    if args.workloads:
        cfg = dataclasses.replace(cfg, workloads=tuple(args.workloads))
    t0 = time.perf_counter()
    data = run(
        cfg,
        args.threads,
        Path(args.cache),
        log=lambda m: print(f"{time.perf_counter() - t0:7.1f}s {m}", flush=True),
    )
    meta = {
        "command": "cd benchmarks && " + " ".join(["python -m bench", *sys.argv[1:]]),
        "machine": _machine(),
        "threads": args.threads,
        "versions": _versions(),
        "seconds": time.perf_counter() - t0,
        "config": repr(cfg),
    }
    data["meta"] = meta
    data["targets"] = report.targets(data)
    Path(args.json).write_text(json.dumps(data, indent=1, default=float))
    _write(data, meta, args)


def _write(data: dict, meta: dict, args) -> None:
    """RESULTS.md and the README headline from the results data."""
    from bench import report

    Path(args.out).write_text(report.markdown(data, meta))
    Path(args.headline).parent.mkdir(parents=True, exist_ok=True)
    Path(args.headline).write_text(report.headline(data, meta))
    print(f"wrote {args.out}, {args.json}, {args.headline}")


if __name__ == "__main__":
    main()
