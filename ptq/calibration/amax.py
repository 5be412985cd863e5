"""Input amax of observed Linears: max |x| per input channel, over everything and per denoising step.

Everything stays on the model's device and is updated in place (``torch.maximum(..., out=)``), so a hook never
forces a host sync, and sibling layers that read the same input tensor (attention q/k/v) reuse one reduction. On
CUDA (with triton) the update is one fused kernel per input tensor (``triton_quant.amax_update_``: per-channel and
per-step max folded atomically into the accumulators of every sibling layer that reads it), and up to
``amax_batch`` consecutive input tensors share one launch; the step slot is read from a device tensor, so the
hooks can be captured in a CUDA graph (:mod:`ptq.calibration.cuda_graph`).

The GELU producer fusion (``fuse_producers``, :class:`GeluTaps`): a diffusers ``FeedForward``'s GELU (tanh) is
computed by a Triton kernel (bit-identical to torch's, verified once per GPU over every bf16 value) that also folds
``max |out|`` into the amax of the Linear reading its output (the feed-forward's second Linear), so that input is
not read again; that Linear's hook then only checks it received that very tensor. Off by default: the kernel is
slower than torch's GELU by more than the read it saves (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ptq.calibration import cuda_graph
from ptq.calibration.collector import HookHost, LayerCollector
from ptq.calibration.input_hooks import SameInput
from ptq.formats import triton_quant

#: Most bytes of queued inputs one batched amax launch reads (bounds the memory the queue keeps alive).
AMAX_BATCH_BYTES = 96 * 2**20
AMAX_BACKENDS = ("auto", "torch", "triton")


def check_backend(backend: str) -> None:
    if backend not in AMAX_BACKENDS:
        raise ValueError(f"amax_backend={backend!r}: expected 'auto', 'torch' or 'triton'")


@dataclass
class AmaxState:
    """One layer's maxima, on its input's device. channel: float32 ``[in]``. step: float32 ``[num_steps + 1]``
    (the last slot takes calls made outside ``0 <= step < num_steps``) or None without ``num_steps``."""

    channel: torch.Tensor
    step: torch.Tensor | None


@dataclass
class _Queued:
    """An input tensor awaiting its fused amax launch: its version when queued, the layers reading it, whether it
    was queued inside a CUDA-graph capture."""

    x: torch.Tensor
    version: int
    states: list[AmaxState]
    captured: bool


class AmaxCollector(LayerCollector[AmaxState]):
    """Per-layer input amax (module docstring). ``backend``: "auto" (the fused Triton kernel for CUDA inputs when
    triton is importable, else torch), "torch" or "triton"; all give identical statistics. ``batch``: input tensors
    per fused launch (1..``AMAX_BATCH_ITEMS``, at most ``AMAX_BATCH_BYTES``). ``fuse_producers``: tap diffusers
    FeedForward GELUs on the fused path."""

    def __init__(self, hooks: HookHost, backend: str, batch: int, fuse_producers: bool) -> None:
        check_backend(backend)
        if not 1 <= batch <= triton_quant.AMAX_BATCH_ITEMS:
            raise ValueError(f"amax_batch={batch}: expected 1..{triton_quant.AMAX_BATCH_ITEMS}")
        super().__init__(hooks)
        self.backend, self.batch = backend, batch
        self._fused_ok: dict[tuple[torch.device, torch.dtype], bool] = {}
        self._last = SameInput()  # per-channel max |x| of the torch path
        self._pending: list[_Queued] = []
        self._pending_bytes = 0
        self.taps = GeluTaps(self, enabled=fuse_producers and backend != "torch")

    def state(self, name: str, x: torch.Tensor) -> AmaxState:
        """Layer ``name``'s open maxima (zeros on ``x``'s device at its first call)."""
        st = self.open.get(name)
        if st is None:
            steps = self.hooks.num_steps
            st = self.open[name] = AmaxState(
                torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device),
                torch.zeros(steps + 1, dtype=torch.float32, device=x.device) if steps else None)
        return st

    def observe(self, name: str, x: torch.Tensor, capturing: bool) -> None:
        st = self.state(name, x)
        if self.taps.folded(name, x, capturing):
            return  # the GELU that produced x already folded max |x| into st (same pass)
        if self.fused(x):  # queued: one launch per input tensor (batched), channel and step maxima
            self._queue(x, st)
            return
        ch = self._reduce(x)
        torch.maximum(st.channel, ch, out=st.channel)
        if st.step is not None:
            st.step.scatter_reduce_(0, self.hooks.step_index_on(x.device), ch.amax().reshape(1), reduce="amax")

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """float32 ``[in]``: max |x| per input channel (computed once for sibling layers reading ``x``)."""
        ch = self._last.get(x)
        if ch is not None:
            return ch
        flat = x.reshape(-1, x.shape[-1])
        if flat.is_cuda:  # one fused pass: vector_norm with ord=inf does not materialise |x|
            ch = torch.linalg.vector_norm(flat, ord=float("inf"), dim=0).float()
        else:  # on CPU, |x| then a column max is 5-10x faster than vector_norm's strided reduction (same values)
            ch = flat.abs().amax(dim=0).float()
        self._last.put(x, ch)
        return ch

    def fused(self, x: torch.Tensor) -> bool:
        """Whether the one-kernel Triton amax update handles ``x`` (decided once per device and dtype)."""
        if self.backend == "torch":
            return False
        key = (x.device, x.dtype)
        ok = self._fused_ok.get(key)
        if ok is None:
            ok = self.backend == "triton" or (x.is_cuda and triton_quant.triton_available(x.device))
            ok = ok and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            self._fused_ok[key] = ok
        return ok

    def _queue(self, x: torch.Tensor, st: AmaxState) -> None:
        """Queue ``st`` for the amax launch of ``x``. Consecutive layers reading the same tensor share one entry;
        up to ``batch`` consecutive tensors share one launch, issued when the batch is full, the step changes,
        the model's forward returns, or the statistics are read (the queued tensors stay alive until then)."""
        q = self._pending
        if (q and q[-1].x is x and q[-1].version == x._version
                and len(q[-1].states) < triton_quant.AMAX_MAX_DESTINATIONS):
            q[-1].states.append(st)
            return
        nbytes = x.numel() * x.element_size()
        if q and (len(q) >= self.batch or self._pending_bytes + nbytes > AMAX_BATCH_BYTES
                  or q[0].x.dtype != x.dtype or q[0].x.device != x.device):
            self.flush()
        self._pending.append(_Queued(x, x._version, [st], cuda_graph.capturing()))
        self._pending_bytes += nbytes

    def flush(self) -> None:
        """Issue the queued amax launch."""
        q, self._pending, self._pending_bytes = self._pending, [], 0
        if not q:
            return
        if q[0].captured and not cuda_graph.capturing():
            return  # queued by a capture that failed: the tensors never held data
        for item in q:
            if item.x._version != item.version:
                raise RuntimeError("LinearInputObserver: a Linear's input was modified in place before its "
                                   "statistics were taken; use amax_backend='torch' for this model")
        has_step = q[0].states[0].step is not None
        step = self.hooks.step_index_on(q[0].x.device) if has_step else None
        if self.batch == 1:
            for item in q:
                first, more = item.states[0], item.states[1:]
                triton_quant.amax_update_(item.x, first.channel, first.step, -1 if step is None else step,
                                          more=[(s.channel, s.step) for s in more])
            return
        triton_quant.amax_update_batch_([(item.x, [(s.channel, s.step) for s in item.states]) for item in q], step)

    # -- hooks, records -------------------------------------------------------------------------------------
    def attach(self) -> None:
        self.taps.attach()

    def detach(self) -> None:
        self.taps.detach()
        self._last.clear()

    def record(self, name: str) -> dict[str, Any]:
        st = self.open[name]
        part = {"channel_amax": st.channel.to("cpu", copy=True),
                "step_amax": None if st.step is None else st.step.to("cpu", copy=True)}
        st.channel.zero_()  # in place: CUDA graphs update these very tensors
        if st.step is not None:
            st.step.zero_()
        return part

    def fold_layer(self, name: str, part: dict[str, Any]) -> None:
        dev = self.hooks.layer_device(name)
        total = self.totals.get(name)
        if total is None:  # the first contribution is copied (bit for bit), later ones folded in
            step = part["step_amax"]
            self.totals[name] = AmaxState(part["channel_amax"].to(dev, copy=True),
                                          None if step is None else step.to(dev, copy=True))
            return
        torch.maximum(total.channel, part["channel_amax"].to(dev), out=total.channel)
        if total.step is not None:
            torch.maximum(total.step, part["step_amax"].to(dev), out=total.step)

    def total(self, name: str) -> dict[str, Any]:
        t = self.totals[name]
        return {"channel_amax": t.channel.cpu(), "step_amax": None if t.step is None else t.step.cpu()}

    def stats(self, name: str, totals: bool) -> dict[str, Any]:
        st = (self.totals if totals else self.open)[name]
        return {"amax": st.channel.amax(), "channel_amax": st.channel.clone(),
                "step_amax": None if st.step is None else st.step[:-1].clone()}


class GeluTaps:
    """The tapped GELU modules of ``amax``'s model (patched while the hooks are attached, when ``enabled``) and the
    outputs they folded, awaiting their consumer's hook."""

    def __init__(self, amax: AmaxCollector, enabled: bool) -> None:
        self.amax, self.hooks, self.enabled = amax, amax.hooks, enabled
        self.patched: list[nn.Module] = []
        self._tapped: dict[str, tuple] = {}  # consumer -> (weakref to the GELU output, version, captured)

    def attach(self) -> None:
        if not self.enabled:
            return
        for gelu, consumer, between in self._find():
            gelu.gelu = functools.partial(self._gelu, gelu, consumer, between)
            self.patched.append(gelu)

    def detach(self) -> None:
        for gelu in self.patched:
            gelu.__dict__.pop("gelu", None)
        self.patched.clear()
        self._tapped.clear()

    def folded(self, name: str, x: torch.Tensor, capturing: bool) -> bool:
        """Whether the GELU that produced ``x`` already folded ``name``'s statistics (raises if ``x`` is not the
        tapped output)."""
        tap = self._tapped.pop(name, None)
        if tap is not None and tap[2] and not capturing:
            tap = None  # left by a capture that failed
        if tap is None:
            return False
        if tap[0]() is not x or tap[1] != x._version:
            raise RuntimeError(f"LinearInputObserver: {name!r} did not receive the GELU output its "
                               "statistics were taken from; use fuse_producers=False for this model")
        return True

    def _find(self) -> list[tuple[nn.Module, str, list[nn.Module]]]:
        """(GELU module, observed consumer Linear, modules between) of every diffusers-style ``FeedForward``
        (``net = [GELU(proj, approximate="tanh"), Dropout..., Linear]``)."""
        names = {id(m): n for n, m in self.hooks.modules.items()}
        taps = []
        for module in self.hooks.model.modules():
            net = getattr(module, "net", None)
            if not isinstance(net, nn.ModuleList) or len(net) < 2:
                continue
            first, last, between = net[0], net[-1], list(net[1:-1])
            if (isinstance(getattr(first, "proj", None), nn.Linear) and getattr(first, "approximate", None) == "tanh"
                    and callable(getattr(type(first), "gelu", None)) and id(last) in names
                    and all(isinstance(m, (nn.Dropout, nn.Identity)) for m in between)):
                taps.append((first, names[id(last)], between))
        return taps

    def _gelu(self, module: nn.Module, consumer: str, between: list[nn.Module], gate: torch.Tensor) -> torch.Tensor:
        """Replacement of a tapped GELU module's ``gelu``: torch's exact GELU (tanh) in one Triton pass that also
        folds ``max |out|`` into the consumer Linear's statistics, so its hook reads nothing (falls back to the
        module's own ``gelu`` where that does not apply)."""
        if not (gate.dtype == torch.bfloat16 and gate.is_cuda and self.amax.fused(gate)
                and getattr(module, "approximate", None) == "tanh"
                and all(isinstance(m, nn.Identity) or not m.training or m.p == 0 for m in between)
                and triton_quant.gelu_tanh_exact(gate.device)):
            return type(module).gelu(module, gate)
        capturing = cuda_graph.capturing()
        if capturing:
            self.hooks.check_capturable(consumer)
        self.hooks.touch(consumer, gate)
        st = self.amax.state(consumer, gate)
        step = self.hooks.step_index_on(gate.device) if st.step is not None else None
        out = triton_quant.gelu_tanh_amax(gate, st.channel, st.step, step)
        self._tapped[consumer] = (weakref.ref(out), out._version, capturing)
        return out


__all__ = ["AMAX_BACKENDS", "AMAX_BATCH_BYTES", "AmaxCollector", "AmaxState", "GeluTaps", "check_backend"]
