"""Peak memory of one top-10 eigenvalue run, in a fresh process per measurement.

``python -m bench.memory TOOL WORKLOAD SETTING_INDEX THREADS`` prints one JSON line. The
peak is the larger of ``ru_maxrss`` and an RSS sampled every millisecond by a thread
(psutil), minus the RSS just before the solver starts (model, data, operator and imports
are already there); tracemalloc cannot see torch's CPU allocator.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading

PYHESSIAN_MEMORY_MAXITER = 5


def _peak_during(fn) -> float:
    """MiB above the RSS at the start, at the peak of ``fn()``."""
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.001)

    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    fn()
    done.set()
    t.join()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is the peak of the whole process life: it tells about fn only if it rose.
    top = max(peak[0], maxrss * 1024) if maxrss > maxrss_before else peak[0]
    return (top - base) / 2**20


def measure(tool: str, workload: str, setting: int, threads: int) -> dict:
    """Run in a subprocess; returns ``{"tool", "workload", "peak_mib", "setting"}``."""
    cmd = [sys.executable, "-m", "bench.memory", tool, workload, str(setting), str(threads)]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _main(tool: str, workload: str, setting: int, threads: int) -> None:
    import torch

    from bench.adapters import Setting
    from bench.measure import gradient_fn
    from bench.run import ADAPTERS
    from bench.workloads import WORKLOADS

    torch.set_num_threads(threads)
    w = WORKLOADS[workload]()
    a = ADAPTERS[tool](w)
    s = a.eig_settings(10)[setting]
    if tool == "PyHessian":
        # Its memory does not grow with iterations (k deflation vectors); cap them for time.
        s = Setting(
            s.label + f" (maxIter={PYHESSIAN_MEMORY_MAXITER})",
            {**s.kwargs, "maxIter": PYHESSIAN_MEMORY_MAXITER},
        )
    # One plain gradient first, so that lazily loaded kernels are not charged to the tool;
    # no warm-up HVP: state an operator keeps between products (hesse's kept gradient
    # graphs) is part of the cost being measured.
    gradient_fn(w)()
    peak = _peak_during(lambda: a.top_eigs(10, s))
    kept = getattr(a.op, "cache_bytes", 0) / 2**20 if tool == "hesse" else None
    print(
        json.dumps(
            {
                "tool": tool,
                "workload": workload,
                "setting": s.label,
                "peak_mib": peak,
                "kept_graphs_mib": kept,
            }
        )
    )


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    _main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
