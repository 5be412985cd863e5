"""The hook host of :class:`~ptq.calibration.observers.LinearInputObserver`: forward pre-hooks on the named
``nn.Linear`` modules of a model that feed each input to :class:`~ptq.calibration.collector.InputCollector` s.

The host owns what every statistic shares: the hooks (and a forward hook on the model, after which queued device
work is issued), the current denoising step (also in an int64 device tensor per device, which kernels read so that
hooks can be captured in a CUDA graph and replayed for every step), the calls and tokens of each layer, whether the
collectors may be captured in a CUDA graph, and the prompt bookkeeping (open prompt, folded prompts, records,
checkpoint state, :class:`~ptq.calibration.records.LinearInputStats`). :class:`SameInput` lets a collector reuse
what it computed for the sibling layers that read the same input tensor (attention q/k/v).
"""

from __future__ import annotations

import fnmatch
import functools
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ptq.calibration import cuda_graph
from ptq.calibration.collector import InputCollector
from ptq.calibration.records import LinearInputStats, PromptRecord


def select_linears(model: nn.Module, include: Iterable[str] = ("*",), exclude: Iterable[str] = ()) -> list[str]:
    """Names of ``nn.Linear`` modules matching any ``include`` and no ``exclude`` fnmatch pattern, in model order."""
    inc, exc = list(include), list(exclude)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in inc) and not any(fnmatch.fnmatchcase(name, p) for p in exc):
            names.append(name)
    return names


class SameInput:
    """The value computed from the input tensor seen last, for sibling layers that read the same tensor object
    at the same version (a weak reference: a dead tensor's memory may be reused, so addresses are not enough)."""

    def __init__(self) -> None:
        self._key: tuple[weakref.ref, int] | None = None
        self._value: Any = None

    def get(self, x: torch.Tensor) -> Any:
        """The value stored for ``x``, or None if ``x`` is not the tensor seen last (or was modified since)."""
        key = self._key
        if key is not None and key[0]() is x and key[1] == x._version:
            return self._value
        return None

    def put(self, x: torch.Tensor, value: Any) -> None:
        self._key, self._value = (weakref.ref(x), x._version), value

    def clear(self) -> None:
        self._key = self._value = None


@dataclass
class LayerCalls:
    """Forwards of one layer: calls, and tokens (rows of its input ``x [..., in]``: ``numel // in``)."""

    calls: int = 0
    tokens: int = 0

    def add(self, tokens: int) -> None:
        self.calls += 1
        self.tokens += tokens


class InputHooks:
    """Forward pre-hooks on the Linears ``names`` of ``model`` feeding the collectors given to :meth:`use` (module
    docstring). ``num_steps``: the denoising steps with a ``step_amax`` slot (None: no per-step statistics)."""

    def __init__(self, model: nn.Module, names: Iterable[str] | None, num_steps: int | None) -> None:
        self.model = model
        modules = dict(model.named_modules())
        self.names = list(names) if names is not None else select_linears(model)
        for n in self.names:
            if not isinstance(modules.get(n), nn.Linear):
                raise KeyError(f"{n!r} is not an nn.Linear of the model")
        # weak: a layer replaced after calibration (quantize_) is freed even while the observer lives on
        self.modules: weakref.WeakValueDictionary[str, nn.Module] = weakref.WeakValueDictionary(
            {n: modules[n] for n in self.names})
        self.num_steps = num_steps
        self.collectors: list[InputCollector] = []
        self._observing: list[InputCollector] = []
        self._step = 0
        self._step_index: dict[torch.device, torch.Tensor] = {}  # int64 [1] per device: the slot kernels update
        self.calls: dict[str, LayerCalls] = {}  # open (the prompt's, or the whole run's), in first-call order
        self.total_calls: dict[str, LayerCalls] = {}  # folded prompts
        self._devices: dict[str, torch.device] = {}  # of each layer's input at its first call
        self.prompt: int | None = None  # the open prompt
        self.prompt_mode = False
        self.folded: list[int] = []  # prompts folded into the totals, in order
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._root_handle: torch.utils.hooks.RemovableHandle | None = None

    def use(self, collectors: Iterable[InputCollector]) -> None:
        """The collectors, in the order they observe each input."""
        self.collectors = list(collectors)
        self._observing = [c for c in self.collectors if c.active]

    # -- denoising step -------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self.flush()  # queued launches belong to the previous step
        self._step = int(value)
        for t in self._step_index.values():
            t.fill_(self._slot())

    @property
    def step_label(self) -> int:
        """The step recorded with host-side samples: the step, or -1 without ``num_steps``."""
        return self._step if self.num_steps else -1

    def _slot(self) -> int:
        n = self.num_steps or 0
        return self._step if 0 <= self._step < n else n

    def step_index_on(self, device: torch.device) -> torch.Tensor:
        """int64 ``[1]`` on ``device``: the ``step_amax`` slot of the current step (``num_steps`` outside
        ``[0, num_steps)``), updated in place when the step changes."""
        t = self._step_index.get(device)
        if t is None:
            t = self._step_index[device] = torch.full((1,), self._slot(), dtype=torch.int64, device=device)
        return t

    # -- hooks ----------------------------------------------------------------------------------------------
    def touch(self, name: str, x: torch.Tensor) -> None:
        """Register layer ``name`` at its first call (``x``: its input, or the tensor it will read)."""
        if name not in self.calls:
            self.calls[name] = LayerCalls()
            self._devices[name] = x.device

    def _hook(self, name: str):
        @torch.no_grad()
        def hook(module: nn.Module, args: tuple) -> None:
            # not detached: sibling layers (q/k/v) are recognised by the identity of this very object
            # (a detach() would make a new one per hook); the hook runs under no_grad
            x = args[0]
            capturing = cuda_graph.capturing()
            if capturing:  # refuse before queuing anything: a failed capture must leave no trace
                self.check_capturable(name)
            self.touch(name, x)
            for c in self._observing:
                c.observe(name, x, capturing)
            calls, tokens = self.calls[name], x.numel() // x.shape[-1]
            if capturing:  # nothing ran yet: count at every replay instead
                cuda_graph.on_replay(functools.partial(calls.add, tokens))
            else:
                calls.add(tokens)

        return hook

    def flush(self, *_: object) -> None:
        """Issue the collectors' queued device work (also the model's forward hook, so a CUDA-graph capture
        records it)."""
        for c in self.collectors:
            c.flush()

    @property
    def graph_safe(self) -> bool:
        """Whether every collector's per-call work may be replayed from a CUDA graph."""
        return all(c.graph_safe for c in self.collectors)

    def check_capturable(self, name: str) -> None:
        """Raise unless layer ``name`` may be observed inside a CUDA-graph capture."""
        if not self.graph_safe:
            raise RuntimeError("LinearInputObserver: samples_per_call > 0 or Hessians cannot be replayed from a CUDA "
                               "graph (sample positions are drawn on the host); run these forwards eagerly")
        if name not in self.calls:
            raise RuntimeError(f"LinearInputObserver: {name!r} was first called inside a CUDA-graph capture; run the "
                               "forward eagerly once first (CudaGraphForward does)")

    def attach(self) -> None:
        if self._handles:
            return
        for name in self.names:
            module = self.modules.get(name)
            if module is None:
                raise RuntimeError(f"LinearInputObserver: layer {name!r} no longer exists (replaced after the "
                                   "observer was created); create a new observer for the current model")
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        # the last queued amax launch belongs to this forward (and to a CUDA graph capturing it)
        self._root_handle = self.model.register_forward_hook(self.flush)
        for c in self.collectors:
            c.attach()

    def detach(self) -> None:
        self.flush()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._root_handle is not None:
            self._root_handle.remove()
            self._root_handle = None
        for c in self.collectors:
            c.detach()

    def layer_device(self, name: str) -> torch.device:
        """Where layer ``name``'s statistics live: its input's device, else its weight's (CPU if it is gone)."""
        device = self._devices.get(name)
        if device is not None:
            return device
        module = self.modules.get(name)
        return module.weight.device if module is not None else torch.device("cpu")

    # -- reading --------------------------------------------------------------------------------------------
    def _read(self, what: str) -> dict[str, LayerCalls]:
        """The calls per layer that statistics are read from (the totals in prompt mode), queued work done."""
        self.flush()
        if self.prompt_mode:
            self.check_closed(what)
            return self.total_calls
        return self.calls

    def stats(self) -> dict[str, LinearInputStats]:
        """Statistics per layer called (in prompt mode: over the folded prompts), in first-call order."""
        out = {}
        for name, calls in self._read("stats").items():
            fields: dict[str, Any] = {"calls": calls.calls, "tokens": calls.tokens}
            for c in self.collectors:
                fields.update(c.stats(name, self.prompt_mode))
            out[name] = LinearInputStats(**fields)
        return out

    def tokens(self) -> dict[str, int]:
        """Tokens per layer called (in prompt mode: over the folded prompts)."""
        return {n: c.tokens for n, c in self._read("hessians").items()}

    # -- prompts --------------------------------------------------------------------------------------------
    def check_closed(self, what: str) -> None:
        if self.prompt is not None:
            raise RuntimeError(f"LinearInputObserver.{what}: prompt {self.prompt} is still open (end_prompt first)")

    def begin_prompt(self, index: int) -> None:
        self.flush()
        self.check_closed("begin_prompt")
        if not self.prompt_mode and any(c.calls for c in self.calls.values()):
            raise RuntimeError("LinearInputObserver.begin_prompt: forwards were observed outside prompts")
        self.prompt_mode = True
        self.prompt = int(index)
        for c in self.collectors:
            c.begin_prompt(index)

    def end_prompt(self) -> PromptRecord:
        self.flush()
        if self.prompt is None:
            raise RuntimeError("LinearInputObserver.end_prompt: no prompt is open")
        rec = PromptRecord(self.prompt)
        called = [n for n, c in self.calls.items() if c.calls]
        rec.layers = {n: {} for n in called}
        for c in self.collectors:
            c.end_prompt(rec, called)
        for n in called:
            calls = self.calls[n]  # reset in place: CUDA-graph replays count into this object
            rec.layers[n].update(calls=calls.calls, tokens=calls.tokens)
            calls.calls = calls.tokens = 0
        self.prompt = None
        return rec

    def fold(self, rec: PromptRecord) -> None:
        self.check_closed("fold")
        self.prompt_mode = True
        for c in self.collectors:
            c.fold(rec)
        for name, part in rec.layers.items():
            total = self.total_calls.setdefault(name, LayerCalls())
            total.calls += part["calls"]
            total.tokens += part["tokens"]
        self.folded.append(rec.index)

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        self.check_closed("state_dict")
        state: dict[str, Any] = {"layers": {n: {} for n in self.total_calls}, "hessians": {}}
        for c in self.collectors:
            c.save(state)
        for name, part in state["layers"].items():
            part.update(calls=self.total_calls[name].calls, tokens=self.total_calls[name].tokens)
        state["folded"] = list(self.folded)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.calls or self.total_calls or not all(c.empty() for c in self.collectors):
            raise RuntimeError("LinearInputObserver.load_state_dict: the observer already holds statistics")
        rec = PromptRecord(-1)
        rec.layers = {n: dict(lr) for n, lr in state["layers"].items()}
        rec.hessians = {k: h["sum"] for k, h in state["hessians"].items()}
        rec.groups = {k: h["members"] for k, h in state["hessians"].items()}
        self.fold(rec)
        self.folded = list(state["folded"])


__all__ = ["InputHooks", "LayerCalls", "SameInput", "select_linears"]
