"""Training dynamics and loss landscapes: sharpness over training, stability, landscapes.

Example:
    >>> mon = hesse.SharpnessMonitor(model, data, F.mse_loss, every=50)  # doctest: +SKIP
    >>> for t in range(steps):  # doctest: +SKIP
    ...     mon.step(t, lr=0.1)
    ...     train_step()
"""

from ._plots import edge_summary, sharpness_figure
from .criteria import DEFINITIONS, SpectralCriteria, criteria_from, spectral_criteria
from .landscape import Landscape, grid_losses, landscape
from .monitor import LightningHook, SharpnessMonitor, SharpnessRecord, read_jsonl
from .sgd_verdicts import BatchNoise
from .spectra import BatchSpectrum, batch_spectrum
from .thresholds import Stability, stability
from .verdicts import Verdict, gd_threshold

__all__ = [
    # sharpness over training
    "SharpnessMonitor",
    "SharpnessRecord",
    "LightningHook",
    "read_jsonl",
    # stability thresholds
    "stability",
    "Stability",
    "BatchNoise",
    "Verdict",
    "gd_threshold",
    "sharpness_figure",
    "edge_summary",
    # loss landscapes
    "landscape",
    "Landscape",
    "grid_losses",
    # spectral criteria of a minimum
    "spectral_criteria",
    "criteria_from",
    "SpectralCriteria",
    "DEFINITIONS",
    # mini-batch spectra
    "batch_spectrum",
    "BatchSpectrum",
]
