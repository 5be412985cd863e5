"""Run a module's forward as CUDA-graph replays: no host work per kernel, hooks included.

A transformer forward at small token counts is host-bound: each kernel launch costs microseconds of Python and
driver time, so hundreds of per-Linear observer kernels add more to the eager forward than the GPU spends on them. Captured once in a
CUDA graph, every later forward (the same input shapes: each denoising step, cond and uncond) is one replay.

:class:`CudaGraphForward` wraps a module call. For each new input signature (tensor shapes, dtypes, devices,
strides; other arguments by value) the first call runs eagerly (its output is returned and its hooks do their
normal work), then the forward is captured once (nothing executes during capture); later calls copy the tensor
inputs into the graph's static buffers, replay, and return copies of the outputs.

Hooks that keep host-side bookkeeping (call counters) check :func:`capturing` and register it with
:func:`on_replay` instead of doing it, so it runs once per replay. Device-side state that changes between
forwards (a denoising-step index) must live in a device tensor the kernels read. Hooks attached or removed after
a capture are not seen by the graph: use one ``CudaGraphForward`` per phase (calibration, evaluation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

_ACTIVE: list[list[Callable[[], None]]] = []  # replay actions of the capture in progress (a stack)


def capturing() -> bool:
    """True while :class:`CudaGraphForward` captures a forward (kernels are recorded, not run)."""
    return bool(_ACTIVE)


def on_replay(fn: Callable[[], None]) -> None:
    """Register host-side work that must run after every replay of the graph being captured."""
    if not _ACTIVE:
        raise RuntimeError("on_replay() called outside a CudaGraphForward capture")
    _ACTIVE[-1].append(fn)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[Any]  # flattened (args, kwargs); tensors are the static input buffers
    output: Any
    actions: list[Callable[[], None]] = field(default_factory=list)


def _signature(leaves: list[Any]) -> tuple | None:
    """Hashable description of the flattened inputs, or None if they cannot be graphed (no CUDA tensor, a CPU
    tensor among them, or an unhashable non-tensor argument)."""
    sig = []
    cuda = False
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if not leaf.is_cuda:
                return None
            cuda = True
            sig.append((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None
            sig.append(("value", type(leaf), leaf))
    return tuple(sig) if cuda else None


class CudaGraphForward:
    """Call ``module(*args, **kwargs)`` through CUDA graphs, one per input signature (see the module docstring).

    ``enabled=False`` (or CPU inputs, grad mode, a failed capture) calls the module eagerly. ``max_graphs``:
    signatures captured at most (later new ones run eagerly). All graphs share one memory pool; it holds about one
    forward's activations until :meth:`release` (or the object is freed). Outputs are fresh tensors (clones).
    """

    def __init__(self, module: nn.Module, *, enabled: bool = True, max_graphs: int = 4) -> None:
        self.module = module
        self.enabled = enabled
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, _Captured] = {}
        self._failed: set[tuple] = set()
        self._pool: Any = None
        self.replays = 0
        self.eager_calls = 0

    @property
    def captured(self) -> int:
        """Number of graphs captured so far."""
        return len(self._graphs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled or torch.is_grad_enabled():
            return self._eager(args, kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        sig = _signature(leaves)
        if sig is None:
            return self._eager(args, kwargs)
        key = (str(spec), sig)
        entry = self._graphs.get(key)
        if entry is None:
            out = self._eager(args, kwargs)
            if key not in self._failed and len(self._graphs) < self.max_graphs:
                self._capture(key, leaves, spec)
            return out
        for static, new in zip(entry.inputs, leaves):
            if isinstance(static, torch.Tensor) and static.data_ptr() != new.data_ptr():
                static.copy_(new)
        entry.graph.replay()
        for fn in entry.actions:
            fn()
        self.replays += 1
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, entry.output)

    def _eager(self, args: tuple, kwargs: dict) -> Any:
        self.eager_calls += 1
        return self.module(*args, **kwargs)

    def _capture(self, key: tuple, leaves: list[Any], spec: Any) -> None:
        static = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        args, kwargs = pytree.tree_unflatten(static, spec)
        graph = torch.cuda.CUDAGraph()
        actions: list[Callable[[], None]] = []
        _ACTIVE.append(actions)
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.module(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - an uncapturable forward still runs, eagerly
            self._failed.add(key)
            log.warning("CUDA-graph capture of %s failed, running it eagerly: %s", type(self.module).__name__,
                        repr(exc)[:300])
            return
        finally:
            _ACTIVE.pop()
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[key] = _Captured(graph, static, out, actions)

    def release(self) -> None:
        """Drop every captured graph and its memory pool."""
        self._graphs.clear()
        self._pool = None
