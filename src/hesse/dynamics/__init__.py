"""Training dynamics and loss landscapes: sharpness over training, stability, landscapes.

Example:
    >>> mon = hesse.SharpnessMonitor(model, data, F.mse_loss, every=50)  # doctest: +SKIP
    >>> for t in range(steps):  # doctest: +SKIP
    ...     mon.step(t, lr=0.1)
    ...     train_step()
"""

from .criteria import DEFINITIONS, SpectralCriteria, criteria_from, spectral_criteria
from .landscape import Landscape, landscape
from .monitor import LightningHook, SharpnessMonitor, SharpnessRecord, read_jsonl
from .spectra import BatchSpectrum, batch_spectrum
from .thresholds import Stability, stability

__all__ = [
    # sharpness over training
    "SharpnessMonitor",
    "SharpnessRecord",
    "LightningHook",
    "read_jsonl",
    # stability thresholds
    "stability",
    "Stability",
    # loss landscapes
    "landscape",
    "Landscape",
    # spectral criteria of a minimum
    "spectral_criteria",
    "criteria_from",
    "SpectralCriteria",
    "DEFINITIONS",
    # mini-batch spectra
    "batch_spectrum",
    "BatchSpectrum",
]
