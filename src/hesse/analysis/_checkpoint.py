"""Resumable runs: an operator wrapper that records every product in a checkpoint.

hesse's algorithms are deterministic given their seed, so a rerun of the same command asks
for the same products in the same order. :class:`RecordingOperator` numbers the products,
stores each output (with a hash of its input) as one file written atomically, and on a rerun
returns the stored output when the i-th input hashes the same. Replay costs no data pass,
and because the stored outputs are the bits the interrupted run computed, the resumed run
ends with exactly the result of an uninterrupted one.

Layout: ``FILE`` is a small JSON manifest (what run wrote it); ``FILE.parts/000042.pt``
holds product 42. A run killed at any moment leaves at worst a stray temporary file, which
is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..operators import Operator
from ..report import atomic

FORMAT = "hesse.checkpoint/1"


class Checkpoint:
    """The stored products of one run.

    Args:
        path: the manifest file; products go to the folder ``path + ".parts"``.
        key: JSON-able description of the run (command, options, model and data
            fingerprints); a checkpoint written by a different run is refused.

    Raises:
        ValueError: ``path`` holds a checkpoint of a different run, or is not a checkpoint.
    """

    def __init__(self, path: str | os.PathLike, key: dict):
        self.path = Path(path)
        self.parts = Path(f"{self.path}.parts")
        manifest = {"format": FORMAT, "key": key}
        resumed = self.path.exists()
        if resumed:
            _check_manifest(self.path, manifest)
        self.parts.mkdir(parents=True, exist_ok=True)
        if not resumed:
            atomic.write_text(self.path, json.dumps(manifest, indent=1, sort_keys=True))

    def part(self, index: int) -> Path:
        """File of product ``index``."""
        return self.parts / f"{index:06d}.pt"

    def get(self, index: int, digest: str) -> torch.Tensor | None:
        """The stored output of product ``index`` if its input hashed to ``digest``, else None."""
        if not self.part(index).is_file():
            return None
        saved = torch.load(self.part(index), weights_only=True)
        if saved["input_sha256"] != digest:
            self.truncate(index)  # the run diverged from the recorded one: recompute from here
            return None
        return saved["output"]

    def put(self, index: int, digest: str, output: torch.Tensor) -> None:
        """Store product ``index`` atomically."""
        atomic.torch_save(self.part(index), {"input_sha256": digest, "output": output.cpu()})

    def truncate(self, index: int) -> None:
        """Forget products ``index`` and later."""
        for file in self.parts.glob("*.pt"):
            if int(file.stem) >= index:
                file.unlink()

    def __len__(self) -> int:
        return len(list(self.parts.glob("*.pt")))


def _check_manifest(path: Path, manifest: dict) -> None:
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"checkpoint: {path} exists but is not a hesse checkpoint ({err}); "
            "choose another --checkpoint path or delete that file."
        ) from err
    if found != manifest:
        raise ValueError(
            f"checkpoint: {path} was written by a different run (other command, options, "
            "model or data); delete it and its .parts folder to start afresh, or pass another "
            "--checkpoint path."
        )


class TimeUp(Exception):
    """The run's time budget is spent; raised before a product that would start after it."""


class ProductLog:
    """Numbers the products of a run, replays stored ones and shows progress.

    Args:
        checkpoint: where products are stored, or None to only count them.
        progress: show a tqdm bar of products (data passes) for each step (see :meth:`step`).
        max_time: seconds from now after which no new product starts (:class:`TimeUp` is
            raised instead); stored products still replay. None: no limit.
        on_first: called with the seconds of the first computed product (e.g. to estimate
            the time of the run).
    """

    def __init__(
        self,
        checkpoint: Checkpoint | None = None,
        *,
        progress: bool = False,
        max_time: float | None = None,
        on_first: Callable[[float], None] | None = None,
    ):
        self.checkpoint, self.progress = checkpoint, progress
        self.index, self.replayed, self.computed = 0, 0, 0
        self.columns, self.seconds = 0, 0.0  # computed products, counted in columns, and time
        self.deadline = None if max_time is None else time.monotonic() + max_time
        self.on_first = on_first
        self._bar = None

    def step(self, description: str, total: int | None = None) -> None:
        """Start a new progress bar for the next products (closing the previous one)."""
        self.close()
        self._bar = tqdm(total=total, desc=description, unit="product", disable=not self.progress)

    def close(self) -> None:
        """Close the current progress bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def product(self, op: Operator, V: torch.Tensor) -> torch.Tensor:
        """``op @ V``, from the checkpoint when this product was recorded before."""
        index, self.index = self.index, self.index + 1
        if self._bar is not None:
            self._bar.update(V.shape[1])
        if self.checkpoint is None:
            return self._compute(op, V)
        digest = _digest(V)
        stored = self.checkpoint.get(index, digest)
        if stored is not None:
            self.replayed += 1
            return stored.to(device=V.device, dtype=op.dtype)
        output = self._compute(op, V)
        self.checkpoint.put(index, digest, output)
        return output

    def _compute(self, op: Operator, V: torch.Tensor) -> torch.Tensor:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise TimeUp
        start = time.perf_counter()
        output = op.matmat(V)
        seconds = time.perf_counter() - start
        self.computed, self.columns = self.computed + 1, self.columns + V.shape[1]
        self.seconds += seconds
        if self.computed == 1 and self.on_first is not None:
            self.on_first(seconds)
        return output

    def affordable(self, budget: int) -> int:
        """``budget``, or fewer columns when the time left runs out first (at the mean rate).

        Lets an iterative method stop by itself within the time budget, with its partial
        result and ``converged=False``, rather than being cut off by :class:`TimeUp`.
        """
        if self.deadline is None or self.columns == 0:
            return budget
        left = self.deadline - time.monotonic()
        return max(0, min(budget, int(left * self.columns / self.seconds)))


def _digest(V: torch.Tensor) -> str:
    h = hashlib.sha256(f"{tuple(V.shape)} {V.dtype}".encode())
    h.update(V.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RecordingOperator(Operator):
    """Any hesse operator, with its products (and those of its blocks) going through a log.

    Args:
        op: the operator to wrap (shape, dtype, device, tags and space are its own).
        log: numbers, stores and replays the products; blocks share it, so that the products
            of a whole analysis form one sequence.

    Example:
        >>> A = RecordingOperator(DenseOperator(torch.eye(3)), ProductLog())  # doctest: +SKIP
        >>> A @ torch.ones(3)  # doctest: +SKIP
        tensor([1., 1., 1.])
    """

    def __init__(self, op: Operator, log: ProductLog):
        super().__init__(op.shape[0], op.dtype, op.device, op.tags, op.space)
        self.op, self.log = op, log

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.log.product(self.op, V)

    def _restrict(self, names: list[str]) -> Operator:
        return RecordingOperator(self.op.restrict(names), self.log)
