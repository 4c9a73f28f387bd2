"""The options the sub-commands share: model and data, curvature and budget, analysis, output."""

from __future__ import annotations

import argparse

import torch

from ..demo import DEMOS
from ..problem import hf

DEFAULTS = {"k": 20, "budget": 100, "steps": 80, "probes": 4}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def add_source_options(group: argparse._ArgumentGroup) -> None:
    """Add the source options to ``group``."""
    group.add_argument("--demo", choices=list(DEMOS), help="a built-in demo (trained on first use)")
    group.add_argument("--model", metavar="PKG.MOD:FACTORY", help="function returning the model")
    group.add_argument(
        "--hf", metavar="DIR",
        help="a local Hugging Face model folder (config, weights, tokenizer), loaded offline",
    )  # fmt: skip
    group.add_argument(
        "--hf-task", choices=list(hf.TASKS),
        help="Auto class of --hf (default: from the config's architectures)",
    )  # fmt: skip
    group.add_argument(
        "--data", metavar="FILE|PKG.MOD:FACTORY",
        help="with --hf: a .txt (one example per line), .csv or .jsonl file; or a function "
        "returning the data: a DataLoader, a Dataset, a list of batches, or one batch "
        "((inputs, targets) or a dict of tensors)",
    )  # fmt: skip
    group.add_argument("--text-column", default="text", help="text column of .csv/.jsonl data")
    group.add_argument("--label-column", default="label", help="label column (classification)")
    group.add_argument(
        "--max-length", type=int, default=128, help="tokens per example with --hf (default 128)"
    )
    group.add_argument("--weights", metavar="FILE", help="state dict (torch.load weights_only)")
    group.add_argument(
        "--loss",
        help="cross_entropy | mse | a hesse.losses name with its parameters (gce:q=0.7, mae, "
        "sum_exp, comp_sum:tau=T, zloss:a=A,b=B, anyloss:metric=f_beta,beta=1,L=73, "
        "adv_comp_sum:tau=T,nu=V) | PKG.MOD:FN (default cross_entropy; with --hf the model's "
        "own loss)",
    )
    group.add_argument(
        "--test-data", metavar="FILE|PKG.MOD:FACTORY",
        help="held-out data to measure on (as --data); demos hold out a fifth of their samples "
        "for the application commands",
    )  # fmt: skip
    group.add_argument("--samples", type=int, metavar="N", help="use the first N samples")
    group.add_argument("--batch-size", type=int, metavar="B", help="samples per data-pass batch")
    group.add_argument(
        "--params", metavar="NAMES",
        help="parameters to analyse, comma-separated: names, module prefixes or glob patterns, "
        "e.g. 'encoder.layer.5.*,classifier' (default: all trainable)",
    )  # fmt: skip


def add_common_options(group: argparse._ArgumentGroup) -> None:
    """Add the common options to ``group``."""
    group.add_argument(
        "--curvature", choices=["hessian", "ggn", "fisher", "kfac", "ekfac"],
        help="curvature matrix (default: hessian; application commands name their own default). "
        "kfac, ekfac: the Kronecker-factored GGN (analyze adds its gap to the exact GGN)",
    )  # fmt: skip
    group.add_argument("--budget", type=int, help="products per estimate (default 100)")
    group.add_argument("--seed", type=int, default=0, help="seed of the random probes")
    group.add_argument("--dtype", choices=list(DTYPES), help="compute dtype (default: model's)")
    group.add_argument("--device", help="compute device, e.g. cpu or cuda (default: model's)")
    group.add_argument(
        "--threads", type=int, help="torch CPU threads (default: 1 for demos, else torch's)"
    )
    group.add_argument(
        "--shard", action="store_true",
        help="under torchrun: shard the parameters over the processes (FSDP2 fully_shard per "
        "layer and at the root) and split the batches; every process gets the same numbers",
    )  # fmt: skip


def add_method_options(group: argparse._ArgumentGroup) -> None:
    """Add the method options to ``group``."""
    group.add_argument("--k", type=int, help=f"eigenvalues (default {DEFAULTS['k']})")
    group.add_argument("--steps", type=int, help="Lanczos steps of the density (default 80)")
    group.add_argument("--probes", type=int, help="probes of the density (default 4)")
    group.add_argument(
        "--layers-by", choices=["module", "block", "param"],
        help="rows of the per-layer table (default: block, i.e. attention and MLP of each "
        "layer, for transformers; module otherwise)",
    )  # fmt: skip
    group.add_argument(
        "--groups", metavar="NAME=PATTERNS;...",
        help="your own rows of the per-layer table, e.g. 'attn=*.attention.*;head=classifier' "
        "(patterns comma-separated; other parameters form a (rest) row)",
    )  # fmt: skip
    group.add_argument("--lr", type=float, help="training learning rate (stability verdicts)")
    group.add_argument(
        "--optimizer", choices=["sgd", "momentum", "adam"], default="sgd",
        help="how the model was trained, for the stability threshold (adam: no verdict)",
    )  # fmt: skip
    group.add_argument("--momentum", type=float, default=0.9, help="with --optimizer momentum")
    group.add_argument("--checkpoint", metavar="FILE", help="record products; rerun to resume")
    group.add_argument(
        "--max-memory", metavar="SIZE",
        help="memory the run may hold, e.g. 8G or 500M: probe groups and blocks are chosen to "
        "fit, or the run is refused with its plan",
    )  # fmt: skip
    group.add_argument(
        "--max-time", type=float, metavar="SECONDS",
        help="stop cleanly after this long: eigenvalue runs stop within it (converged=False), "
        "a section cut off and those after it are listed as partial (with --checkpoint, rerun "
        "to resume)",
    )  # fmt: skip


def add_output_options(group: argparse._ArgumentGroup) -> None:
    """Add the output options to ``group``."""
    group.add_argument("--out", metavar="DIR", help="write results.json, plots, report.html")
    group.add_argument("--json", action="store_true", help="print results.json to stdout")
    group.add_argument("--quiet", action="store_true", help="no plan line, no progress, no table")
    group.add_argument(
        "--progress", action="store_true",
        help="progress bars even when stderr is not a terminal (they are on in a terminal)",
    )  # fmt: skip
