"""The peers on the same model, calibration and test data: llm-compressor's GPTQ, torchao's RTN.

Each returns ``(model, seconds, folder or None)``; the caller measures and counts bytes.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch


def llmcompressor_gptq(model, tokenizer, calib: list[dict], bits: int, group: int,
                       ignore: list[str], out: Path):  # fmt: skip
    """llm-compressor's GPTQModifier, symmetric int ``bits`` weights in groups of ``group``.

    Its defaults otherwise (block 128, dampening 0.01); saved compressed.
    """
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(
            num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group
        ),  # fmt: skip
    )
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=ignore)
    rows = [
        {k: v[i].tolist() for k, v in b.items()
         if k in ("input_ids", "attention_mask")}
        for b in calib
        for i in range(len(b["input_ids"]))
    ]  # fmt: skip
    data = Dataset.from_list(rows)
    m = copy.deepcopy(model)
    start = time.perf_counter()
    oneshot(model=m, processor=tokenizer, dataset=data, recipe=recipe,
            num_calibration_samples=len(rows), max_seq_length=len(rows[0]["input_ids"]),
            pipeline="basic")  # fmt: skip
    seconds = time.perf_counter() - start
    m.save_pretrained(out, save_compressed=True)
    return m, seconds, out


def torchao_int4_rtn(model, group: int, skip: list[str]):
    """Torchao's int4 weight-only round-to-nearest, groups of ``group``.

    ``IntxWeightOnlyConfig(int4, PerGroup)``: torchao's CPU path for int4 weights
    (``Int4WeightOnlyConfig`` needs CUDA's tinygemm or an int4 CPU kernel layout).
    """
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    m = copy.deepcopy(model)

    def keep(module, name):
        return isinstance(module, torch.nn.Linear) and name not in skip

    start = time.perf_counter()
    quantize_(m, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group)),
              filter_fn=keep)  # fmt: skip
    return m, time.perf_counter() - start, None
