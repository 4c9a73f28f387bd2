"""Hessian-aware mixed-precision quantization: sensitivity, exact allocation, measured models.

The pipeline of HAWQ (Dong et al. 2019), HAWQ-V2 (Dong et al. 2020), HAWQ-V3 (Yao et al.
2021) and Q-BERT (Shen et al. 2020) on any model and loss: per-layer curvature with its error
bar (:func:`sensitivity`), the exact optimum of the bit allocation under a size or BOPs
budget (:func:`allocate`), a fake-quantized copy (:func:`quantize`) and its measured loss
(:func:`evaluate`); a bisection on the measured metric along the Hessian frontier
(:func:`search`); GPTQ at uniform or allocated widths (:func:`gptq`) and packed
compressed-tensors checkpoints (:func:`save`); APHQ block reconstruction
(:func:`reconstruct`) and bit switching (:class:`BitSwitch`).
"""

from ..problem._evaluate import Evaluation, evaluate
from ._layers import output_axes, quantizable
from .allocate import Allocation, FrontierPoint, allocate
from .gptq import GptqLayer, Quantization, gptq, quantization_of
from .gptq_plan import GptqMemory, gptq_plan
from .gptq_sensitivity import gptq_sensitivity
from .quantize import quantize
from .quantizer import GRANULARITIES, Codes, Quantizer
from .reconstruct import reconstruct
from .save import SavedCheckpoint, save
from .search import SearchResult, objective_loss, search
from .sensitivity import METHODS as SENSITIVITY_METHODS
from .sensitivity import LayerSensitivity, Sensitivity, sensitivity
from .switch import BitSwitch, SwitchStep

__all__ = [
    # the grid
    "Quantizer",
    "Codes",
    "quantizable",
    "output_axes",
    "GRANULARITIES",
    "SENSITIVITY_METHODS",
    # sensitivity
    "sensitivity",
    "Sensitivity",
    "LayerSensitivity",
    # allocation
    "allocate",
    "Allocation",
    "FrontierPoint",
    # the quantized model and its measurement
    "quantize",
    "evaluate",
    "Evaluation",
    "objective_loss",
    # GPTQ and checkpoints that load
    "gptq",
    "gptq_sensitivity",
    "GptqLayer",
    "Quantization",
    "quantization_of",
    "gptq_plan",
    "GptqMemory",
    "save",
    "SavedCheckpoint",
    # bisection on the measured metric
    "search",
    "SearchResult",
    # post-training reconstruction and bit switching
    "reconstruct",
    "BitSwitch",
    "SwitchStep",
]
