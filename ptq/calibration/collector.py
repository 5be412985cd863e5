"""What calibration collects, prompt by prompt.

:class:`Collector`: what a calibration run drives (``ptq.pipeline.calib_run``): one prompt at a time, handing
over each prompt's contribution (a record) to be folded, in prompt order, into totals that can be checkpointed.
:class:`~ptq.calibration.observers.LinearInputObserver` and :class:`~ptq.calibration.recorder.ForwardInputRecorder`
are collectors.

:class:`InputCollector`: one statistic of the inputs of observed Linears (amax, samples, rows, Hessians), fed by
the forward pre-hooks of a :class:`HookHost` (:class:`~ptq.calibration.input_hooks.InputHooks`);
:class:`LayerCollector` is the base of those kept per layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from ptq.calibration.records import PromptRecord


@runtime_checkable
class Collector(Protocol):
    """What calibration runs prompt by prompt (``LinearInputObserver``, ``ForwardInputRecorder``)."""

    def begin_prompt(self, index: int) -> None: ...
    def end_prompt(self) -> Any: ...
    def fold(self, record: Any) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class HookHost(Protocol):
    """What an :class:`InputCollector` uses of its hook host (:class:`~ptq.calibration.input_hooks.InputHooks`)."""

    model: nn.Module
    names: list[str]  # the observed Linears
    modules: Mapping[str, nn.Module]  # the observed Linears still alive, by name
    num_steps: int | None
    prompt_mode: bool

    @property
    def step_label(self) -> int:
        """The current denoising step, or -1 without ``num_steps``."""
        ...

    def step_index_on(self, device: torch.device) -> torch.Tensor:
        """int64 ``[1]`` on ``device``: the current step's ``step_amax`` slot, updated in place."""
        ...

    def layer_device(self, name: str) -> torch.device:
        """Where layer ``name``'s statistics live."""
        ...

    def touch(self, name: str, x: torch.Tensor) -> None:
        """Register layer ``name`` at its first call."""
        ...

    def check_capturable(self, name: str) -> None:
        """Raise unless layer ``name`` may be observed inside a CUDA-graph capture."""
        ...


class InputCollector:
    """One statistic of the observed Linears' inputs (base class: every step does nothing).

    The host (:class:`~ptq.calibration.input_hooks.InputHooks`) calls :meth:`observe` from each observed Linear's
    forward pre-hook (only when :attr:`active`), :meth:`flush` when queued device work must be issued (step
    change, end of the model's forward, before reading), :meth:`attach` / :meth:`detach` with its hooks, and the
    prompt steps: :meth:`begin_prompt`, :meth:`end_prompt` (add the open prompt's part to the record, reset it),
    :meth:`fold` (add a record's part to the totals), :meth:`save` (the totals' part of the checkpoint state).
    Outside prompt mode the open state is the whole run's.
    """

    #: Whether it reads inputs at all (else the host never calls :meth:`observe`).
    active: bool = True
    #: Whether its per-call work may be recorded in a CUDA graph and replayed (device work only).
    graph_safe: bool = True

    def __init__(self, hooks: HookHost) -> None:
        self.hooks = hooks

    def observe(self, name: str, x: torch.Tensor, capturing: bool) -> None:
        """Take the statistic of layer ``name``'s input ``x [..., in]`` (``capturing``: inside a CUDA-graph
        capture, nothing executes)."""

    def flush(self) -> None:
        """Issue queued device work."""

    def attach(self) -> None:
        """The hooks were attached."""

    def detach(self) -> None:
        """The hooks were removed: forget the inputs seen last."""

    def begin_prompt(self, index: int) -> None:
        """Prompt ``index`` opens."""

    def end_prompt(self, rec: PromptRecord, called: list[str]) -> None:
        """Add the open prompt's part to ``rec`` (``called``: the layers called in it, in first-call order) and
        reset it."""

    def fold(self, rec: PromptRecord) -> None:
        """Add a prompt's part to the totals (called in prompt order)."""

    def save(self, state: dict[str, Any]) -> None:
        """Write the totals' part into ``state`` (``{"layers": {name: {}}, "hessians": {}}``, CPU tensors)."""

    def stats(self, name: str, totals: bool) -> dict[str, Any]:
        """Its fields of layer ``name``'s :class:`~ptq.calibration.records.LinearInputStats` (from the totals or
        from the open state)."""
        return {}

    def empty(self) -> bool:
        """Whether it holds no statistics at all (neither open nor folded)."""
        return True


S = TypeVar("S")


class LayerCollector(InputCollector, Generic[S]):
    """An :class:`InputCollector` kept per layer: ``open[name]`` (the open prompt's, or the whole run's outside
    prompt mode) and ``totals[name]`` (the folded prompts'); a record's and a checkpoint's part of it is one dict
    per layer (``rec.layers[name]``, ``state["layers"][name]``)."""

    def __init__(self, hooks: HookHost) -> None:
        super().__init__(hooks)
        self.open: dict[str, S] = {}
        self.totals: dict[str, S] = {}

    def record(self, name: str) -> dict[str, Any]:
        """Layer ``name``'s part of the open prompt's record; resets it."""
        raise NotImplementedError

    def fold_layer(self, name: str, part: dict[str, Any]) -> None:
        """Add layer ``name``'s part of a record to its totals."""
        raise NotImplementedError

    def total(self, name: str) -> dict[str, Any]:
        """Layer ``name``'s part of the checkpoint state (CPU)."""
        raise NotImplementedError

    def end_prompt(self, rec: PromptRecord, called: list[str]) -> None:
        for name in called:
            rec.layers[name].update(self.record(name))

    def fold(self, rec: PromptRecord) -> None:
        for name, part in rec.layers.items():
            self.fold_layer(name, part)

    def save(self, state: dict[str, Any]) -> None:
        for name, part in state["layers"].items():
            part.update(self.total(name))

    def empty(self) -> bool:
        return not self.open and not self.totals


__all__ = ["Collector", "HookHost", "InputCollector", "LayerCollector"]
