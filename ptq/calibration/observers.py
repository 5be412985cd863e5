"""Activation statistics of ``nn.Linear`` inputs, collected by forward pre-hooks.

Everything stays on the model's device and is updated in place (``torch.maximum(..., out=)``), so a hook never
forces a host sync. Sibling layers that read the same input tensor (``to_q``/``to_k``/``to_v``) reuse one reduction.
On CUDA (with triton) the amax path is one fused kernel per call (``triton_quant.amax_update_``: per-channel and
per-step max folded into the accumulators with atomics), which keeps the hooks' cost near the bytes they read.
"""

from __future__ import annotations

import fnmatch
import random
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ptq.formats import triton_quant


@dataclass
class LinearInputStats:
    """Calibration statistics of one Linear's input ``x [..., in_features]``.

    amax: float32 ``[]`` max |x| over all calls. channel_amax: float32 ``[in_features]``. step_amax: float32
    ``[num_steps]`` (max |x| per denoising step; zeros for steps never seen) or None. samples: float32 ``[k]`` random
    |x| values (for percentile / MSE clipping) or None. calls: number of forwards observed.
    sample_block: ``samples`` holds runs of this many consecutive input elements (``samples.view(-1, sample_block)``
    are real blocks of x along ``in_features``, aligned to multiples of ``sample_block``: NVFP4's runtime blocks
    when 16); 1 = independent elements. sample_steps: int64 ``[k]`` denoising step of each sample (``-1`` when
    no step was set) or None.
    """

    amax: torch.Tensor
    channel_amax: torch.Tensor
    step_amax: torch.Tensor | None = None
    samples: torch.Tensor | None = None
    calls: int = 0
    tokens: int = 0
    sample_block: int = 1
    sample_steps: torch.Tensor | None = None

    def to(self, device: str | torch.device) -> LinearInputStats:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return LinearInputStats(mv(self.amax), mv(self.channel_amax), mv(self.step_amax), mv(self.samples),
                                self.calls, self.tokens, self.sample_block, mv(self.sample_steps))


@dataclass
class _LayerState:
    channel_amax: torch.Tensor
    step_amax: torch.Tensor | None
    samples: list[torch.Tensor] = field(default_factory=list)
    sample_steps: list[tuple[int, int]] = field(default_factory=list)  # (step, number of samples) per call
    hessian: torch.Tensor | None = None
    sample_block: int = 1
    calls: int = 0
    tokens: int = 0


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

    ``hessian``: True (every observed layer) or a collection of layer names: also accumulate ``H = sum X^T X``
    (float32 ``[in, in]`` on the model's device, updated in place, no host sync) for GPTQ; read with
    :meth:`hessians`. Layers that read the same input tensor (``to_q``/``to_k``/``to_v``) share one ``X^T X``
    product per call. Memory: ``4 * in_features**2`` bytes per layer (WAN 5B: 37.7 MB for in=3072, 822 MB for
    ffn.net.2's in=14336; all 300 Linears at once ~35 GB, hence ``quant.gptq_blocks_per_pass``).
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
        if sample_block < 1:
            raise ValueError(f"sample_block={sample_block}: expected >= 1")
        self.sample_block = sample_block
        self._hessian_names = set(self.names) if hessian is True else set(hessian or ())
        unknown = self._hessian_names - set(self.names)
        if unknown:
            raise KeyError(f"hessian requested for layers that are not observed: {sorted(unknown)}")
        self._last_xtx: torch.Tensor | None = None
        self._xtx_key: tuple | None = None
        self.step = 0
        self._rng = random.Random(seed)
        self._state: dict[str, _LayerState] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._last_key: tuple | None = None
        self._last_channel: torch.Tensor | None = None

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

    def _xtx(self, x: torch.Tensor) -> torch.Tensor:
        """``X^T X`` (float32 ``[in, in]``) of ``x``, computed once for consecutive layers reading the same tensor."""
        last = self._xtx_key[0]() if self._xtx_key is not None else None
        if last is x and self._xtx_key[1] == x._version and self._last_xtx is not None:
            return self._last_xtx
        flat = x.reshape(-1, x.shape[-1]).float()
        self._last_xtx = flat.t() @ flat
        self._xtx_key = (weakref.ref(x), x._version)
        return self._last_xtx

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

    def _hook(self, name: str):
        @torch.no_grad()
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            st = self._state.get(name)
            if st is None:
                st = self._state[name] = _LayerState(
                    channel_amax=torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device),
                    step_amax=(torch.zeros(self.num_steps, dtype=torch.float32, device=x.device)
                               if self.num_steps else None),
                )
            if self._fused(x):  # one launch: channel and step maxima, atomically, no |x| or per-call vector
                triton_quant.amax_update_(x, st.channel_amax, st.step_amax, self.step)
            else:
                ch = self._reduce(x)
                torch.maximum(st.channel_amax, ch, out=st.channel_amax)
                if st.step_amax is not None and 0 <= self.step < st.step_amax.numel():
                    slot = st.step_amax[self.step]
                    torch.maximum(slot, ch.amax(), out=slot)
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
            if name in self._hessian_names:
                xtx = self._xtx(x)
                if st.hessian is None:
                    st.hessian = torch.zeros_like(xtx)
                st.hessian.add_(xtx)
            st.calls += 1
            st.tokens += x.numel() // x.shape[-1]

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
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last_key = self._last_channel = self._last_xtx = self._xtx_key = None

    def __enter__(self) -> LinearInputObserver:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def stats(self) -> dict[str, LinearInputStats]:
        """Statistics per observed layer name (layers never called are absent)."""
        out = {}
        for name, st in self._state.items():
            samples = torch.cat(st.samples) if st.samples else None
            steps = (torch.cat([torch.full((k,), s, dtype=torch.int64) for s, k in st.sample_steps])
                     if st.sample_steps else None)
            out[name] = LinearInputStats(st.channel_amax.amax(), st.channel_amax.clone(),
                                         None if st.step_amax is None else st.step_amax.clone(),
                                         samples, st.calls, st.tokens, st.sample_block, steps)
        return out

    def hessians(self, *, mean: bool = True) -> dict[str, torch.Tensor]:
        """``name -> H`` float32 ``[in, in]`` for the layers observed with ``hessian``: ``X^T X / tokens`` (mean
        over the calibration tokens; ``mean=False``: the raw sum). Only layers that were called are present."""
        out = {}
        for name, st in self._state.items():
            if st.hessian is not None:
                out[name] = st.hessian / max(st.tokens, 1) if mean else st.hessian.clone()
        return out
