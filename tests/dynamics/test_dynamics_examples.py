"""The dynamics examples run at small settings and produce their figures."""

import matplotlib
import pytest

from example_scripts import load

matplotlib.use("Agg")


def test_edge_of_stability_example(tmp_path):
    summary = load("edge_of_stability").main(steps=40, every=20, samples=32, out=tmp_path)
    assert set(summary) == {"η = 0.4", "η = 0.2", "η = 0.5, β = 0.5"}
    assert all(s["checks"] == 1 for s in summary.values())
    assert (tmp_path / "edge_of_stability.png").stat().st_size > 0


def test_dynamics_landscape_example(tmp_path):
    # 72 samples: the SGD verdict of stability() visits every sample (a Lanczos run each)
    found = load("dynamics_landscape").main(samples=72, steps=20, grid=5, out=tmp_path)
    top = found["hessian"]
    assert top.values.shape == (5,) and found["filter"].kind == "filter"
    assert found["criteria"].lambda_max == pytest.approx(float(top.eigenvalues[0]), rel=1e-6)
    assert found["spectrum"].batch_sizes == (8, 64, 72)
    assert (tmp_path / "dynamics_landscape.png").stat().st_size > 0
