"""Figures of the dynamics tools: sharpness against steps with the stability thresholds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .monitor import SharpnessRecord


def sharpness_figure(
    runs: dict[str, Sequence[SharpnessRecord]], *, losses: dict[str, Sequence[float]] | None = None
) -> Any:
    """λmax against the step for each run, with its threshold ``(2 + 2β)/η`` dashed.

    Args:
        runs: ``{label: history}`` of :class:`SharpnessRecord` lists (one colour each).
        losses: ``{label: per-step training losses}`` for a second panel (optional).

    Returns:
        A matplotlib figure.
    """
    import matplotlib.pyplot as plt

    panels = 2 if losses else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0, 0]
    for i, (label, history) in enumerate(runs.items()):
        color = f"C{i}"
        ax.plot([r.step for r in history], [r.lambda_max for r in history], color=color,
                label=f"λmax, {label}")  # fmt: skip
        thresholds = {r.threshold for r in history if r.threshold is not None}
        for t in thresholds:
            ax.axhline(t, color=color, linestyle="--", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("sharpness λmax (dashed: (2 + 2β)/η)")
    ax.legend(fontsize=8)
    if losses:
        for i, (label, values) in enumerate(losses.items()):
            axes[0, 1].semilogy(values, color=f"C{i}", label=label, linewidth=0.8)
        axes[0, 1].set_xlabel("step")
        axes[0, 1].set_ylabel("training loss")
        axes[0, 1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def edge_summary(history: Sequence[SharpnessRecord]) -> dict[str, float]:
    """How close λmax stays to its threshold over the second half of the checks.

    Returns:
        ``{"mean_ratio", "min_ratio", "max_ratio", "max_deviation", "checks"}`` with ratio =
        λmax / threshold over the last half of the checks.
    """
    ratios = [r.lambda_max / r.threshold for r in history[len(history) // 2 :] if r.threshold]
    if not ratios:
        return {"mean_ratio": float("nan"), "min_ratio": float("nan"),
                "max_ratio": float("nan"), "max_deviation": float("nan"), "checks": 0}  # fmt: skip
    return {
        "mean_ratio": sum(ratios) / len(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "max_deviation": max(abs(x - 1) for x in ratios),
        "checks": len(ratios),
    }
