"""What :class:`~ptq.calibration.observers.LinearInputObserver` hands out: per-layer statistics
(:class:`LinearInputStats`) and one prompt's contribution (:class:`PromptRecord`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LinearInputStats:
    """Calibration statistics of one Linear's input ``x [..., in_features]``.

    amax: float32 ``[]`` max |x| over all calls. channel_amax: float32 ``[in_features]``. step_amax: float32
    ``[num_steps]`` (max |x| per denoising step; zeros for steps never seen) or None. samples: float32 ``[k]`` random
    |x| values (for percentile / MSE clipping) or None. calls: number of forwards observed.
    sample_block: ``samples`` holds runs of this many consecutive input elements (``samples.view(-1, sample_block)``
    are real blocks of x along ``in_features``, aligned to multiples of ``sample_block``: NVFP4's runtime blocks
    when 16); 1 = independent elements. sample_steps: int64 ``[k]`` denoising step of each sample (``-1`` when
    no step was set) or None. rows: ``[n, in_features]`` whole input rows (tokens) in the input's dtype, on the CPU,
    sampled evenly from every call (``LinearInputObserver(rows_per_call=...)``), or None; row_steps: int64 ``[n]``
    their denoising steps.
    """

    amax: torch.Tensor
    channel_amax: torch.Tensor
    step_amax: torch.Tensor | None = None
    samples: torch.Tensor | None = None
    calls: int = 0
    tokens: int = 0
    sample_block: int = 1
    sample_steps: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    row_steps: torch.Tensor | None = None

    def to(self, device: str | torch.device) -> LinearInputStats:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return LinearInputStats(mv(self.amax), mv(self.channel_amax), mv(self.step_amax), mv(self.samples),
                                self.calls, self.tokens, self.sample_block, mv(self.sample_steps), mv(self.rows),
                                mv(self.row_steps))


@dataclass
class PromptRecord:
    """One calibration prompt's contribution, as :meth:`LinearInputObserver.end_prompt` returns it.

    layers: per layer name ``channel_amax`` float32 ``[in]``, ``step_amax`` float32 ``[num_steps + 1]`` or None
    (CPU copies), ``calls``, ``tokens``, ``samples`` float32 ``[k]`` (CPU) or None, ``sample_steps`` ``[(step,
    count)]``, ``sample_block``, ``rows`` ``[n, in]`` (CPU) or None, ``row_steps`` ``[(step, count)]``. hessians:
    per Hessian group (by its first layer's name) the prompt's ``sum X^T X`` float32 ``[in, in]`` (the observer's
    own buffer: valid until its next ``begin_prompt``); groups: its members.
    """

    index: int
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)


def step_column(counts: list[tuple[int, int]]) -> torch.Tensor | None:
    """int64 ``[sum of counts]``: each ``(step, count)`` repeated ``count`` times (None for no entries)."""
    if not counts:
        return None
    return torch.cat([torch.full((k,), s, dtype=torch.int64) for s, k in counts])


__all__ = ["LinearInputStats", "PromptRecord", "step_column"]
