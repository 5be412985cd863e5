"""What a recipe needs calibration to collect. Each part of a recipe states its needs; calibration collects the
union (:meth:`CalibrationNeeds.__or__`) and nothing else."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CalibrationNeeds:
    """amax: per-layer input max |x| (per channel and per denoising step); samples: random |x| blocks (for clipping
    searches; the number per call is ``calib.samples_per_call``); hessians: per-layer ``X^T X`` (GPTQ); inputs:
    this many recorded transformer forwards (sensitivity analysis); rows: about this many whole input rows (tokens,
    all ``in_features``) per layer, spread evenly over the calibration forwards (smoothing search)."""

    amax: bool = False
    samples: bool = False
    hessians: bool = False
    inputs: int = 0
    rows: int = 0

    def __or__(self, other: CalibrationNeeds) -> CalibrationNeeds:
        return CalibrationNeeds(self.amax or other.amax, self.samples or other.samples,
                                self.hessians or other.hessians, max(self.inputs, other.inputs),
                                max(self.rows, other.rows))

    @property
    def any(self) -> bool:
        """Whether any calibration forward is needed."""
        return self.amax or self.samples or self.hessians or self.inputs > 0 or self.rows > 0
