"""Graph bytes measured right, graphs freed: peak memory stays flat product after product.

The peak-memory checks run in a fresh interpreter, so that the peak resident memory they read
is theirs and not that of the tests before them; between two checks the peak is reset
(``VmHWM`` of ``/proc/self/status``, reset by writing 5 to ``/proc/self/clear_refs``,
Linux >= 4.0).
"""

import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

from hesse.operators._memory import saved_bytes, storages

DT = torch.float64


def test_saved_bytes_count_each_storage_once_and_skip_the_resident_ones():
    W = torch.randn(1000, 10, dtype=DT, requires_grad=True)
    x = torch.randn(4, 1000, dtype=DT, requires_grad=True)

    def build():
        h = x @ W  # saves x (32 kB) and W (80 kB)
        return (h * h).sum()  # saves h twice: one storage (320 B)

    assert saved_bytes(build, set())[1] == 32_000 + 80_000 + 320
    assert saved_bytes(build, storages([W]))[1] == 32_000 + 320


def test_measured_graph_is_freed_without_the_garbage_collector():
    # a pack hook returning the saved tensor itself made tanh's node own its own output, a
    # reference cycle that only the cyclic collector frees: every uncached graph piled up
    x = torch.randn(4, 3, dtype=DT)
    W = torch.randn(3, 5, dtype=DT, requires_grad=True)

    def build():
        h = torch.tanh(x @ W)  # tanh saves its output
        return h, weakref.ref(h)

    gc.disable()
    try:
        (h, ref), _ = saved_bytes(build, set())
        assert ref() is not None
        del h
        assert ref() is None
    finally:
        gc.enable()


# ------------------------------------------------------------------ peak memory of products


PRODUCTS = 20
SLACK_MB = 16  # allocator noise; a leak adds a whole graph (>= 20 MB here) on every product
CHECKS = [  # curvature, attention, whether the graphs are kept
    ("hessian", "eager", "uncached"),
    ("hessian", "default", "uncached"),
    ("ggn", "default", "uncached"),
    ("hessian", "eager", "cached"),  # graphs kept, then dropped: PRODUCTS // 2 operators in turn
]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import BertConfig, BertForSequenceClassification
    import hesse
    from hesse.operators.plan import plan

    def peak_mb():
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def check(curvature, attn, cache, products):
        torch.manual_seed(0)
        kwargs = {} if attn == "default" else {"attn_implementation": attn}
        config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=128,
                            max_position_embeddings=64, num_labels=3, **kwargs)
        model = BertForSequenceClassification(config).eval()
        ids = torch.randint(1, 100, (32, 48))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "labels": torch.randint(0, 3, (32,))}
        obj = hesse.Objective(model, [batch])
        build = {"hessian": hesse.HessianOperator, "ggn": hesse.GGNOperator}[curvature]
        cached = cache == "cached"
        op = build(obj, max_cache_bytes="auto" if cached else 0)
        v = torch.randn(op.shape[0])
        reset_peak()
        peaks, kept = [], []
        for _ in range(products if not cached else products // 2):
            op @ v
            kept.append(op.cache_bytes)
            if cached:  # the next operator builds its graphs anew
                op @ v
                op.clear_cache()
                op = build(obj)
            peaks.append(peak_mb())
        graph = plan(obj, curvature=curvature).graph_bytes / 1e6
        return {"peaks": peaks, "graph_mb": graph, "kept": kept}

    torch.set_num_threads(1)
    checks, products = json.loads(sys.argv[1]), int(sys.argv[2])
    print(json.dumps([check(*c, products) for c in checks]))
    """
)


@pytest.fixture(scope="module")
def runs():
    pytest.importorskip("transformers")
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak memory")
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(CHECKS), str(PRODUCTS)],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(zip(CHECKS, json.loads(run.stdout.strip().splitlines()[-1]), strict=True))


@pytest.mark.slow  # ~10 s: a fresh interpreter imports torch and transformers
@pytest.mark.parametrize("check", CHECKS, ids=["-".join(c) for c in CHECKS])
def test_products_keep_peak_memory_flat(runs, check):
    out = runs[check]
    peaks = out["peaks"]
    assert all(out["kept"]) if check[2] == "cached" else not any(out["kept"])
    assert out["graph_mb"] >= 1.25 * SLACK_MB, out["graph_mb"]  # a leak could not hide
    growth = peaks[-1] - peaks[0]
    assert growth <= SLACK_MB, f"peak RSS grew by {growth:.0f} MB over {len(peaks)} steps: {peaks}"
