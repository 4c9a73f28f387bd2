"""The ``hesse`` command: ``hesse analyze | eigs | trace | density``.

A thin layer over :func:`hesse.analysis.prepare`: it builds the model, data and loss from a
built-in demo, a local Hugging Face folder with a text file (``--hf DIR --data FILE``), or
``package.module:factory`` names, the ``Objective`` of the chosen
``--params``, prints one line with the parameters, samples and memory plan (stderr), runs
the requested sections with progress bars on a terminal, prints a compact table (or JSON)
and writes ``results.json``, PNG plots and ``report.html``.

Exit status: 0 on success, 2 when the request is wrong (unknown module, factory of the wrong
type, weights that do not fit, unwritable output folder, ``--k`` too large, ``--params`` that
match nothing, a plan over ``--max-memory``, bad options), 1 when the computation fails
(e.g. a non-finite loss).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import shlex
import sys

import torch

from hesse import _cli_inputs as inputs
from hesse import hf
from hesse._cli_inputs import UsageError
from hesse._cli_problem import Problem, cli_words, from_demo, from_factories, from_hf
from hesse.analysis import SECTIONS, Options, prepare
from hesse.demo import DEMOS
from hesse.problem.objective import Objective

COMMANDS = {
    "analyze": (SECTIONS, "The full report: spectrum, trace, density, GGN, layers, stability."),
    "eigs": (("eigs",), "Largest and smallest eigenvalues with residual bounds (Lanczos)."),
    "trace": (("trace",), "Trace with standard error and 95% CI (Hutch++)."),
    "density": (("density",), "Spectral density by stochastic Lanczos quadrature."),
}
APPS = {
    "quantize": "hesse.quant._cli",
    "prune": "hesse.prune._cli",
    "landscape": "hesse.dynamics._cli_landscape",
    "train-demo": "hesse.dynamics._cli_train",
    "influence": "hesse.influence._cli",
}
"""Application commands: ``{name: module}``; each module defines ``SUMMARY``, ``EXAMPLES``,
``add_arguments(group)`` and ``run(args, problem) -> hesse.report.page.Page``."""
SELF_CONTAINED = ("train-demo",)
"""Application commands that build their own model and data (no --demo, --model or --hf)."""
HOLDOUT = 0.2
"""Share of a demo's samples the application commands hold out to measure on."""
DEFAULTS = {"k": 20, "budget": 100, "steps": 80, "probes": 4}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
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
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all sub-commands, with their shared options."""
    source = argparse.ArgumentParser(add_help=False)
    _add_source_options(source.add_argument_group("model and data"))
    _add_common_options(source.add_argument_group("curvature and budget"))
    shared = argparse.ArgumentParser(add_help=False, parents=[source])
    _add_method_options(shared.add_argument_group("analysis"))
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
            help=summary.replace("%", "%%"),  # help strings are %-formatted by argparse
            description=summary,
            epilog=EXAMPLES.format(cmd=name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    for name, app in _apps().items():
        sub = commands.add_parser(
            name,
            parents=[source],
            help=app.SUMMARY.replace("%", "%%"),
            description=app.SUMMARY,
            epilog=app.EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        app.add_arguments(sub.add_argument_group(name))
        _add_output_options(sub.add_argument_group("output"))
    return parser


def _apps() -> dict:
    """The application commands whose module is installed: ``{name: module}``."""
    found = {}
    for name, module in APPS.items():
        try:
            found[name] = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module and not module.startswith(f"{err.name}."):
                raise
    return found


def _add_source_options(group) -> None:
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
        help="cross_entropy | mse | PKG.MOD:FN (default cross_entropy; with --hf the model's "
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


def _add_common_options(group) -> None:
    group.add_argument(
        "--curvature", choices=["hessian", "ggn", "fisher"],
        help="curvature matrix (default: hessian; application commands name their own default)",
    )  # fmt: skip
    group.add_argument("--budget", type=int, help="products per estimate (default 100)")
    group.add_argument("--seed", type=int, default=0, help="seed of the random probes")
    group.add_argument("--dtype", choices=list(DTYPES), help="compute dtype (default: model's)")
    group.add_argument("--device", help="compute device, e.g. cpu or cuda (default: model's)")
    group.add_argument(
        "--threads", type=int, help="torch CPU threads (default: 1 for demos, else torch's)"
    )


def _add_method_options(group) -> None:
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


def _add_output_options(group) -> None:
    group.add_argument("--out", metavar="DIR", help="write results.json, plots, report.html")
    group.add_argument("--json", action="store_true", help="print results.json to stdout")
    group.add_argument("--quiet", action="store_true", help="no plan line, no progress, no table")
    group.add_argument(
        "--progress", action="store_true",
        help="progress bars even when stderr is not a terminal (they are on in a terminal)",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_source(parser, args)
    try:
        if args.command in COMMANDS:
            report = run(args)
            report = dataclasses.replace(report, meta=report.meta | {"command": _command(argv)})
            emit(args, report)
        else:
            page = run_app(args)
            emit_page(args, dataclasses.replace(page, doc=page.doc | {"command": _command(argv)}))
    except UsageError as err:
        return _fail(args, err, 2)
    except (ValueError, RuntimeError, OSError) as err:
        return _fail(args, err, 1)
    return 0


def _check_source(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    sources = sum(map(bool, (args.demo, args.model, args.hf)))
    if args.command in SELF_CONTAINED:
        if sources or args.data or args.test_data:
            parser.error(f"{args.command} builds its own model and data; drop --demo/--model/--hf.")
    elif sources != 1:
        parser.error(
            "give one of --demo NAME, --hf DIR with --data FILE, or --model PKG.MOD:FACTORY "
            "with --data."
        )
    if (args.model or args.hf) and not args.data:
        parser.error("--model and --hf need --data (the samples to analyse).")
    if args.demo and (args.data or args.weights):
        parser.error("--data and --weights go with --model or --hf, not with --demo.")
    if args.hf_task and not args.hf:
        parser.error("--hf-task goes with --hf.")
    if args.test_data and (args.demo or args.command in COMMANDS):
        parser.error("--test-data goes with --model or --hf and an application command.")
    if args.out is None and args.command not in ("eigs", "trace", "density"):
        args.out = "hesse-report" if args.command == "analyze" else f"hesse-{args.command}"


def _fail(args: argparse.Namespace, err: Exception, status: int) -> int:
    print(f"hesse {args.command}: error: {err}", file=sys.stderr)
    return status


def _command(argv: list[str]) -> str:
    return shlex.join(["hesse", *argv])


def run(args: argparse.Namespace):
    """Load the problem and analyse it as ``args`` ask; returns the ``Report``."""
    progress = not args.quiet and (args.progress or sys.stderr.isatty())
    max_memory = None if args.max_memory is None else inputs.parse_size(args.max_memory)
    selection = inputs.parse_params(args.params)
    if args.out:
        inputs.writable_folder(args.out)
    # The demo models are tiny: intra-op threads only add spin-waits (5-10x slower products
    # on a busy 2-core machine), so demos run on one thread unless --threads says otherwise.
    threads = args.threads if args.threads is not None else (1 if args.demo else None)
    if threads is not None:
        torch.set_num_threads(threads)
    if args.demo:
        problem = from_demo(args, progress)
    else:
        problem = from_hf(args) if args.hf else from_factories(args)
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


def run_app(args: argparse.Namespace):
    """Load the problem (demos with a held-out part) and run an application command.

    Returns:
        The command's ``hesse.report.page.Page``.
    """
    args.progress = not args.quiet and (args.progress or sys.stderr.isatty())
    if args.out:
        inputs.writable_folder(args.out)
    threads = args.threads if args.threads is not None else (1 if args.demo else None)
    if threads is not None:
        torch.set_num_threads(threads)
    if args.command in SELF_CONTAINED:
        problem = None
    elif args.demo:
        problem = from_demo(args, args.progress, holdout=HOLDOUT)
    else:
        problem = from_hf(args) if args.hf else from_factories(args)
    return _apps()[args.command].run(args, problem)


def _estimate(command: str, job):
    """A callback that prints, after the first product, the time the run may take."""

    def say(seconds: float) -> None:
        most = job.max_products()
        print(
            f"hesse {command}: first product took {seconds:.2g} s (with the graphs it keeps, "
            f"later ones cost less); at most {most} products planned, so at most "
            f"~{_duration(seconds * most)}",
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


def emit_page(args: argparse.Namespace, page) -> None:
    """Write an application's page, then print its JSON, its tables, or nothing."""
    written = page.save(args.out) if args.out else {}
    if args.json:
        print(json.dumps(page.to_dict(), indent=1, default=str))
    elif not args.quiet:
        print(page.text())
        if written:
            print(f"\nwrote {', '.join(str(path) for path in written.values())}")


if __name__ == "__main__":
    sys.exit(main())
