"""Prune the digits demo CNN with magnitude, OBD, M-FAC and layer-wise OBS; measure each copy.

Runs offline in about ten seconds on one CPU core (the demo trains once and is cached):

    python examples/prune_digits.py [SPARSITY]

Prints the held-out loss and accuracy of each pruned copy (no retraining), with the damping
each second-order method used. The command line does the same, with a table and a plot:

    hesse prune --demo digits --sparsity 0.7 --method magnitude,obd,mfac,layer_obs
"""

import sys

import torch

from hesse import Objective
from hesse.demo import load_demo
from hesse.problem._evaluate import evaluate
from hesse.prune import prune


def main(sparsity: float = 0.7) -> dict[str, float]:
    """Held-out loss of the digits CNN pruned to ``sparsity`` by each method."""
    torch.set_num_threads(1)
    demo = load_demo("digits", holdout=0.2)
    obj = Objective(demo.model, demo.batches(), demo.loss)
    dense = evaluate(demo.model, demo.test_batches(), demo.loss)
    print(f"dense: held-out loss {dense.loss:.3f}, accuracy {dense.accuracy:.1%}")
    losses = {}
    for method, recompute in [("magnitude", 1), ("obd", 1), ("mfac", 1), ("mfac", 4),
                              ("layer_obs", 1)]:  # fmt: skip
        plan = prune(obj, sparsity, method, recompute=recompute)
        pruned = plan.apply(demo.model)  # a copy: demo.model keeps its weights
        ev = evaluate(pruned, demo.test_batches(), demo.loss)
        name = method + (f" x{recompute}" if recompute > 1 else "")
        losses[name] = ev.loss
        damping = f", damping {plan.relative_damping[-1]:g} x mean diag" if plan.damping else ""
        print(
            f"{name:12s} {plan.removed_params}/{plan.total_params} weights zeroed: held-out "
            f"loss {ev.loss:.3f}, accuracy {ev.accuracy:.1%}{damping}"
        )
    return losses


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 0.7)
