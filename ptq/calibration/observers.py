"""Activation statistics of ``nn.Linear`` inputs, collected by forward pre-hooks.

Everything stays on the model's device and is updated in place (``torch.maximum(..., out=)``), so a hook never
forces a host sync. Sibling layers that read the same input tensor (e.g. attention q/k/v) reuse one reduction.
On CUDA (with triton) the amax path is one fused kernel per input tensor (``triton_quant.amax_update_``: per-channel
and per-step max folded atomically into the accumulators of every sibling layer that reads it), which keeps the
hooks' cost near the bytes they read. The current denoising step lives in a device tensor the kernels read, so the
hooks can be captured in a CUDA graph (:mod:`ptq.calibration.cuda_graph`) and replayed for every step.

Prompts (``begin_prompt(i)`` / ``end_prompt()`` / ``fold(record)``): a calibration run that announces its prompts
gets statistics that do not depend on how the prompts were split between processes or runs. Each prompt is
observed on its own (random samples drawn from a generator seeded by ``(seed, prompt)``; Hessians summed per
prompt) and ``end_prompt`` returns its contribution (:class:`PromptRecord`); ``fold`` adds records to the totals
in prompt order (amax: max; calls, tokens: sums; samples: appended; Hessians: ``total += prompt sum``).
``state_dict`` / ``load_state_dict`` save and restore the totals (resumable calibration).
"""

from __future__ import annotations

import fnmatch
import functools
import random
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ptq.calibration import cuda_graph
from ptq.calibration.hessian_store import HessianSum, StreamedHostAdder, resolve_storage
from ptq.formats import triton_quant
from ptq.formats.fp8 import divide_exact


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
class _LayerState:
    channel_amax: torch.Tensor
    step_amax: torch.Tensor | None  # [num_steps + 1]: the last slot takes calls made outside 0 <= step < num_steps
    samples: list[torch.Tensor] = field(default_factory=list)
    sample_steps: list[tuple[int, int]] = field(default_factory=list)  # (step, number of samples) per call
    rows: list[torch.Tensor] = field(default_factory=list)
    row_steps: list[tuple[int, int]] = field(default_factory=list)  # (step, number of rows) per call
    sample_block: int = 1
    calls: int = 0
    tokens: int = 0


@dataclass
class _Totals:
    """One layer's statistics over the folded prompts (prompt mode): maxima on the layer's device, samples on CPU
    (one tensor per prompt, prompt order)."""

    channel_amax: torch.Tensor
    step_amax: torch.Tensor | None
    samples: list[torch.Tensor] = field(default_factory=list)
    sample_steps: list[tuple[int, int]] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)
    row_steps: list[tuple[int, int]] = field(default_factory=list)
    sample_block: int = 1
    calls: int = 0
    tokens: int = 0


@dataclass
class _HessianGroup:
    """Layers whose input was the same tensor at their first call (q/k/v) and share one ``X^T X`` sum: ``current``
    receives the products (the open prompt's sum in prompt mode, else the whole sum)."""

    members: list[str]
    current: HessianSum
    dirty: bool = False


@dataclass
class PromptRecord:
    """One calibration prompt's contribution, as :meth:`LinearInputObserver.end_prompt` returns it.

    layers: per layer name ``channel_amax`` float32 ``[in]``, ``step_amax`` float32 ``[num_steps + 1]`` or None
    (CPU copies), ``calls``, ``tokens``, ``samples`` float32 ``[k]`` (CPU) or None, ``sample_steps`` ``[(step,
    count)]``, ``sample_block``, ``rows`` ``[n, in]`` (CPU) or None, ``row_steps`` ``[(step, count)]``. hessians: per Hessian group (by its first layer's name) the prompt's ``sum X^T X``
    float32 ``[in, in]`` (the observer's own buffer: valid until its next ``begin_prompt``); groups: its members.
    """

    index: int
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)


#: Most bytes of queued inputs one batched amax launch reads (bounds the memory the queue keeps alive).
AMAX_BATCH_BYTES = 96 * 2**20


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


class LinearInputObserver:
    """Collect per-layer input amax (scalar, per channel, per step) for the named Linears of ``model``.

    Use as a context manager around the calibration forwards; set ``observer.step`` before each denoising step
    when ``num_steps`` is given. ``samples_per_call > 0`` also keeps that many random |x| values per call.
    ``amax_backend``: "auto" (default: the fused Triton kernel for CUDA inputs when triton is importable, else
    torch), "torch" or "triton" (one fused kernel per call); all give identical statistics.
    ``sample_block``: the samples come in aligned runs of this many consecutive elements along in_features
    (16 = NVFP4's runtime blocks; layers whose in_features is not a multiple of it sample single elements).

    ``amax_batch``: the fused path reads up to this many consecutive input tensors (up to
    ``AMAX_BATCH_BYTES`` in all) in one launch; 1 = one launch per tensor.
    ``fuse_producers``: on the fused path, a diffusers ``FeedForward``'s GELU (tanh) is computed by a Triton kernel
    (bit-identical to torch's, verified once per GPU over every bf16 value) that also folds the statistics of the
    Linear reading its output (the feed-forward's second Linear), so that input is not read again. Off by default:
    the kernel is slower than torch's GELU by more than the read it saves (docs/benchmarks.md).

    ``hessian``: True (every observed layer) or a collection of layer names: also accumulate ``H = sum X^T X``
    (float32 ``[in, in]``) for GPTQ; read with :meth:`hessians`. Layers that read the same input tensor (e.g.
    attention q/k/v) share one ``X^T X`` product per call and, with ``share_hessians`` (default), one sum (the
    tensors :meth:`hessians` returns for them are one object). ``hessian_storage``: "device" (the model's device,
    updated in place, no host sync), "host" (pinned host memory streamed through the GPU per product;
    :mod:`ptq.calibration.hessian_store`) or "auto". Memory: ``4 * in_features**2`` bytes per sum (37.7 MB for in=3072, 822 MB for in=14336; twice that
    in prompt mode: the totals and the open prompt's sums).

    ``rows_per_call > 0``: also keep that many whole input rows (tokens) per call, evenly strided with a random
    offset, as CPU copies in the input dtype (``LinearInputStats.rows``; smoothing searches). Layers reading the
    same input tensor share one copy.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str] | None = None,
        *,
        num_steps: int | None = None,
        samples_per_call: int = 0,
        seed: int = 0,
        amax_backend: str = "auto",
        sample_block: int = 1,
        hessian: bool | Iterable[str] = False,
        amax_batch: int = triton_quant.AMAX_BATCH_ITEMS,
        fuse_producers: bool = False,
        hessian_storage: str = "device",
        share_hessians: bool = True,
        rows_per_call: int = 0,
    ) -> None:
        if amax_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"amax_backend={amax_backend!r}: expected 'auto', 'torch' or 'triton'")
        self.amax_backend = amax_backend
        self._fused_ok: dict[tuple[torch.device, torch.dtype], bool] = {}
        self.model = model
        modules = dict(model.named_modules())
        self.names = list(names) if names is not None else select_linears(model)
        for n in self.names:
            if not isinstance(modules.get(n), nn.Linear):
                raise KeyError(f"{n!r} is not an nn.Linear of the model")
        # weak: a layer replaced after calibration (quantize_) is freed even while the observer lives on
        self._modules: weakref.WeakValueDictionary[str, nn.Module] = weakref.WeakValueDictionary(
            {n: modules[n] for n in self.names})
        self.num_steps = num_steps
        self.samples_per_call = samples_per_call
        if rows_per_call < 0:
            raise ValueError(f"rows_per_call={rows_per_call}: expected >= 0")
        self.rows_per_call = rows_per_call
        self._last_rows: tuple | None = None  # (weakref to input, version, rows): shared by sibling layers
        self._row_rng = random.Random(seed + 1)  # its own stream: the |x| samples do not change with rows_per_call
        if sample_block < 1:
            raise ValueError(f"sample_block={sample_block}: expected >= 1")
        self.sample_block = sample_block
        self._hessian_names = set(self.names) if hessian is True else set(hessian or ())
        unknown = self._hessian_names - set(self.names)
        if unknown:
            raise KeyError(f"hessian requested for layers that are not observed: {sorted(unknown)}")
        self._last_xtx: torch.Tensor | None = None
        self._xtx_key: tuple | None = None
        self.share_hessians = share_hessians
        self._storage = resolve_storage(hessian_storage, next(iter(modules[n].weight.device for n in self.names),
                                                              torch.device("cpu")),
                                        sum(4 * modules[n].in_features ** 2 for n in self._hessian_names))
        self._adder: StreamedHostAdder | None = None
        self._hgroups: dict[str, _HessianGroup] = {}  # by the group's first layer
        self._hgroup_of: dict[str, str] = {}
        self._last_xtx_leader: str | None = None
        self.seed = seed
        self._prompt: int | None = None  # the open prompt (prompt mode)
        self._prompt_mode = False
        self._totals: dict[str, _Totals] = {}
        self._htotals: dict[str, HessianSum] = {}
        self._hmembers: dict[str, list[str]] = {}
        self.folded: list[int] = []  # prompts folded into the totals, in order
        self._step = 0
        self._step_index: dict[torch.device, torch.Tensor] = {}  # int64 [1] per device: the slot kernels update
        # fused path: [x, version, [states], queued while capturing] per input tensor awaiting its amax launch
        if not 1 <= amax_batch <= triton_quant.AMAX_BATCH_ITEMS:
            raise ValueError(f"amax_batch={amax_batch}: expected 1..{triton_quant.AMAX_BATCH_ITEMS}")
        self.amax_batch = amax_batch
        self._pending: list[list] = []
        self._pending_bytes = 0
        self.fuse_producers = fuse_producers
        self._patched: list[nn.Module] = []
        self._tapped: dict[str, tuple] = {}  # consumer -> (weakref to the GELU output, version, captured)
        self._root_handle: torch.utils.hooks.RemovableHandle | None = None
        self._rng = random.Random(seed)
        self._state: dict[str, _LayerState] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._last_key: tuple | None = None
        self._last_channel: torch.Tensor | None = None

    # -- denoising step -------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """The denoising step the next forwards belong to (``step_amax`` slot); outside ``[0, num_steps)`` only the
        per-channel and overall maxima are updated."""
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._flush()  # queued launches belong to the previous step
        self._step = int(value)
        for t in self._step_index.values():
            t.fill_(self._slot())

    def _slot(self) -> int:
        n = self.num_steps or 0
        return self._step if 0 <= self._step < n else n

    def _step_index_on(self, device: torch.device) -> torch.Tensor:
        t = self._step_index.get(device)
        if t is None:
            t = self._step_index[device] = torch.full((1,), self._slot(), dtype=torch.int64, device=device)
        return t

    # -- hook -----------------------------------------------------------------------------------------------
    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        # identity via a weak reference: a dead tensor's memory may be reused, so addresses are not enough
        last = self._last_key[0]() if self._last_key is not None else None
        if last is x and self._last_key[1] == x._version and self._last_channel is not None:
            return self._last_channel
        flat = x.reshape(-1, x.shape[-1])
        # one fused pass: max |x| per input channel (vector_norm with ord=inf does not materialise |x|)
        ch = torch.linalg.vector_norm(flat, ord=float("inf"), dim=0).float()
        self._last_key, self._last_channel = (weakref.ref(x), x._version), ch
        return ch

    def _fused_update(self, x: torch.Tensor, st: _LayerState) -> None:
        """Queue ``st`` for the amax launch of ``x``. Consecutive layers reading the same tensor share one entry;
        up to ``amax_batch`` consecutive tensors share one launch, issued when the batch is full, the step changes,
        the model's forward returns, or the statistics are read (the queued tensors stay alive until then)."""
        q = self._pending
        if (q and q[-1][0] is x and q[-1][1] == x._version
                and len(q[-1][2]) < triton_quant.AMAX_MAX_DESTINATIONS):
            q[-1][2].append(st)
            return
        nbytes = x.numel() * x.element_size()
        if q and (len(q) >= self.amax_batch or self._pending_bytes + nbytes > AMAX_BATCH_BYTES
                  or q[0][0].dtype != x.dtype or q[0][0].device != x.device):
            self._flush()
        self._pending.append([x, x._version, [st], cuda_graph.capturing()])
        self._pending_bytes += nbytes

    def _flush(self, *_: object) -> None:
        """Issue the queued amax launch (also the model's forward hook, so a CUDA-graph capture records it)."""
        q, self._pending, self._pending_bytes = self._pending, [], 0
        if not q:
            return
        if q[0][3] and not cuda_graph.capturing():
            return  # queued by a capture that failed: the tensors never held data
        for x, version, _, _ in q:
            if x._version != version:
                raise RuntimeError("LinearInputObserver: a Linear's input was modified in place before its "
                                   "statistics were taken; use amax_backend='torch' for this model")
        has_step = q[0][2][0].step_amax is not None
        step = self._step_index_on(q[0][0].device) if has_step else None
        if self.amax_batch == 1:
            for x, _, states, _ in q:
                triton_quant.amax_update_(x, states[0].channel_amax, states[0].step_amax,
                                          -1 if step is None else step,
                                          more=[(s.channel_amax, s.step_amax) for s in states[1:]])
            return
        triton_quant.amax_update_batch_([(x, [(s.channel_amax, s.step_amax) for s in states])
                                         for x, _, states, _ in q], step)

    def _count(self, st: _LayerState, tokens: int) -> None:
        st.calls += 1
        st.tokens += tokens

    def _xtx(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(``X^T X`` float32 ``[in, in]`` of ``x``, whether it was computed now): computed once for consecutive
        layers reading the same tensor."""
        last = self._xtx_key[0]() if self._xtx_key is not None else None
        if last is x and self._xtx_key[1] == x._version and self._last_xtx is not None:
            return self._last_xtx, False
        flat = x.reshape(-1, x.shape[-1]).float()
        self._last_xtx = flat.t() @ flat
        self._xtx_key = (weakref.ref(x), x._version)
        return self._last_xtx, True

    def _host_adder(self, device: torch.device) -> StreamedHostAdder | None:
        """The side-stream adder of host-stored sums of CUDA products (None otherwise)."""
        if self._storage == "host" and device.type == "cuda" and self._adder is None:
            self._adder = StreamedHostAdder(device)
        return self._adder

    def _add_hessian(self, name: str, x: torch.Tensor) -> None:
        """Add ``X^T X`` of ``x`` to ``name``'s Hessian group (created at the layer's first call: the group of the
        layer that computed the same product just before, with ``share_hessians``)."""
        xtx, fresh = self._xtx(x)
        leader = self._hgroup_of.get(name)
        if leader is None:
            share = self.share_hessians and not fresh and self._last_xtx_leader is not None
            leader = self._hgroup_of[name] = self._last_xtx_leader if share else name
            if leader == name:
                self._hgroups[name] = _HessianGroup([name], HessianSum(xtx.shape, xtx.device, self._storage,
                                                                       self._host_adder(xtx.device)))
            else:
                self._hgroups[leader].members.append(name)
        group = self._hgroups[leader]
        if not self.share_hessians or (fresh and leader == name):
            group.current.add(xtx)
            group.dirty = True
            self._last_xtx_leader = leader
        elif fresh or self._last_xtx_leader != leader:
            raise RuntimeError(f"LinearInputObserver: {name!r} shares its Hessian with {leader!r} (the same input "
                               "tensor at its first call) but was now called with another input; use "
                               "share_hessians=False for this model")

    def _sample(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """About ``samples_per_call`` |x| values (float32 1-D), in aligned runs of ``sample_block`` when possible."""
        block = self.sample_block if x.shape[-1] % self.sample_block == 0 else 1
        flat = x.reshape(-1, block)
        n = flat.shape[0]
        k = min(max(self.samples_per_call // block, 1), n)
        stride = max(n // k, 1)
        offset = self._rng.randrange(stride)
        return flat[offset::stride][:k].abs().float().reshape(-1), block

    def _fused(self, x: torch.Tensor) -> bool:
        """Whether the one-kernel Triton amax update handles ``x`` (decided once per device and dtype)."""
        if self.amax_backend == "torch":
            return False
        key = (x.device, x.dtype)
        ok = self._fused_ok.get(key)
        if ok is None:
            ok = self.amax_backend == "triton" or (x.is_cuda and triton_quant.triton_available(x.device))
            ok = ok and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            self._fused_ok[key] = ok
        return ok

    @property
    def graph_safe(self) -> bool:
        """Whether forwards observed by this observer may be replayed from a CUDA graph: amax statistics only (random
        samples are drawn on the host per call; Hessians are left to eager runs)."""
        return self.samples_per_call == 0 and self.rows_per_call == 0 and not self._hessian_names

    def _check_capturable(self, name: str, st: _LayerState | None) -> None:
        if not self.graph_safe:
            raise RuntimeError("LinearInputObserver: samples_per_call > 0 or Hessians cannot be replayed from a CUDA "
                               "graph (sample positions are drawn on the host); run these forwards eagerly")
        if st is None:
            raise RuntimeError(f"LinearInputObserver: {name!r} was first called inside a CUDA-graph capture; run the "
                               "forward eagerly once first (CudaGraphForward does)")

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """About ``rows_per_call`` rows of ``x`` as ``[k, in]`` on the CPU (evenly strided, random offset), the same
        tensor for consecutive layers reading the same input."""
        last = self._last_rows
        if last is not None and last[0]() is x and last[1] == x._version:
            return last[2]
        flat = x.reshape(-1, x.shape[-1])
        n = flat.shape[0]
        k = min(self.rows_per_call, n)
        stride = max(n // k, 1)
        offset = self._row_rng.randrange(stride)
        rows = flat[offset::stride][:k].detach().to("cpu", copy=True)
        self._last_rows = (weakref.ref(x), x._version, rows)
        return rows

    def _new_state(self, name: str, x: torch.Tensor) -> _LayerState:
        st = self._state[name] = _LayerState(
            channel_amax=torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device),
            step_amax=(torch.zeros(self.num_steps + 1, dtype=torch.float32, device=x.device)
                       if self.num_steps else None),
        )
        return st

    def _find_gelu_taps(self) -> list[tuple[nn.Module, str, list[nn.Module]]]:
        """(GELU module, observed consumer Linear, modules between) of every diffusers-style ``FeedForward``
        (``net = [GELU(proj, approximate="tanh"), Dropout..., Linear]``)."""
        names = {id(m): n for n, m in self._modules.items()}
        taps = []
        for module in self.model.modules():
            net = getattr(module, "net", None)
            if not isinstance(net, nn.ModuleList) or len(net) < 2:
                continue
            first, last, between = net[0], net[-1], list(net[1:-1])
            if (isinstance(getattr(first, "proj", None), nn.Linear) and getattr(first, "approximate", None) == "tanh"
                    and callable(getattr(type(first), "gelu", None)) and id(last) in names
                    and all(isinstance(m, (nn.Dropout, nn.Identity)) for m in between)):
                taps.append((first, names[id(last)], between))
        return taps

    def _tapped_gelu(self, module: nn.Module, consumer: str, between: list[nn.Module],
                     gate: torch.Tensor) -> torch.Tensor:
        """Replacement of a tapped GELU module's ``gelu``: torch's exact GELU (tanh) in one Triton pass that also
        folds ``max |out|`` into the consumer Linear's statistics, so its hook reads nothing (falls back to the
        module's own ``gelu`` where that does not apply)."""
        if not (gate.dtype == torch.bfloat16 and gate.is_cuda and self._fused(gate)
                and getattr(module, "approximate", None) == "tanh"
                and all(isinstance(m, nn.Identity) or not m.training or m.p == 0 for m in between)
                and triton_quant.gelu_tanh_exact(gate.device)):
            return type(module).gelu(module, gate)
        capturing = cuda_graph.capturing()
        st = self._state.get(consumer)
        if capturing:
            self._check_capturable(consumer, st)
        if st is None:
            st = self._new_state(consumer, gate)
        step = self._step_index_on(gate.device) if st.step_amax is not None else None
        out = triton_quant.gelu_tanh_amax(gate, st.channel_amax, st.step_amax, step)
        self._tapped[consumer] = (weakref.ref(out), out._version, capturing)
        return out

    def _hook(self, name: str):
        @torch.no_grad()
        def hook(module: nn.Module, args: tuple) -> None:
            # not detached: sibling layers (q/k/v) are recognised by the identity of this very object
            # (a detach() would make a new one per hook); the hook runs under no_grad
            x = args[0]
            capturing = cuda_graph.capturing()
            st = self._state.get(name)
            if capturing:  # refuse before queuing anything: a failed capture must leave no trace
                self._check_capturable(name, st)
            if st is None:
                st = self._new_state(name, x)
            tap = self._tapped.pop(name, None)
            if tap is not None and tap[2] and not capturing:
                tap = None  # left by a capture that failed
            if tap is not None:  # the GELU that produced x already folded max |x| into st (same pass)
                if tap[0]() is not x or tap[1] != x._version:
                    raise RuntimeError(f"LinearInputObserver: {name!r} did not receive the GELU output its "
                                       "statistics were taken from; use fuse_producers=False for this model")
            elif self._fused(x):  # queued: one launch per input tensor (batched), channel and step maxima
                self._fused_update(x, st)
            else:
                ch = self._reduce(x)
                torch.maximum(st.channel_amax, ch, out=st.channel_amax)
                if st.step_amax is not None:
                    slot = self._step_index_on(x.device)
                    st.step_amax.scatter_reduce_(0, slot, ch.amax().reshape(1), reduce="amax")
            if self.samples_per_call > 0:
                if self.sample_block == 1:  # the original element sampler (kept bit-identical)
                    flat = x.reshape(-1)
                    n = flat.numel()
                    k = min(self.samples_per_call, n)
                    stride = max(n // k, 1)
                    offset = self._rng.randrange(stride)
                    samp = flat[offset::stride][:k].abs().float()
                else:
                    samp, st.sample_block = self._sample(x)
                st.samples.append(samp)
                st.sample_steps.append((self.step if self.num_steps else -1, samp.numel()))
            if self.rows_per_call > 0:
                rows = self._rows(x)
                st.rows.append(rows)
                st.row_steps.append((self.step if self.num_steps else -1, rows.shape[0]))
            if name in self._hessian_names:
                self._add_hessian(name, x)
            tokens = x.numel() // x.shape[-1]
            if capturing:  # nothing ran yet: count at every replay instead
                cuda_graph.on_replay(functools.partial(self._count, st, tokens))
            else:
                self._count(st, tokens)

        return hook

    # -- lifecycle ------------------------------------------------------------------------------------------
    def attach(self) -> LinearInputObserver:
        if self._handles:
            return self
        for name in self.names:
            module = self._modules.get(name)
            if module is None:
                raise RuntimeError(f"LinearInputObserver: layer {name!r} no longer exists (replaced after the "
                                   "observer was created); create a new observer for the current model")
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        # the last queued amax launch belongs to this forward (and to a CUDA graph capturing it)
        self._root_handle = self.model.register_forward_hook(self._flush)
        if self.fuse_producers and self.amax_backend != "torch":
            for gelu, consumer, between in self._find_gelu_taps():
                gelu.gelu = functools.partial(self._tapped_gelu, gelu, consumer, between)
                self._patched.append(gelu)
        return self

    def detach(self) -> None:
        self._flush()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._root_handle is not None:
            self._root_handle.remove()
            self._root_handle = None
        for gelu in self._patched:
            gelu.__dict__.pop("gelu", None)
        self._patched.clear()
        self._tapped.clear()
        self._last_key = self._last_channel = self._last_xtx = self._xtx_key = self._last_rows = None

    def __enter__(self) -> LinearInputObserver:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def stats(self) -> dict[str, LinearInputStats]:
        """Statistics per observed layer name (layers never called are absent); in prompt mode over the folded
        prompts."""
        self._flush()
        if self._prompt_mode:
            self._check_closed("stats")
        source = self._totals if self._prompt_mode else self._state
        out = {}
        for name, st in source.items():
            samples = torch.cat(st.samples) if st.samples else None
            steps = (torch.cat([torch.full((k,), s, dtype=torch.int64) for s, k in st.sample_steps])
                     if st.sample_steps else None)
            rows = torch.cat(st.rows) if st.rows else None
            row_steps = (torch.cat([torch.full((k,), s, dtype=torch.int64) for s, k in st.row_steps])
                         if st.row_steps else None)
            out[name] = LinearInputStats(st.channel_amax.amax(), st.channel_amax.clone(),
                                         None if st.step_amax is None else st.step_amax[:-1].clone(),
                                         samples, st.calls, st.tokens, st.sample_block, steps, rows, row_steps)
        return out

    def _hessian_sums(self) -> tuple[dict[str, HessianSum], dict[str, list[str]], dict[str, int]]:
        """(sum by group, members by group, tokens by layer) of the whole sums (totals in prompt mode)."""
        self._flush()
        if self._prompt_mode:
            self._check_closed("hessians")
            return self._htotals, self._hmembers, {n: t.tokens for n, t in self._totals.items()}
        return ({k: g.current for k, g in self._hgroups.items()}, {k: g.members for k, g in self._hgroups.items()},
                {n: st.tokens for n, st in self._state.items()})

    def hessians(self, *, mean: bool = True) -> dict[str, torch.Tensor]:
        """``name -> H`` float32 ``[in, in]`` for the layers observed with ``hessian``: ``X^T X / tokens`` (mean
        over the calibration tokens, a correctly rounded division wherever the sum lives; ``mean=False``: the raw
        sum). Only layers that were called are present;
        layers sharing a sum (and token count) get one tensor object."""
        sums, members, tokens = self._hessian_sums()
        group_of = {n: k for k, ms in members.items() for n in ms}
        shared: dict[tuple[str, int], torch.Tensor] = {}
        out = {}
        for name in tokens:
            if name not in group_of:
                continue
            value = sums[group_of[name]].result()
            if not mean:
                out[name] = value.clone()
                continue
            key = (group_of[name], tokens[name])
            if key not in shared:
                shared[key] = divide_exact(value, max(tokens[name], 1))
            out[name] = shared[key]
        return out

    def take_hessians(self) -> dict[str, torch.Tensor]:
        """:meth:`hessians` (means) computed in place of the observer's sums, which it gives up (no second copy of
        every Hessian): the observer holds no Hessians afterwards."""
        sums, members, tokens = self._hessian_sums()
        out = {}
        for key, names in members.items():
            called = [n for n in names if n in tokens]
            if not called:
                continue
            counts = {tokens[n] for n in called}
            value = sums[key].result()
            if len(counts) > 1:  # members seen a different number of times (not siblings after all)
                for n in called:
                    out[n] = divide_exact(value, max(tokens[n], 1))
                continue
            value.div_(value.new_tensor(float(max(counts.pop(), 1))))  # divide_exact, in place
            for n in called:
                out[n] = value
        self._htotals, self._hmembers, self._hgroups, self._hgroup_of = {}, {}, {}, {}
        self.close()
        return {n: out[n] for n in tokens if n in out}

    def close(self) -> None:
        """Finish queued host additions and free the side stream's buffers."""
        if self._adder is not None:
            self._adder.close()
            self._adder = None

    # -- prompts ----------------------------------------------------------------------------------------------
    def _check_closed(self, what: str) -> None:
        if self._prompt is not None:
            raise RuntimeError(f"LinearInputObserver.{what}: prompt {self._prompt} is still open (end_prompt first)")

    def begin_prompt(self, index: int) -> None:
        """Start observing calibration prompt ``index`` (its own sample generator, empty per-prompt sums)."""
        self._flush()
        self._check_closed("begin_prompt")
        if not self._prompt_mode and any(st.calls for st in self._state.values()):
            raise RuntimeError("LinearInputObserver.begin_prompt: forwards were observed outside prompts")
        self._prompt_mode = True
        self._prompt = int(index)
        self._rng = random.Random(f"{self.seed}:{index}")
        self._row_rng = random.Random(f"{self.seed + 1}:{index}")
        for group in self._hgroups.values():
            if group.dirty:
                group.current.zero_()
                group.dirty = False

    def end_prompt(self) -> PromptRecord:
        """Close the open prompt and return its contribution (per-layer state reset; Hessian sums stay valid until
        the next :meth:`begin_prompt`). Pass it to :meth:`fold` (here or in the process that owns the totals)."""
        self._flush()
        if self._prompt is None:
            raise RuntimeError("LinearInputObserver.end_prompt: no prompt is open")
        rec = PromptRecord(self._prompt)
        for name, st in self._state.items():
            if st.calls == 0:
                continue
            rec.layers[name] = {
                "channel_amax": st.channel_amax.to("cpu", copy=True),
                "step_amax": None if st.step_amax is None else st.step_amax.to("cpu", copy=True),
                "calls": st.calls, "tokens": st.tokens, "sample_block": st.sample_block,
                "samples": torch.cat(st.samples).cpu() if st.samples else None,
                "sample_steps": list(st.sample_steps),
                "rows": torch.cat(st.rows) if st.rows else None, "row_steps": list(st.row_steps)}
            st.channel_amax.zero_()
            if st.step_amax is not None:
                st.step_amax.zero_()
            st.samples, st.sample_steps, st.calls, st.tokens = [], [], 0, 0
            st.rows, st.row_steps = [], []
        for key, group in self._hgroups.items():
            if group.dirty:
                rec.hessians[key] = group.current.result()
                rec.groups[key] = list(group.members)
        self._prompt = None
        return rec

    @property
    def hessian_device(self) -> torch.device:
        """Where this observer's Hessian sums live: CPU for host storage, else the observed layers' device."""
        if self._storage == "host" or not self._hessian_names:
            return torch.device("cpu")
        return self._layer_device(sorted(self._hessian_names)[0])

    def _layer_device(self, name: str) -> torch.device:
        st = self._state.get(name)
        if st is not None:
            return st.channel_amax.device
        module = self._modules.get(name)
        return module.weight.device if module is not None else torch.device("cpu")

    def fold(self, rec: PromptRecord) -> None:
        """Add one prompt's contribution to the totals (call in prompt order: sums are order-sensitive)."""
        self._check_closed("fold")
        self._prompt_mode = True
        for name, lr in rec.layers.items():
            dev = self._layer_device(name)
            tot = self._totals.get(name)
            if tot is None:  # the first contribution is copied (bit for bit), later ones folded in
                step = lr["step_amax"]
                tot = self._totals[name] = _Totals(lr["channel_amax"].to(dev, copy=True),
                                                   None if step is None else step.to(dev, copy=True))
            else:
                torch.maximum(tot.channel_amax, lr["channel_amax"].to(dev), out=tot.channel_amax)
                if tot.step_amax is not None:
                    torch.maximum(tot.step_amax, lr["step_amax"].to(dev), out=tot.step_amax)
            tot.calls += lr["calls"]
            tot.tokens += lr["tokens"]
            tot.sample_block = lr["sample_block"]
            if lr["samples"] is not None:
                tot.samples.append(lr["samples"])
            tot.sample_steps += lr["sample_steps"]
            if lr.get("rows") is not None:
                tot.rows.append(lr["rows"])
            tot.row_steps += lr.get("row_steps", [])
        for key, value in rec.hessians.items():
            total = self._htotals.get(key)
            if total is None:
                dev = self._layer_device(key)
                total = self._htotals[key] = HessianSum(value.shape, dev, self._storage)  # added to on the host
                self._hmembers[key] = list(rec.groups[key])
                total.set_(value)
            else:
                total.add(value)
        self.folded.append(rec.index)

    def state_dict(self) -> dict[str, Any]:
        """The totals (prompt mode, no prompt open) as plain tensors and numbers (CPU), for a checkpoint."""
        self._flush()
        self._check_closed("state_dict")
        layers = {}
        for name, t in self._totals.items():
            layers[name] = {"channel_amax": t.channel_amax.cpu(),
                            "step_amax": None if t.step_amax is None else t.step_amax.cpu(),
                            "samples": torch.cat(t.samples) if t.samples else None,
                            "sample_steps": list(t.sample_steps), "sample_block": t.sample_block,
                            "rows": torch.cat(t.rows) if t.rows else None, "row_steps": list(t.row_steps),
                            "calls": t.calls, "tokens": t.tokens}
        hessians = {k: {"members": self._hmembers[k], "sum": h.result()} for k, h in self._htotals.items()}
        return {"layers": layers, "hessians": hessians, "folded": list(self.folded)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the totals of :meth:`state_dict` (before any forward of this observer)."""
        if self._state or self._totals or self._htotals:
            raise RuntimeError("LinearInputObserver.load_state_dict: the observer already holds statistics")
        rec = PromptRecord(-1)
        rec.layers = {n: {**lr, "samples": lr["samples"]} for n, lr in state["layers"].items()}
        rec.hessians = {k: h["sum"] for k, h in state["hessians"].items()}
        rec.groups = {k: h["members"] for k, h in state["hessians"].items()}
        self.fold(rec)
        self.folded = list(state["folded"])
