"""What a recipe needs calibration to collect. Each part of a recipe states its needs; calibration collects the
union (:meth:`CalibrationNeeds.__or__`) and nothing else."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class CalibrationNeeds:
    """amax: per-layer input max |x| (per channel and per denoising step); samples: this many random |x| values per
    Linear call (0: none; for clipping searches), in aligned runs of ``sample_block`` inputs along ``in_features``;
    hessians: per-layer ``X^T X`` (GPTQ); inputs: this many recorded transformer forwards (sensitivity analysis);
    rows: about this many whole input rows (tokens, all ``in_features``) per layer, spread evenly over the
    calibration forwards (smoothing search)."""

    amax: bool = False
    samples: int = 0
    hessians: bool = False
    inputs: int = 0
    rows: int = 0
    sample_block: int = 1

    def __or__(self, other: CalibrationNeeds) -> CalibrationNeeds:
        return CalibrationNeeds(self.amax or other.amax, max(self.samples, other.samples),
                                self.hessians or other.hessians, max(self.inputs, other.inputs),
                                max(self.rows, other.rows), math.lcm(self.sample_block, other.sample_block))

    @property
    def any(self) -> bool:
        """Whether any calibration forward is needed."""
        return self.amax or self.samples > 0 or self.hessians or self.inputs > 0 or self.rows > 0

    def with_samples_per_call(self, override: int) -> CalibrationNeeds:
        """These needs with ``override`` |x| samples per call instead of the number asked for (``override`` 0, or
        no samples needed: unchanged)."""
        return replace(self, samples=override) if self.samples > 0 and override > 0 else self
