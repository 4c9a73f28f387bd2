"""Analyses of a model's curvature: ``analyze`` and the ``Report`` it returns.

Example:
    >>> report = analyze(model, loader, F.cross_entropy, lr=0.1)  # doctest: +SKIP
    >>> report.save("hesse-report")  # doctest: +SKIP
"""

from hesse.analysis._analyze import Analysis, analyze, prepare
from hesse.analysis.layers import LayerRow, layer_table
from hesse.analysis.options import CURVATURES, SECTIONS, Options
from hesse.analysis.outliers import Outliers, find_outliers
from hesse.analysis.report import Report
from hesse.dynamics.sgd_verdicts import sgd_verdict
from hesse.dynamics.verdicts import Verdict, gd_verdict

__all__ = [
    "CURVATURES",
    "SECTIONS",
    "Analysis",
    "LayerRow",
    "Options",
    "Outliers",
    "Report",
    "Verdict",
    "analyze",
    "find_outliers",
    "gd_verdict",
    "layer_table",
    "prepare",
    "sgd_verdict",
]
