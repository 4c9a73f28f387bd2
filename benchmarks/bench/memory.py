"""Peak memory of one top-10 eigenvalue run, in a fresh process per measurement.

``python -m bench.memory TOOL WORKLOAD SETTING_INDEX THREADS`` prints one JSON line. The
peak is the larger of ``ru_maxrss`` and an RSS sampled every millisecond by a thread
(psutil), minus the RSS just before the solver starts (model, data, operator and imports
are already there); tracemalloc cannot see torch's CPU allocator. The same thread samples
the bytes glibc's malloc has handed out (``mallinfo2``: what the tool's tensors hold, without
the heap that fragmentation keeps mapped), reported as ``alloc_mib``. After the measurement,
the values are compared with the workload's reference (``bench.reference``, cached), and for
hesse the size of one float32 basis (``ncv + 2`` vectors of ``d``) is recorded: the issue's
goal is a peak within PyHessian's plus that basis.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

PYHESSIAN_MEMORY_MAXITER = 5
NO_GRAPHS = " (graphs not kept)"
"""Suffix of a tool name: hesse with ``HessianOperator(max_cache_bytes=0)``."""


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _allocated() -> int:
    """Bytes malloc has handed out and not taken back: heap chunks in use plus mmapped ones."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def _peak_during(fn, allocated: list[float] | None = None) -> float:
    """MiB above the RSS at the start, at the peak of ``fn()``.

    ``allocated``, when given, receives the peak of :func:`_allocated` above its start (MiB).
    """
    import psutil

    proc = psutil.Process()
    base, base_alloc = proc.memory_info().rss, _allocated()
    peak, peak_alloc, done = [base], [base_alloc], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            peak_alloc[0] = max(peak_alloc[0], _allocated())
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
    if allocated is not None:
        allocated.append((peak_alloc[0] - base_alloc) / 2**20)
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
    from bench.measure import eig_error, gradient_fn
    from bench.reference import reference
    from bench.run import ADAPTERS
    from bench.workloads import WORKLOADS

    torch.set_num_threads(threads)
    w = WORKLOADS[workload]()
    a = ADAPTERS[tool.removesuffix(NO_GRAPHS)](w)
    if tool.endswith(NO_GRAPHS):  # the same products, each batch's graph built anew
        import hesse

        a.op = hesse.HessianOperator(a.obj, max_cache_bytes=0)
    s = a.eig_settings(10)[setting]
    if tool.startswith("hesse"):  # the float32 basis the goal counts (see report.py)
        s = Setting(s.label, {**s.kwargs, "basis_dtype": torch.float32})
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
    values, allocated = [], []
    peak = _peak_during(lambda: values.append(a.top_eigs(10, s)), allocated)
    hesse_row = tool.startswith("hesse")
    kept = a.op.cache_bytes / 2**20 if hesse_row else None
    ref = reference(w, Path(__file__).resolve().parents[1] / ".cache")
    print(
        json.dumps(
            {
                "tool": tool,
                "workload": workload,
                "setting": s.label,
                "peak_mib": peak,
                "alloc_mib": allocated[0],
                "kept_graphs_mib": kept,
                "error": eig_error(values[0], ref.top)[0],
                # one float32 basis of eigs at k = 10: ncv = 21 vectors plus a block of 2
                "basis32_mib": 23 * w.n_params * 4 / 2**20 if hesse_row else None,
            }
        )
    )


def update(path: str, threads: int = 1) -> None:
    """Re-measure the memory rows of a results JSON (same tools and settings) and write it back.

    ``python -m bench.memory --update results.json``, then ``python -m bench --render
    results.json`` rewrites RESULTS.md; the other studies are left as they were measured.
    """
    from bench.run import ADAPTERS

    data = json.loads(Path(path).read_text())
    rows = []
    for name in dict.fromkeys(m["workload"] for m in data["memory"]):
        eigen = data["workloads"][name]["eigen"]
        for tool in ADAPTERS:
            settings = [r["setting"] for r in eigen if r["tool"] == tool and r["k"] == 10]
            label = next(m["setting"] for m in data["memory"] if m["tool"] == tool)
            index = next((i for i, x in enumerate(settings) if label.startswith(x)), 0)
            rows.append(measure(tool, name, index, threads))
            print(json.dumps(rows[-1]), flush=True)
        rows.append(measure("hesse" + NO_GRAPHS, name, 0, threads))
        print(json.dumps(rows[-1]), flush=True)
    data["memory"] = rows
    Path(path).write_text(json.dumps(data, indent=1, default=float))


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    if sys.argv[1] == "--update":
        update(sys.argv[2])
    else:
        _main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
