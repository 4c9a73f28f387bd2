"""The ``hesse`` command: ``hesse analyze | eigs | trace | density``.

A thin layer over :func:`hesse.analysis.analyze`: it builds the model, data and loss from a
built-in demo or from ``package.module:factory`` names, runs the requested sections, prints
a compact table (or JSON) and writes ``results.json``, PNG plots and ``report.html``.

Exit status: 0 on success, 2 when the request is wrong (unknown module, factory of the wrong
type, weights that do not fit, unwritable output folder, ``--k`` too large, bad options),
1 when the computation fails (e.g. a non-finite loss).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from dataclasses import dataclass

import torch

from hesse import _cli_inputs as inputs
from hesse._cli_inputs import UsageError
from hesse.analysis import SECTIONS, Options, analyze
from hesse.demo import DEMOS, load_demo

COMMANDS = {
    "analyze": (SECTIONS, "The full report: spectrum, trace, density, GGN, layers, stability."),
    "eigs": (("eigs",), "Largest and smallest eigenvalues with residual bounds (Lanczos)."),
    "trace": (("trace",), "Trace with standard error and 95% CI (Hutch++)."),
    "density": (("density",), "Spectral density by stochastic Lanczos quadrature."),
}
DEFAULTS = {"k": 20, "budget": 100, "steps": 80, "probes": 4}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
EXAMPLES = """examples:
  hesse {cmd} --demo digits
  hesse {cmd} --demo tiny-lm --k 5 --quiet --json
  hesse {cmd} --model mymodels:make_net --data mymodels:make_data --weights net.pt \\
              --loss cross_entropy --lr 0.1 --out report
  hesse {cmd} --demo digits --checkpoint run.ckpt   # rerun the same line to resume
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all sub-commands, with their shared options."""
    shared = argparse.ArgumentParser(add_help=False)
    _add_source_options(shared.add_argument_group("model and data"))
    _add_method_options(shared.add_argument_group("curvature and budget"))
    _add_output_options(shared.add_argument_group("output"))
    parser = argparse.ArgumentParser(
        prog="hesse",
        description="Curvature (Hessian, GGN, Fisher) of a neural network's loss.",
        epilog=EXAMPLES.format(cmd="analyze"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(
            name,
            parents=[shared],
            help=summary,
            description=summary,
            epilog=EXAMPLES.format(cmd=name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    return parser


def _add_source_options(group) -> None:
    group.add_argument("--demo", choices=list(DEMOS), help="a built-in demo (trained on first use)")
    group.add_argument("--model", metavar="PKG.MOD:FACTORY", help="function returning the model")
    group.add_argument("--data", metavar="PKG.MOD:FACTORY", help="function returning the data")
    group.add_argument("--weights", metavar="FILE", help="state dict (torch.load weights_only)")
    group.add_argument("--loss", default="cross_entropy", help="cross_entropy | mse | PKG.MOD:FN")
    group.add_argument("--samples", type=int, metavar="N", help="use the first N samples")
    group.add_argument("--batch-size", type=int, metavar="B", help="samples per data-pass batch")


def _add_method_options(group) -> None:
    group.add_argument("--curvature", choices=["hessian", "ggn", "fisher"], default="hessian")
    group.add_argument("--k", type=int, help=f"eigenvalues (default {DEFAULTS['k']})")
    group.add_argument("--budget", type=int, help="products per estimate (default 100)")
    group.add_argument("--steps", type=int, help="Lanczos steps of the density (default 80)")
    group.add_argument("--probes", type=int, help="probes of the density (default 4)")
    group.add_argument("--lr", type=float, help="training learning rate (stability verdicts)")
    group.add_argument("--seed", type=int, default=0, help="seed of the random probes")
    group.add_argument("--dtype", choices=list(DTYPES), help="compute dtype (default: model's)")
    group.add_argument("--device", help="compute device, e.g. cpu or cuda (default: model's)")
    group.add_argument("--checkpoint", metavar="FILE", help="record products; rerun to resume")
    group.add_argument(
        "--threads", type=int, help="torch CPU threads (default: 1 for demos, else torch's)"
    )


def _add_output_options(group) -> None:
    group.add_argument("--out", metavar="DIR", help="write results.json, plots, report.html")
    group.add_argument("--json", action="store_true", help="print results.json to stdout")
    group.add_argument("--quiet", action="store_true", help="no progress bars, no table")


@dataclass(frozen=True)
class Problem:
    """What to analyse, from a demo or from factories."""

    name: str
    model: torch.nn.Module
    data: object
    loss: object
    loss_fn: object
    lr: float | None
    n_classes: int | None
    description: str | None
    training: dict | None
    defaults: dict


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_source(parser, args)
    try:
        report = run(args)
        report = dataclasses.replace(report, meta=report.meta | {"command": _command(argv)})
        emit(args, report)
    except UsageError as err:
        return _fail(args, err, 2)
    except (ValueError, RuntimeError, OSError) as err:
        return _fail(args, err, 1)
    return 0


def _check_source(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if bool(args.demo) == bool(args.model):
        parser.error("give either --demo NAME or --model PKG.MOD:FACTORY with --data.")
    if args.model and not args.data:
        parser.error("--model needs --data PKG.MOD:FACTORY (the samples to analyse).")
    if args.demo and (args.data or args.weights):
        parser.error("--data and --weights go with --model, not with --demo.")
    if args.out is None and args.command == "analyze":
        args.out = "hesse-report"


def _fail(args: argparse.Namespace, err: Exception, status: int) -> int:
    print(f"hesse {args.command}: error: {err}", file=sys.stderr)
    return status


def _command(argv: list[str]) -> str:
    return shlex.join(["hesse", *argv])


def run(args: argparse.Namespace):
    """Load the problem and analyse it as ``args`` ask; returns the ``Report``."""
    progress = not args.quiet and sys.stderr.isatty()
    if args.out:
        inputs.writable_folder(args.out)
    # The demo models are tiny: intra-op threads only add spin-waits (5-10x slower products
    # on a busy 2-core machine), so demos run on one thread unless --threads says otherwise.
    threads = args.threads if args.threads is not None else (1 if args.demo else None)
    if threads is not None:
        torch.set_num_threads(threads)
    problem = _from_demo(args, progress) if args.demo else _from_factories(args)
    options = _options(args, problem)
    _check_k(problem.model, options.k)
    return analyze(
        problem.model, problem.data, problem.loss, loss_fn=problem.loss_fn,
        lr=args.lr if args.lr is not None else problem.lr, n_classes=problem.n_classes,
        dtype=DTYPES.get(args.dtype), device=args.device, progress=progress,
        checkpoint=args.checkpoint, name=problem.name, description=problem.description,
        training=problem.training, **dataclasses.asdict(options),
    )  # fmt: skip


def _options(args: argparse.Namespace, problem: Problem) -> Options:
    """The analysis options: command-line values, else the demo's, else ``DEFAULTS``."""
    settings = {name: problem.defaults.get(name, default) for name, default in DEFAULTS.items()}
    settings |= {name: vars(args)[name] for name in DEFAULTS if vars(args)[name] is not None}
    sections = COMMANDS[args.command][0]
    try:
        return Options(args.curvature, sections, seed=args.seed, **settings)
    except ValueError as err:
        raise UsageError(str(err).replace("analyze: ", "", 1)) from err


def _check_k(model: torch.nn.Module, k: int) -> None:
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if k > d:
        raise UsageError(
            f"--k {k} is larger than the number of parameters ({d}); a {d}x{d} curvature "
            f"matrix has only {d} eigenvalues. Pass --k {min(d, DEFAULTS['k'])} or less."
        )


def _from_demo(args: argparse.Namespace, progress: bool) -> Problem:
    if args.loss not in inputs.LOSSES:
        raise UsageError(
            f"--loss {args.loss!r} with --demo: the demos train with cross_entropy or mse; "
            "a custom loss needs --model and --data."
        )
    try:
        demo = load_demo(args.demo, loss=args.loss, progress=progress)
    except ValueError as err:
        raise UsageError(str(err)) from err
    samples = args.samples if args.samples is not None else demo.defaults.get("samples")
    data = demo.batches(samples=samples, batch_size=args.batch_size)
    return Problem(
        f"{demo.name} demo", demo.model, data, demo.loss, demo.loss_fn, demo.lr, demo.n_classes,
        demo.description, demo.training, demo.defaults,
    )  # fmt: skip


def _from_factories(args: argparse.Namespace) -> Problem:
    model = inputs.load_model(args.model, args.weights)
    data = inputs.load_data(args.data, args.samples, args.batch_size or 256)
    loss = inputs.load_loss(args.loss)
    return Problem(args.model, model, data, loss, None, None, None, None, None, {})


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


if __name__ == "__main__":
    sys.exit(main())
