"""The ``hesse`` command: the parser, the dispatch and the application commands' registry.

The analysis commands (``hesse analyze | eigs | trace | density``) are in :mod:`.analyze`;
each application command has its own module.

The analysis commands are

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

from . import _inputs as inputs
from . import _options as options
from . import analyze
from ._inputs import UsageError
from ._problem import load, use_threads

APPS = {
    "quantize": "hesse.cli.quantize",
    "prune": "hesse.cli.prune",
    "landscape": "hesse.cli.landscape",
    "train-demo": "hesse.cli.train_demo",
    "influence": "hesse.cli.influence",
}
"""Application commands: ``{name: module}``; each module defines ``SUMMARY``, ``EXAMPLES``,
``add_arguments(group)`` and ``run(args, problem) -> hesse.report.page.Page``."""
SELF_CONTAINED = ("train-demo",)
"""Application commands that build their own model and data (no --demo, --model or --hf)."""
HOLDOUT = 0.2
"""Share of a demo's samples the application commands hold out to measure on."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all sub-commands, with their shared options."""
    source = argparse.ArgumentParser(add_help=False)
    options.add_source_options(source.add_argument_group("model and data"))
    options.add_common_options(source.add_argument_group("curvature and budget"))
    shared = argparse.ArgumentParser(add_help=False, parents=[source])
    options.add_method_options(shared.add_argument_group("analysis"))
    options.add_output_options(shared.add_argument_group("output"))
    parser = argparse.ArgumentParser(
        prog="hesse",
        description="Curvature (Hessian, GGN, Fisher) of a neural network's loss.",
        epilog=analyze.EXAMPLES.format(cmd="analyze"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary) in analyze.COMMANDS.items():
        commands.add_parser(
            name,
            parents=[shared],
            help=summary.replace("%", "%%"),  # help strings are %-formatted by argparse
            description=summary,
            epilog=analyze.EXAMPLES.format(cmd=name),
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
        options.add_output_options(sub.add_argument_group("output"))
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


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_source(parser, args)
    try:
        if args.command in analyze.COMMANDS:
            report = analyze.run(args)
            report = dataclasses.replace(report, meta=report.meta | {"command": _command(argv)})
            analyze.emit(args, report)
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
    if args.test_data and (args.demo or args.command in analyze.COMMANDS):
        parser.error("--test-data goes with --model or --hf and an application command.")
    if args.out is None and args.command not in ("eigs", "trace", "density"):
        args.out = "hesse-report" if args.command == "analyze" else f"hesse-{args.command}"


def _fail(args: argparse.Namespace, err: Exception, status: int) -> int:
    print(f"hesse {args.command}: error: {err}", file=sys.stderr)
    return status


def _command(argv: list[str]) -> str:
    return shlex.join(["hesse", *argv])


def run_app(args: argparse.Namespace):
    """Load the problem (demos with a held-out part) and run an application command.

    Returns:
        The command's ``hesse.report.page.Page``.
    """
    args.progress = not args.quiet and (args.progress or sys.stderr.isatty())
    if args.out:
        inputs.writable_folder(args.out)
    use_threads(args)
    problem = None if args.command in SELF_CONTAINED else load(args, args.progress, HOLDOUT)
    return _apps()[args.command].run(args, problem)


def emit_page(args: argparse.Namespace, page) -> None:
    """Write an application's page, then print its JSON, its tables, or nothing."""
    written = page.save(args.out) if args.out else {}
    if args.json:
        print(json.dumps(page.to_dict(), indent=1, default=str))
    elif not args.quiet:
        print(page.text())
        if written:
            print(f"\nwrote {', '.join(str(path) for path in written.values())}")
