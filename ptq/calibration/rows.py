"""Whole input rows (tokens) of observed Linears, for smoothing searches.

Each call keeps about ``per_call`` rows of ``x [..., in]``, evenly strided from a random offset drawn from its own
``random.Random`` (seeded by ``seed + 1``, by ``(seed + 1, prompt)`` in prompt mode: the |x| samples do not change
with ``per_call``), as CPU copies in the input's dtype; sibling layers reading the same input share one copy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from ptq.calibration.collector import HookHost, LayerCollector
from ptq.calibration.input_hooks import SameInput
from ptq.calibration.records import step_column


@dataclass
class Rows:
    """One layer's rows: ``[k, in]`` CPU tensors (one per call, or per folded prompt) and ``(step, count)`` per
    call."""

    values: list[torch.Tensor] = field(default_factory=list)
    steps: list[tuple[int, int]] = field(default_factory=list)


class RowCollector(LayerCollector[Rows]):
    """About ``per_call`` whole input rows per call (module docstring); 0 takes none."""

    def __init__(self, hooks: HookHost, per_call: int, seed: int) -> None:
        if per_call < 0:
            raise ValueError(f"rows_per_call={per_call}: expected >= 0")
        super().__init__(hooks)
        self.per_call, self.seed = per_call, seed
        self.active = per_call > 0
        self.graph_safe = per_call == 0  # positions are drawn on the host per call
        self._rng = random.Random(seed + 1)
        self._last = SameInput()  # the rows taken from the input seen last

    def begin_prompt(self, index: int) -> None:
        self._rng = random.Random(f"{self.seed + 1}:{index}")

    def detach(self) -> None:
        self._last.clear()

    def observe(self, name: str, x: torch.Tensor, capturing: bool) -> None:
        st = self.open.get(name)
        if st is None:
            st = self.open[name] = Rows()
        rows = self._rows(x)
        st.values.append(rows)
        st.steps.append((self.hooks.step_label, rows.shape[0]))

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """About ``per_call`` rows of ``x`` as ``[k, in]`` on the CPU (evenly strided, random offset), the same
        tensor for consecutive layers reading the same input."""
        rows = self._last.get(x)
        if rows is not None:
            return rows
        flat = x.reshape(-1, x.shape[-1])
        n = flat.shape[0]
        k = min(self.per_call, n)
        stride = max(n // k, 1)
        offset = self._rng.randrange(stride)
        rows = flat[offset::stride][:k].detach().to("cpu", copy=True)
        self._last.put(x, rows)
        return rows

    def record(self, name: str) -> dict[str, Any]:
        st = self.open.get(name) or Rows()
        part = {"rows": torch.cat(st.values) if st.values else None, "row_steps": list(st.steps)}
        st.values, st.steps = [], []
        return part

    def fold_layer(self, name: str, part: dict[str, Any]) -> None:
        total = self.totals.get(name)
        if total is None:
            total = self.totals[name] = Rows()
        if part.get("rows") is not None:  # checkpoints written before rows were collected have neither key
            total.values.append(part["rows"])
        total.steps += part.get("row_steps", [])

    def total(self, name: str) -> dict[str, Any]:
        t = self.totals[name]
        return {"rows": torch.cat(t.values) if t.values else None, "row_steps": list(t.steps)}

    def stats(self, name: str, totals: bool) -> dict[str, Any]:
        st = (self.totals if totals else self.open).get(name) or Rows()
        return {"rows": torch.cat(st.values) if st.values else None, "row_steps": step_column(st.steps)}


__all__ = ["RowCollector", "Rows"]
