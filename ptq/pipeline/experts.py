"""Calibrating models with several experts along the schedule (WAN 2.2 A14B): one pass per expert, in schedule
order, so each expert is calibrated (statistics, Hessians, sensitivity) only on the steps it serves and, by
default, on the trajectory the already-quantized earlier experts produce (what the user will run).

:class:`ExpertView` is the adapter restricted to some of its targets: the stages (calibrate, analyse, quantize)
see only those, and its denoising loop stops after the last step they serve. With ``calib.expert_trajectory=bf16``
every expert is calibrated in one pass on the unquantized model's trajectory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ptq.models.base import ModelAdapter, QuantTarget, SampleSpec

#: calib.expert_trajectory values: what the later experts are calibrated on.
TRAJECTORIES = ("quantized", "bf16")


class _Done(Exception):
    """Raised inside the denoising loop once the view's experts have no more steps."""


class ExpertView:
    """``adapter`` with only the targets ``names``; every other attribute is the adapter's."""

    def __init__(self, adapter: ModelAdapter, names: list[str]) -> None:
        self._adapter = adapter
        self.names = list(names)

    def __getattr__(self, item: str) -> Any:
        return getattr(self._adapter, item)

    def targets(self) -> dict[str, QuantTarget]:
        return {n: t for n, t in self._adapter.targets().items() if n in self.names}

    def last_step(self, spec: SampleSpec) -> int | None:
        """Index of the last denoising step of ``spec`` that one of the view's targets serves (None: unknown)."""
        timesteps = self._adapter.step_timesteps(spec)
        if timesteps is None:
            return None
        served = [i for i, t in enumerate(timesteps) if any(tg.serves(t) for tg in self.targets().values())]
        return max(served) if served else -1

    def denoise(self, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None, spec: SampleSpec, *,
                condition: Any = None, forward: Mapping[str, Callable[..., Any]] | None = None,
                on_step_start: Callable[[int], None] | None = None,
                on_step_end: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
        """The adapter's loop, stopped after the last step the view's targets serve (returns those latents)."""
        last: list[torch.Tensor] = []
        stop = self.last_step(spec)

        def end(i: int, t: torch.Tensor, z: torch.Tensor) -> None:
            if on_step_end is not None:
                on_step_end(i, t, z)
            last[:] = [z]
            if stop is not None and i >= stop:
                raise _Done

        try:
            return self._adapter.denoise(prompt_embeds, negative_embeds, spec, condition=condition, forward=forward,
                                         on_step_start=on_step_start, on_step_end=end)
        except _Done:
            return last[0]


def schedule_order(targets: Mapping[str, QuantTarget]) -> list[str]:
    """Target names in the order their steps come (highest timesteps first; targets serving every step first)."""
    return sorted(targets, key=lambda n: -(targets[n].timesteps[1] if targets[n].timesteps else float("inf")))


def calibration_passes(adapter: ModelAdapter, trajectory: str) -> list[ModelAdapter | ExpertView]:
    """What to calibrate and quantize in turn: the adapter itself (one target, or ``trajectory="bf16"``), else one
    :class:`ExpertView` per expert in schedule order (``"quantized"``)."""
    if trajectory not in TRAJECTORIES:
        raise ValueError(f"calib.expert_trajectory={trajectory!r}: expected one of {', '.join(TRAJECTORIES)}")
    targets = adapter.targets()
    if len(targets) == 1 or trajectory == "bf16":
        return [adapter]
    return [ExpertView(adapter, [name]) for name in schedule_order(targets)]


def expert_steps(adapter: ModelAdapter, spec: SampleSpec) -> dict[str, list[int]] | None:
    """The denoising steps of ``spec`` each target serves (None for a model with one target)."""
    targets = adapter.targets()
    if len(targets) == 1:
        return None
    timesteps = adapter.step_timesteps(spec)
    if timesteps is None:
        return None
    return {n: [i for i, t in enumerate(timesteps) if tg.serves(t)] for n, tg in targets.items()}


def expert_run_info(adapter: ModelAdapter, trajectory: str, calib_spec: SampleSpec,
                    eval_spec: SampleSpec | None) -> dict[str, Any] | None:
    """What the report says about the experts: trajectory used, timestep range and steps of each."""
    targets = adapter.targets()
    if len(targets) == 1:
        return None
    used = ("each expert after the earlier ones were quantized: the later experts are calibrated on the quantized "
            "model's trajectory" if trajectory == "quantized" else
            "every expert on the bf16 model's trajectory (one pass)")
    return {"trajectory": trajectory, "calibration": used, "order": schedule_order(targets),
            "timesteps": {n: list(t.timesteps) if t.timesteps else None for n, t in targets.items()},
            "calib_steps": expert_steps(adapter, calib_spec),
            "eval_steps": expert_steps(adapter, eval_spec) if eval_spec is not None else None}
