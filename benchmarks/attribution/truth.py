"""The ground truth: each workload retrained on M random halves (cached, resumable).

benchmarks/attribution/.venv/bin/python benchmarks/attribution/truth.py [--subsets 100]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import workloads as W  # noqa: E402

from hesse.influence import GroundTruth, retrain_subsets  # noqa: E402

CACHE = Path(__file__).parent / ".cache"
ALPHA = 0.5


def truth(w: W.Workload, subsets: int, progress: bool = True) -> GroundTruth:
    """``subsets`` models on random halves of ``w``'s training set, their query outputs."""
    CACHE.mkdir(exist_ok=True)
    return retrain_subsets(
        lambda idx, seed: w.outputs(w.train(idx, seed)), len(w.x), n_subsets=subsets,
        alpha=ALPHA, seed=1000, path=CACHE / f"{w.name}-truth.pt", progress=progress,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--only", nargs="*", default=list(W.WORKLOADS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.only:
        gt = truth(W.WORKLOADS[name](), args.subsets)
        print(name, tuple(gt.outputs.shape), f"{gt.seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
