"""``hesse analyze | eigs | trace | density``: the report of a model, or one of its sections."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..analysis import SECTIONS, Options, prepare
from ..analysis.options import KRONECKER
from ..problem.objective import Objective
from . import _inputs as inputs
from ._inputs import UsageError
from ._options import DEFAULTS, DTYPES
from ._problem import Problem, cli_words, load, use_threads

COMMANDS = {
    "analyze": (
        SECTIONS,
        "The full report: spectrum, trace, density, GGN (or KFAC's gap to it), layers, stability.",
    ),
    "eigs": (("eigs",), "Largest and smallest eigenvalues with residual bounds (Lanczos)."),
    "trace": (("trace",), "Trace with standard error and 95% CI (Hutch++)."),
    "density": (("density",), "Spectral density by stochastic Lanczos quadrature."),
}
EXAMPLES = """examples:
  hesse {cmd} --demo digits
  hesse {cmd} --hf ./my-bert --data reviews.csv --text-column sentence --label-column label \\
              --params 'bert.encoder.layer.5.*,classifier' --samples 256 --k 5
  hesse {cmd} --hf ./my-gpt2 --data corpus.txt --max-length 64 --max-time 600
  hesse {cmd} --demo tiny-lm --k 5 --quiet --json
  hesse {cmd} --model mymodels:make_net --data mymodels:make_data --weights net.pt \\
              --loss cross_entropy --lr 0.1 --out report
  hesse {cmd} --model mymodels:make_net --data mymodels:make_data \\
              --params 'encoder.layer.5.*,classifier' --max-memory 8G
  hesse {cmd} --demo digits --checkpoint run.ckpt   # rerun the same line to resume
  hesse {cmd} --demo digits --curvature kfac        # KFAC, and its gap to the exact GGN
"""


def run(args: argparse.Namespace):
    """Load the problem and analyse it as ``args`` ask; returns the ``Report``."""
    progress = not args.quiet and (args.progress or sys.stderr.isatty())
    max_memory = None if args.max_memory is None else inputs.parse_size(args.max_memory)
    selection = inputs.parse_params(args.params)
    if args.out:
        inputs.writable_folder(args.out)
    use_threads(args)
    problem = load(args, progress)
    objective = _objective(args, problem, selection)
    options = _options(args, problem)
    _check_k(objective, options, selection)
    try:
        job = prepare(
            objective, selection=selection, lr=args.lr if args.lr is not None else problem.lr,
            optimizer=args.optimizer, momentum=args.momentum, layers_by=args.layers_by,
            groups=inputs.parse_groups(args.groups),
            n_classes=problem.n_classes, max_memory=max_memory, name=problem.name,
            description=problem.description, training=problem.training,
            **dataclasses.asdict(options),
        )  # fmt: skip
    except ValueError as err:
        raise UsageError(cli_words(str(err), CLI_WORDS)) from err
    if not args.quiet:
        print(f"hesse {args.command}: {job.describe()}", file=sys.stderr)
    first = None if args.quiet else _estimate(args.command, job)
    return job.run(
        progress=progress, checkpoint=args.checkpoint, max_time=args.max_time, on_first=first
    )


def _estimate(command: str, job):
    """A callback that prints, after the first product, the time the run may take."""

    def say(seconds: float) -> None:
        most = job.max_products()
        o = job.options
        if o.curvature in KRONECKER and "kfac" in o.sections:  # the first is with the factors
            why = "with the factors; each of the exact GGN's in the kfac section is a data pass"
            eta = ""
        else:
            why = "with the graphs it keeps, later ones cost less"
            eta = f", so at most ~{_duration(seconds * most)}"
        print(
            f"hesse {command}: first product took {seconds:.2g} s ({why}); at most {most} "
            f"products planned{eta}",
            file=sys.stderr,
        )

    return say


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _objective(args: argparse.Namespace, problem: Problem, selection: list[str] | None):
    """The ``Objective``; what it refuses (model state, data, parameters) is a usage error."""
    try:
        return Objective(
            problem.model, problem.data, problem.loss, loss_fn=problem.loss_fn,
            params=selection, dtype=DTYPES.get(args.dtype), device=args.device,
        )  # fmt: skip
    except ValueError as err:
        raise UsageError(cli_words(str(err), CLI_WORDS)) from err


def _options(args: argparse.Namespace, problem: Problem) -> Options:
    """The analysis options: command-line values, else the demo's, else ``DEFAULTS``."""
    settings = {name: problem.defaults.get(name, default) for name, default in DEFAULTS.items()}
    settings |= {name: vars(args)[name] for name in DEFAULTS if vars(args)[name] is not None}
    sections = COMMANDS[args.command][0]
    try:
        return Options(args.curvature or "hessian", sections, seed=args.seed, **settings)
    except ValueError as err:
        raise UsageError(cli_words(str(err), CLI_WORDS)) from err


CLI_WORDS = (
    ("analyze: ", ""),
    ("max_memory=", "--max-memory "),
    ("raise max_memory", "raise --max-memory"),
    ("Objective(params=): ", "--params "),
    ("(params=)", "(--params)"),
    ("(params=...)", "(--params)"),
    ('curvature="ggn"', "--curvature ggn"),
)
"""API words in ``analyze``/``plan`` messages and the command-line options they mean."""


def _check_k(objective: Objective, options: Options, selection: list[str] | None) -> None:
    d, k = objective.dim, options.k
    if k > d and {"eigs", "ggn"} & set(options.sections):
        chosen = f" selected by --params {','.join(selection)}" if selection else ""
        raise UsageError(
            f"--k {k} is larger than the number of parameters ({d}{chosen}); a {d}x{d} "
            f"curvature matrix has only {d} eigenvalues. Pass --k {min(d, DEFAULTS['k'])} or less."
        )


def emit(args: argparse.Namespace, report) -> None:
    """Write the output folder, then print JSON, the table, or nothing (``--quiet``)."""
    doc = report.to_dict()
    written = report.save(args.out) if args.out else {}
    if args.json:
        print(json.dumps(doc, indent=1))
    elif not args.quiet:
        print(report.summary())
        if written:
            print(f"\nwrote {', '.join(str(path) for path in written.values())}")
