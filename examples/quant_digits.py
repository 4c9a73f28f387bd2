"""Hessian-aware mixed precision on the digits CNN: sensitivity, exact bits, measured accuracy.

Traces every layer's Hessian block from one sweep of probes, chooses the widths that minimise
the predicted loss increase when the weights may take 7% more bytes than at 3 bits each (an
integer program, solved exactly), and measures the held-out loss and accuracy against the
uniform 3-bit model. (At exactly the 3-bit size the optimum for this model is uniform 3-bit:
see docs/quant.md.) About 15 s on a laptop
CPU (the first run also trains the demo).

    python examples/quant_digits.py
"""

import torch

from hesse import Objective, quant
from hesse.demo import load_demo


def main(samples: int | None = None, budget: int = 100) -> dict:
    """Run the pipeline; returns ``{configuration: (size in bytes, held-out loss, accuracy)}``."""
    demo = load_demo("digits", holdout=0.2)
    obj = Objective(demo.model, demo.batches(samples=samples), demo.loss)
    sens = quant.sensitivity(obj, bits=(2, 3, 4, 5, 6, 8), budget=budget)
    print(sens.table())
    n = sum(row.n_params for row in sens.layers)
    size = n * 3 / 8  # bytes of the weights at 3 bits each
    alloc = quant.allocate(sens, budget=1.07 * size)
    print("chosen bits:", alloc.bits, f"({alloc.size_bytes:g} bytes; 3 bits each: {size:g})")
    models = {
        "float": demo.model,
        "uniform 3-bit": quant.quantize(demo.model, {n: 3 for n in sens.names}),
        "Hessian": quant.quantize(demo.model, alloc.bits),
    }
    sizes = {"float": 4 * n, "uniform 3-bit": size, "Hessian": alloc.size_bytes}
    out = {}
    for name, model in models.items():
        ev = quant.evaluate(model, demo.test_batches(), demo.loss)
        out[name] = (sizes[name], ev.loss, ev.accuracy)
        print(
            f"{name:>14}: {sizes[name]:7.0f} bytes  loss {ev.loss:.4f}  accuracy {ev.accuracy:.3f}"
        )
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
