"""``hesse quantize``: sensitivity table, exact bit allocation, frontier and measured losses."""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from ..problem._evaluate import evaluate
from ..problem.calibration import peak_rss
from ..problem.objective import Objective
from ..quant import (
    GRANULARITIES,
    SENSITIVITY_METHODS,
    Allocation,
    Quantizer,
    Sensitivity,
    allocate,
    gptq,
    gptq_plan,
    gptq_sensitivity,
    output_axes,
    quantizable,
    quantization_of,
    quantize,
    save,
    sensitivity,
)
from ..report.page import Page, Section, png
from ._inputs import UsageError, parse_params

SUMMARY = "Hessian-aware mixed-precision quantization: sensitivity, exact bits, measured loss."
EXAMPLES = """examples:
  hesse quantize --demo digits --bits 2,3,4,8 --size 0.1
  hesse quantize --demo tiny-lm --layers 'blocks.*' --granularity group --group-size 16
  hesse quantize --hf DIR --data calib.csv --method gptq --bits 4 --save OUT
  hesse quantize --hf DIR --data calib.csv --method gptq --size 0.14 --save OUT
  hesse quantize --model mymodels:make_net --data mymodels:make_data \\
                 --test-data mymodels:make_test --bops 0.125 --fixed head=8
"""
DTYPES = {"float32": torch.float32, "float64": torch.float64}
MEASURED_POINTS = 8  # frontier points measured for the plot


def add_arguments(group: Any) -> None:
    """The options of ``hesse quantize``."""
    group.add_argument("--bits", help="widths to choose from (default 2,3,4,8; 3,4,8 for "
                       "--method gptq, where 2-bit layers broke MiniLM)")  # fmt: skip
    group.add_argument("--size", type=float, help="budget: share of the float32 size of the "
                       "quantized weights (default 0.125, i.e. 4 bits on average)")  # fmt: skip
    group.add_argument("--bops", type=float, help="budget instead: share of the bit-operations "
                       "of float32 weights with 8-bit activations")  # fmt: skip
    group.add_argument("--method", choices=(*SENSITIVITY_METHODS, "gptq"), default="trace",
                       help="sensitivity: trace (HAWQ-V2), eig (HAWQ), qbert; or gptq: GPTQ at "
                       "one --bits width, or at the widths --size allocates (trace "
                       "sensitivity, exact allocation)")  # fmt: skip
    group.add_argument("--save", metavar="OUT", help="--method gptq: write the quantized model "
                       "as a packed compressed-tensors folder (--hf models)")  # fmt: skip
    group.add_argument("--narrow-range", action="store_true", help="--method gptq: hesse's "
                       "symmetric grid with codes -L..L (default: all 2^b codes, as "
                       "compressed-tensors and llm-compressor)")  # fmt: skip
    group.add_argument("--embedding-bits", type=int, default=8, help="--method gptq: width "
                       "of the embeddings, rounded per row (0: keep them in float)")  # fmt: skip
    group.add_argument("--granularity", choices=GRANULARITIES, default="channel")
    group.add_argument("--group-size", type=int, default=128, help="inputs per grid (group)")
    group.add_argument("--asymmetric", action="store_true", help="asymmetric grids")
    group.add_argument("--fixed", metavar="LAYER=BITS,...", help="widths imposed, e.g. head=8")
    group.add_argument("--layers", metavar="NAMES", help="layers to quantize, comma-separated "
                       "names or globs (default: every Linear/Conv weight and matrix)")  # fmt: skip


def run(args: argparse.Namespace, problem: Any) -> Page:
    """Sensitivities, the allocation at the budget, its frontier and measured losses."""
    bits = _bits(args.bits or ("3,4,8" if args.method == "gptq" else "2,3,4,8"))
    if args.save and args.method != "gptq":
        raise UsageError("--save: only --method gptq writes a checkpoint (packed integers).")
    layers = parse_params(args.layers)
    quantizer = _quantizer(args, problem.model, layers)
    if args.method == "gptq" and len(bits) == 1 and args.size is None and args.bops is None:
        return _gptq_page(args, problem, {n: bits[0] for n in quantizable(problem.model, layers)})
    sens, alloc = _allocation(args, problem, bits, layers, quantizer)
    if args.method == "gptq":
        return _gptq_page(args, problem, alloc.bits, alloc)
    data = problem.test_data if problem.test_data is not None else problem.data
    where = "held-out data" if problem.test_data is not None else "the training data"
    measured = _measure(problem, data, sens, alloc, quantizer)
    return _page(problem, sens, alloc, measured, where)


def _allocation(args, problem, bits, layers, quantizer) -> tuple[Sensitivity, Allocation]:
    """Sensitivities (``--method``; ``trace`` for gptq) and the exact allocation at the budget."""
    obj = Objective(
        problem.model, problem.data, problem.loss, loss_fn=problem.loss_fn,
        params=parse_params(args.params), dtype=DTYPES.get(args.dtype), device=args.device,
    )  # fmt: skip
    budget = args.budget or problem.defaults.get("budget", 100)
    if args.curvature in ("kfac", "ekfac"):
        raise UsageError(
            f"--curvature {args.curvature} is not a matrix the sensitivity scores; pass "
            "--method kfac for scores from the Kronecker factors of the GGN."
        )
    method = "trace" if args.method == "gptq" else args.method
    sens = sensitivity(
        obj, bits, method=method, quantizer=quantizer, budget=budget, seed=args.seed,
        curvature=args.curvature, layers=layers,
    )  # fmt: skip
    if args.method == "gptq":
        sens = gptq_sensitivity(sens, problem.model, problem.data, group_size=args.group_size,
                                symmetric=not args.asymmetric,
                                full_range=not args.narrow_range)  # fmt: skip
    cost, limit = _budget(args, sens)
    try:
        alloc = allocate(sens, limit, cost=cost, fixed=_fixed(args.fixed))
    except ValueError as err:
        raise UsageError(f"--{'size' if cost == 'size' else 'bops'}: {err}") from err
    return sens, alloc


def _gptq_page(args, problem, bits: dict, alloc: Allocation | None = None) -> Page:
    """``--method gptq``: the GPTQ copy at ``bits``, measured, and saved with ``--save``."""
    if args.save and not args.hf:
        raise UsageError(
            f"--save {args.save}: saving writes a Hugging Face folder; load the model with --hf."
        )
    planned = gptq_plan(problem.model, problem.data, group_size=args.group_size)
    start = time.perf_counter()
    try:
        q = gptq(problem.model, problem.data, bits, group_size=args.group_size,
                 symmetric=not args.asymmetric, embeddings=args.embedding_bits or None,
                 full_range=not args.narrow_range)  # fmt: skip
    except ValueError as err:
        raise UsageError(f"--method gptq: {err}") from err
    seconds = time.perf_counter() - start
    data = problem.test_data if problem.test_data is not None else problem.data
    where = "held-out data" if problem.test_data is not None else "the calibration data"
    measured = {}
    for name, model in (("float", problem.model), ("gptq", q)):
        ev = evaluate(model, data, problem.loss, loss_fn=problem.loss_fn)
        measured[name] = {"loss": ev.loss, "accuracy": ev.accuracy}
    info = quantization_of(q)
    run = {"seconds": seconds, "hessian_bytes": info.hessian_bytes, "planned": str(planned),
           "planned_bytes": planned.total, "peak_rss_bytes": peak_rss(),
           "embeddings": list(info.embeddings),
           "layers": [vars(r) for r in info.layers]}  # fmt: skip
    doc = {"gptq": run, "measured": measured}
    sections = [
        Section("GPTQ layers", f"{len(info.layers)} layers in {seconds:.1f} s; at most "
                f"{info.hessian_bytes / 2**20:.1f} MiB of layer Hessians held at once (one "
                f"block); embeddings rounded per row: {len(info.embeddings)}. Planned: "
                f"{planned}; process peak RSS {peak_rss() / 2**20:.0f} MiB.",
                ("layer", "bits", "group", "error", "rtn_error", "rule"),
                [[r.name, r.bits, r.group_size, r.error, r.rtn_error, r.rule]
                 for r in info.layers]),
        Section(f"Measured on {where}", "", ("model", "loss", "accuracy"),
                [[k, v["loss"], v["accuracy"]] for k, v in measured.items()]),
    ]  # fmt: skip
    if alloc is not None:
        doc["allocation"] = _allocation_doc(alloc)
    if args.save:
        from transformers import AutoTokenizer

        saved = save(q, args.save, tokenizer=AutoTokenizer.from_pretrained(args.hf))
        doc["saved"] = {k: str(v) if k == "path" else v for k, v in vars(saved).items()}
        sections.append(Section("Saved (compressed-tensors pack-quantized)", str(saved.path),
                                ("folder_bytes", "weight_bytes", "packed_bytes", "float_bytes"),
                                [[saved.folder_bytes, saved.weight_bytes, saved.packed_bytes,
                                  saved.float_bytes]]))  # fmt: skip
    return Page(f"hesse quantize --method gptq: {problem.name}", doc, sections, {})


def _bits(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        bits = ()
    if not bits or not all(1 <= b <= 16 for b in bits):
        raise UsageError(f"--bits {text!r}: give widths from 1 to 16, comma-separated (2,4,8).")
    return bits


def _quantizer(args: argparse.Namespace, model: torch.nn.Module, layers) -> Quantizer:
    try:
        q = Quantizer(4, args.granularity, args.group_size, not args.asymmetric)
        chosen = quantizable(model, layers)
        axes, weights = output_axes(model, chosen), dict(model.named_parameters())
        for name, p in chosen.items():
            q.codes(weights[p], name=name, axis=axes[name])
    except ValueError as err:
        words = str(err).replace("group_size=", "--group-size ")
        raise UsageError(words.replace("granularity=", "--granularity ")) from err
    return q


def _fixed(text: str | None) -> dict[str, int]:
    out = {}
    for item in (text or "").split(","):
        name, _, b = item.strip().partition("=")
        if not name:
            continue
        if not b.strip().isdigit():
            raise UsageError(f"--fixed {text!r}: expected LAYER=BITS pairs, e.g. head=8,fc1=4.")
        out[name] = int(b)
    return out


def _budget(args: argparse.Namespace, sens: Sensitivity) -> tuple[str, float]:
    if args.size is not None and args.bops is not None:
        raise UsageError("--size and --bops: give one budget, not both.")
    if args.bops is not None:
        return "bops", args.bops * sum(r.macs * 32 * 8 for r in sens.layers)
    share = 0.125 if args.size is None else args.size
    return "size", share * sum(r.n_params * 4 for r in sens.layers)


def _measure(problem, data, sens, alloc, quantizer) -> dict:
    def measured(bits: dict | None) -> dict:
        model = problem.model if bits is None else quantize(problem.model, bits, quantizer)
        ev = evaluate(model, data, problem.loss, loss_fn=problem.loss_fn)
        return {"loss": ev.loss, "accuracy": ev.accuracy}

    rows = {"float": {"bits": None, "size_bytes": sum(r.n_params * 4 for r in sens.layers),
                      "predicted": 0.0} | measured(None)}  # fmt: skip
    fits = [b for b in sens.bits if sum(r.n_params * b / 8 for r in sens.layers) <= alloc.budget]
    if fits and alloc.cost == "size":
        uniform = {r.name: max(fits) for r in sens.layers}
        rows[f"uniform {max(fits)}-bit"] = {
            "bits": uniform, "size_bytes": sum(r.n_params * max(fits) / 8 for r in sens.layers),
            "predicted": sum(r.omega[max(fits)] for r in sens.layers),
        } | measured(uniform)  # fmt: skip
    rows["Hessian (Ω-optimal)"] = {
        "bits": alloc.bits, "size_bytes": alloc.size_bytes, "predicted": alloc.predicted,
    } | measured(alloc.bits)  # fmt: skip
    step = max(1, len(alloc.frontier) // MEASURED_POINTS)
    frontier = [
        {"cost": p.cost, "predicted": p.predicted, "bits": p.bits} | measured(p.bits)
        for p in alloc.frontier[::step]
    ]
    return {"configurations": rows, "frontier": frontier}


def _page(problem, sens: Sensitivity, alloc: Allocation, measured: dict, where: str) -> Page:
    unit = "bytes" if alloc.cost == "size" else "bit-operations per sample"
    chosen = [[r.name, r.n_params, alloc.bits[r.name], r.omega[alloc.bits[r.name]]]
              for r in sens.layers]  # fmt: skip
    configs = [[name, c["size_bytes"], c["predicted"], c["loss"], c["accuracy"]]
               for name, c in measured["configurations"].items()]  # fmt: skip
    front = [[p["cost"], p["predicted"], p["loss"], p["accuracy"]] for p in measured["frontier"]]
    sections = [
        Section(f"Sensitivity ({sens.method}, {sens.curvature})",
                f"score = {_score_words(sens.method)}; {sens.rule}.",
                sens.columns(), sens.rows()),
        Section(f"Chosen bits (budget {alloc.budget:.6g} {unit})",
                f"Exact optimum (dynamic program); predicted Ω = {alloc.predicted:.4g}, size "
                f"{alloc.size_bytes:.6g} bytes, {alloc.bops:.6g} BOPs per sample "
                f"(activations at {alloc.activation_bits} bits).",
                ("layer", "n_params", "bits", "omega"), chosen),
        Section(f"Measured on {where}", "", ("configuration", "size_bytes", "predicted Ω",
                "loss", "accuracy"), configs),
        Section(f"Frontier (cost in {unit}), measured on {where}", "",
                ("cost", "predicted Ω", "loss", "accuracy"), front, "frontier.png"),
    ]  # fmt: skip
    doc = {"sensitivity": sens.to_json(), "allocation": _allocation_doc(alloc)} | measured
    figures = {"frontier.png": _plot(measured, problem.name)}
    return Page(f"hesse quantize: {problem.name}", doc, sections, figures)


def _score_words(method: str) -> str:
    return {
        "trace": "Tr(H_i)/n_i (Hutchinson, ± its standard error)",
        "eig": "λmax(H_i) (Lanczos)",
        "qbert": "mean + std of λmax(H_i) over batches (± the std)",
        "kfac": "Tr(A_i) Tr(G_i)/n_i from the Kronecker factors (no products)",
    }[method]


def _allocation_doc(alloc: Allocation) -> dict:
    return {
        "bits": alloc.bits, "predicted": alloc.predicted, "size_bytes": alloc.size_bytes,
        "bops": alloc.bops, "cost": alloc.cost, "budget": alloc.budget,
        "activation_bits": alloc.activation_bits, "rule": alloc.rule,
        "frontier": [{"cost": p.cost, "predicted": p.predicted, "bits": p.bits}
                     for p in alloc.frontier],
    }  # fmt: skip


def _plot(measured: dict, name: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    front = [p for p in measured["frontier"] if p["predicted"] > 0]  # log axis: Ω = 0 left out
    ax.plot([p["predicted"] for p in front], [p["loss"] for p in front], "o-", label="frontier")
    for label, c in measured["configurations"].items():
        if c["bits"] is not None and c["predicted"] > 0:
            ax.plot([c["predicted"]], [c["loss"]], "s", label=label)
    ax.axhline(measured["configurations"]["float"]["loss"], color="gray", ls=":", label="float")
    ax.set(xscale="log", yscale="log", xlabel="predicted Ω", ylabel="measured loss", title=name)
    ax.legend(fontsize=8)
    out = png(fig)
    plt.close(fig)
    return out
