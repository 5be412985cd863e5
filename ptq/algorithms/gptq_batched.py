"""Batched GPTQ: many Linears in one column sweep, the same results as :mod:`ptq.algorithms.gptq` layer by layer.

The per-layer GPTQ loop (``gptq.gptq_nvfp4`` / ``gptq.gptq_fixed_scale``) launches a few dozen small kernels per
weight column, so on a GPU its time is the host's, times the number of layers. Here the layers of one shape
``[out, in]`` are stacked into one batch ``W [B, out, in]`` (float32) and swept together: per column one rounding of
``[B, out]`` values and one rank-1 update of the current lazy block, per block of ``block_size`` columns one GEMM per
layer. The number of launches no longer grows with the number of layers, and nothing in the sweep reads a value
back to the host. Layers reading the same input (attention q/k/v: the same Hessian tensor object) share one
inverse-Hessian factor.

Exactness: every step is the per-layer path's own arithmetic on a broadcast shape (elementwise IEEE operations,
the same 16-element reductions; the lazy-block update is the same GEMM per layer, same shapes and operands), so
on CPU the codes and scales are bit-identical to ``gptq.quantize_gptq`` (``tests/test_gptq_batched.py``). On CUDA
the elementwise steps are identical too; a 16-element ``sum`` may be reduced in another order by a kernel launched
for a larger tensor, which can only flip near-tied "mse" / Four-over-Six block-scale choices (and then that row's
later columns); ``tests/test_gpu_kernels.py``-style GPU tests bound the difference.

CUDA graphs: on CUDA the ``block_size``-column step (roundings, scale searches, rank-1 updates) works on static
buffers and is captured once per batch, then replayed for every block (``cuda_graphs=True``; falls back to eager
execution with a warning when capture fails). Replays run the captured kernels, so results equal eager execution.

Memory per batch: ``B * out * in * 5`` bytes (float32 weights + codes) + ``U * in**2 * 4`` (the U distinct
inverse-Hessian factors) + the block buffers; batches are cut to ``max_bytes`` (results do not depend on it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ptq.algorithms import gptq
from ptq.algorithms import weight_search as ws
from ptq.algorithms.recipe import GPTQWeight
from ptq.formats import NumberFormat, QuantizedWeight
from ptq.formats.fp8 import FP8_DTYPE, FP8_E4M3_MAX
from ptq.formats.nvfp4 import E2M1_MAX, E2M1_VALUES, NVFP4_BLOCK

log = logging.getLogger(__name__)

GIB = 2**30
#: ``max_bytes`` when none is given: on CUDA this fraction of the free memory (at most ``AUTO_MAX_GIB``), on CPU
#: ``CPU_BATCH_GIB``.
AUTO_FREE_FRACTION = 0.4
AUTO_MAX_GIB = 16.0
CPU_BATCH_GIB = 2.0


@dataclass
class _Batch:
    """Layers of one shape swept together. ``W`` float32 ``[B, out, in]`` (updated in place), ``codes`` ``[B, out,
    in]``; ``hidx`` (host list) / ``hidx_t`` (device int64) map each layer to its inverse-Hessian factor in
    ``hinv [U, in, in]`` and column weights ``diag [U, in]``; NVFP4: ``g [B, 1]`` global scales, ``S [B, out,
    in/16]`` block scales; fixed-scale formats: ``scale [B, out]`` per-row total scale."""

    names: list[str]
    W: torch.Tensor
    hidx: list[int]
    hidx_t: torch.Tensor
    hinv: torch.Tensor
    diag: torch.Tensor
    codes: torch.Tensor | None = None
    g: torch.Tensor | None = None
    S: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    scale_2: list[torch.Tensor | None] = field(default_factory=list)
    fixed_scales: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _BlockBuffers:
    """Static inputs / outputs of one lazy block (``n`` columns): ``w1 [B, out, n]`` (updated), ``h1 [B, n, n]``,
    ``cw [B, 1, n]`` (column weights), ``err [B, out, n]``, ``codes [B, out, n]``, NVFP4 ``S [B, out, n/16]``."""

    w1: torch.Tensor
    h1: torch.Tensor
    cw: torch.Tensor
    err: torch.Tensor
    codes: torch.Tensor
    S: torch.Tensor | None


class _Sweeper:
    """The column sweep of one batch of "tensor" scheme layers (fixed per-row scales, ``batch.scale``): ``run()``
    fills ``batch.codes``. Subclasses choose scales during the sweep; :data:`SWEEPERS` maps scale schemes to them."""

    def __init__(self, batch: _Batch, fmt: NumberFormat, block_size: int, scales: str, cuda_graphs: bool) -> None:
        self.b, self.fmt, self.scales = batch, fmt, scales
        self.bs = self.lazy_block(block_size)
        self.graphs = cuda_graphs and batch.W.device.type == "cuda"
        self._graph: torch.cuda.CUDAGraph | None = None

    # -- the scale scheme ------------------------------------------------------------------------------------
    @staticmethod
    def lazy_block(block_size: int) -> int:
        """Columns per lazy block for the configured ``block_size``."""
        return block_size

    @staticmethod
    def init_scales(batch: _Batch, weights: Mapping[str, torch.Tensor], fmt: NumberFormat, cfg: GPTQWeight) -> None:
        """Set the batch's scales chosen before the sweep and allocate ``batch.codes``: here the round-to-nearest
        scales per layer (``gptq.tensor_scale_weight``, as the per-layer path)."""
        rows, cols = batch.W.shape[1:]
        rows_scale = []
        for name in batch.names:
            initial = gptq.tensor_scale_weight(weights[name], fmt, cfg, name)
            s = initial.scale.to(batch.W.device)
            batch.fixed_scales.append(initial.scale)
            batch.scale_2.append(initial.scale_2)
            rows_scale.append(s.reshape(-1).expand(rows) if s.dim() else s.expand(rows))
        batch.scale = torch.stack(rows_scale)
        c, _ = fmt.gptq_round(batch.W[:1, :1, 0], batch.scale[:1, :1])  # the codes' dtype
        batch.codes = torch.empty(len(batch.names), rows, cols, dtype=c.dtype, device=batch.W.device)

    @staticmethod
    def result(batch: _Batch, k: int, fmt: NumberFormat) -> QuantizedWeight:
        """The quantized weight of the batch's layer ``k`` after the sweep."""
        return fmt.from_codes(batch.codes[k].clone(), batch.fixed_scales[k], batch.scale_2[k], batch.names[k])

    def _round_column(self, buf: _BlockBuffers, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, values) ``[B, out]`` of column ``i`` of ``buf.w1``."""
        return self.fmt.gptq_round(buf.w1[:, :, i], self.b.scale)

    def _scale_buffer(self, B: int, R: int, n: int) -> torch.Tensor | None:
        """The block scales chosen during the sweep of ``n`` columns (None: none)."""
        return None

    # -- one block -------------------------------------------------------------------------------------------
    def _block_step(self, buf: _BlockBuffers) -> None:
        """GPTQ over the ``n`` columns of ``buf.w1`` (``gptq._gptq_sweep``'s inner loop, all layers at once)."""
        n = buf.w1.shape[2]
        for i in range(n):
            c, q = self._round_column(buf, i)
            buf.codes[:, :, i] = c
            e = (buf.w1[:, :, i] - q) / buf.h1[:, i, i].unsqueeze(1)
            buf.w1[:, :, i:] -= e.unsqueeze(2) * buf.h1[:, i, i:].unsqueeze(1)
            buf.err[:, :, i] = e

    # -- the sweep -------------------------------------------------------------------------------------------
    def _buffers(self, n: int) -> _BlockBuffers:
        B, R, _ = self.b.W.shape
        dev = self.b.W.device
        codes_dtype = self.b.codes.dtype
        return _BlockBuffers(
            w1=torch.empty(B, R, n, dtype=torch.float32, device=dev),
            h1=torch.empty(B, n, n, dtype=torch.float32, device=dev),
            cw=torch.empty(B, 1, n, dtype=torch.float32, device=dev),
            err=torch.empty(B, R, n, dtype=torch.float32, device=dev),
            codes=torch.empty(B, R, n, dtype=codes_dtype, device=dev),
            S=self._scale_buffer(B, R, n),
        )

    def _load(self, buf: _BlockBuffers, i1: int, i2: int) -> None:
        b = self.b
        buf.w1.copy_(b.W[:, :, i1:i2])
        buf.h1.copy_(b.hinv[:, i1:i2, i1:i2].index_select(0, b.hidx_t))
        buf.cw.copy_(b.diag[:, i1:i2].index_select(0, b.hidx_t).unsqueeze(1))

    def _store(self, buf: _BlockBuffers, i1: int, i2: int) -> None:
        b = self.b
        b.codes[:, :, i1:i2] = buf.codes
        if i2 < b.W.shape[2]:  # the lazy update: the per-layer path's GEMM, layer by layer (same bits)
            for k, u in enumerate(b.hidx):
                b.W[k, :, i2:] -= buf.err[k] @ b.hinv[u, i1:i2, i2:]

    def _replay(self, buf: _BlockBuffers, first: bool) -> None:
        """The block step: eagerly, or from a CUDA graph captured after the first (eager) block."""
        if not self.graphs:
            self._block_step(buf)
            return
        if first:
            self._block_step(buf)
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._block_step(buf)
                self._graph = graph
            except RuntimeError as exc:  # pragma: no cover - GPU only
                log.warning("batched GPTQ: CUDA-graph capture failed (%s); sweeping eagerly", exc)
                self.graphs = False
            return
        assert self._graph is not None
        self._graph.replay()

    def run(self, bar: tqdm | None = None) -> None:
        cols = self.b.W.shape[2]
        full = self._buffers(self.bs) if cols >= self.bs else None
        for i1 in range(0, cols, self.bs):
            i2 = min(i1 + self.bs, cols)
            buf = full if i2 - i1 == self.bs else self._buffers(i2 - i1)
            assert buf is not None
            self._load(buf, i1, i2)
            if buf is full:
                self._replay(buf, first=i1 == 0)
            else:  # a partial last block runs eagerly
                self._block_step(buf)
            self._store(buf, i1, i2)
            if bar is not None:
                bar.update(i2 - i1)
        self._graph = None


class _GlobalBlockSweeper(_Sweeper):
    """NVFP4's "global_block" scales: a global scale per layer (``batch.g``) chosen before the sweep, each 16-column
    group's float8 block scales (``batch.S``) when the sweep reaches the group (``gptq.gptq_nvfp4``'s choice)."""

    def __init__(self, batch: _Batch, fmt: NumberFormat, block_size: int, scales: str, cuda_graphs: bool) -> None:
        super().__init__(batch, fmt, block_size, scales, cuda_graphs)
        dev = batch.W.device
        # true divisions by device scalars (what ``divide_exact`` does, without a host->device copy per call)
        self.six = torch.tensor(E2M1_MAX, dtype=torch.float32, device=dev)
        self.four = torch.tensor(4.0, dtype=torch.float32, device=dev)
        self.max_code = _max_code()

    @staticmethod
    def lazy_block(block_size: int) -> int:
        return max(NVFP4_BLOCK, (block_size // NVFP4_BLOCK) * NVFP4_BLOCK)

    @staticmethod
    def init_scales(batch: _Batch, weights: Mapping[str, torch.Tensor], fmt: NumberFormat, cfg: GPTQWeight) -> None:
        """The global scales (``gptq.nvfp4_initial_scales``; "mse" by :func:`mse_global_scale`, the same result in
        fewer passes) and the block-scale and code buffers."""
        W, hidx = batch.W, batch.hidx
        if cfg.scales == "mse":
            gs = [mse_global_scale(W[k], batch.diag[u]) for k, u in enumerate(hidx)]
        else:
            gs = [gptq.nvfp4_initial_scales(W[k], cfg.scales, batch.diag[u], 8)[0] for k, u in enumerate(hidx)]
        B, rows, cols = W.shape
        batch.g = torch.stack(gs).reshape(-1, 1)
        batch.S = torch.empty(B, rows, cols // NVFP4_BLOCK, dtype=FP8_DTYPE, device=W.device)
        batch.codes = torch.empty(B, rows, cols, dtype=torch.uint8, device=W.device)

    @staticmethod
    def result(batch: _Batch, k: int, fmt: NumberFormat) -> QuantizedWeight:
        assert batch.S is not None and batch.g is not None  # packing copies the codes
        return fmt.from_codes(batch.codes[k], batch.S[k].clone(), batch.g[k, 0].clone(), batch.names[k])

    def _group_scales(self, xb: torch.Tensor, cw: torch.Tensor) -> torch.Tensor:
        """Block scales (float8 ``[B, out]``) of the 16-column group ``xb [B, out, 16]`` with column weights
        ``cw [B, 1, 16]``: ``gptq._nvfp4_group_scales`` with a global scale per layer."""
        g = self.b.g
        amax = xb.abs().amax(-1)
        if self.scales == "max":
            return torch.clamp(amax / self.six / g, max=FP8_E4M3_MAX).to(FP8_DTYPE)
        if self.scales == "mse":
            base = torch.clamp(amax / self.six / g, max=FP8_E4M3_MAX).to(FP8_DTYPE)
            return _search_offsets(xb, g, base, cw, self.max_code)[0]
        best_s = best_e = None  # four_over_six: the better of the x6 and x4 scales per block
        for m in (self.six, self.four):
            s = torch.clamp(amax / m / g, max=FP8_E4M3_MAX).to(FP8_DTYPE)
            e = ((_block_values(xb, g * s.float()) - xb).pow(2) * cw).sum(-1)
            if best_s is None:
                best_s, best_e = s, e
            else:
                better = e < best_e
                best_s = torch.where(better, s.view(torch.uint8), best_s.view(torch.uint8)).view(FP8_DTYPE)
                best_e = torch.minimum(e, best_e)
        assert best_s is not None
        return best_s

    def _round_column(self, buf: _BlockBuffers, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i % NVFP4_BLOCK == 0:
            buf.S[:, :, i // NVFP4_BLOCK] = self._group_scales(
                buf.w1[:, :, i : i + NVFP4_BLOCK], buf.cw[:, :, i : i + NVFP4_BLOCK])
        return _nvfp4_round(buf.w1[:, :, i], self.b.g * buf.S[:, :, i // NVFP4_BLOCK].float())

    def _scale_buffer(self, B: int, R: int, n: int) -> torch.Tensor | None:
        return torch.empty(B, R, n // NVFP4_BLOCK, dtype=FP8_DTYPE, device=self.b.W.device)

    def _store(self, buf: _BlockBuffers, i1: int, i2: int) -> None:
        self.b.S[:, :, i1 // NVFP4_BLOCK : i2 // NVFP4_BLOCK] = buf.S
        super()._store(buf, i1, i2)


#: The sweep of each weight-scale layout batched GPTQ implements (:attr:`~ptq.formats.NumberFormat.scale_scheme`);
#: other layouts ("block") run layer by layer (``gptq.quantize_gptq``).
SWEEPERS: dict[str, type[_Sweeper]] = {
    "tensor": _Sweeper,
    "global_block": _GlobalBlockSweeper,
}


def unsupported(fmt: NumberFormat) -> str | None:
    """Why batched GPTQ cannot quantize layers of ``fmt`` (None: it can)."""
    if fmt.scale_scheme not in SWEEPERS:
        return (f"batched GPTQ for {fmt.name!r} ({fmt.scale_scheme!r} weight scales) is not implemented (it sweeps "
                f"{', '.join(SWEEPERS)} scales)")
    if fmt.rotated_codes:
        return f"batched GPTQ for {fmt.name!r} (codes in a rotated basis) is not implemented"
    return None


# ---------------------------------------------------------------------------------------------------------------
# E2M1 rounding in few passes (the same values as ptq.formats.nvfp4)
# ---------------------------------------------------------------------------------------------------------------

_E2M1_MAGNITUDES = torch.tensor(E2M1_VALUES, dtype=torch.float32)
_ON: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _rounding_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the 8 E2M1 magnitudes, the 7 decision thresholds) on ``device``. Round to nearest even: a magnitude
    exactly between two values goes to the even code, so a threshold whose tie goes up is moved one float32 step
    down; the code is then the number of thresholds strictly below ``|y|``."""
    t = _ON.get(device)
    if t is None:
        mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32)
        tie_up = torch.tensor([False, True, False, True, False, True, False])
        below = torch.nextafter(mids, torch.tensor(-float("inf")))
        t = _ON[device] = (_E2M1_MAGNITUDES.to(device), torch.where(tie_up, below, mids).to(device))
    return t


def e2m1_round_fast(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E2M1 codes uint8, their values float32) of float32 ``y``: exactly ``nvfp4._encode_unchecked(clamp(y, +-6))``
    and its table value (round to nearest even, saturating, sign kept also for zero), in five passes instead of
    about twenty (``tests/test_gptq_batched.py`` compares them around every threshold)."""
    magnitudes, thresholds = _rounding_tables(y.device)
    index = torch.bucketize(y.abs(), thresholds, out_int32=True)
    values = torch.copysign(magnitudes[index], y)
    return index.to(torch.uint8) | (torch.signbit(y).to(torch.uint8) << 3), values


def _block_values(xb: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``weight_search._block_quant(xb, total)[1]``: dequantized values of blocks ``xb [..., 16]`` with per-block
    ``total [...]`` (a zero total gives zeros)."""
    zero = total == 0
    t = torch.where(zero, torch.ones_like(total), total).unsqueeze(-1)
    y = torch.where(zero.unsqueeze(-1), torch.zeros_like(xb), xb / t)
    return e2m1_round_fast(y)[1] * total.unsqueeze(-1)


def _nvfp4_round(col: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``NVFP4.gptq_round(col, scale)`` (codes, values) with :func:`e2m1_round_fast`."""
    zero = scale == 0
    y = torch.where(zero, torch.zeros_like(col), col / torch.where(zero, torch.ones_like(scale), scale))
    codes, values = e2m1_round_fast(y)
    return codes, values * scale


def _search_offsets(xb: torch.Tensor, g: torch.Tensor, base: torch.Tensor, cw: torch.Tensor | None,
                    max_code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight_search.search_scale_offsets`` with the default offsets and :func:`_block_values`: (best float8
    scales, their block errors)."""
    return ws.search_scale_offsets(xb, g, base, ws.DEFAULT_SCALE_OFFSETS, cw, max_code, block_values=_block_values)


def _max_code() -> int:
    return min(int(torch.tensor(FP8_E4M3_MAX).to(FP8_DTYPE).view(torch.uint8)), ws._FP8_MAX_CODE)


def mse_global_scale(w: torch.Tensor, cw: torch.Tensor, num_global: int = 8) -> torch.Tensor:
    """The global scale ``weight_search.search_global_and_blocks(w, num_global, col_weight=cw)`` chooses (the one
    GPTQ keeps: its block scales are chosen again during the sweep), float32 ``[]``."""
    rows, cols = w.shape
    nb = cols // NVFP4_BLOCK
    cwb = cw.float().reshape(nb, NVFP4_BLOCK)
    six = torch.tensor(E2M1_MAX, dtype=torch.float32, device=w.device)
    step = ws._row_chunks(rows, cols, w.device)
    best: tuple[torch.Tensor, float] | None = None
    for g in ws.global_scale_candidates(w.float().abs().amax(), max(1, num_global)):
        g = g.float().reshape(())
        sse = torch.empty(rows, nb, dtype=torch.float32, device=w.device)
        for r in range(0, rows, step):
            xb = w[r : r + step].float().reshape(-1, nb, NVFP4_BLOCK)
            base = torch.clamp(xb.abs().amax(-1) / six / g, max=FP8_E4M3_MAX).to(FP8_DTYPE)
            sse[r : r + step] = _search_offsets(xb, g, base, cwb, _max_code())[1]
        err = float(sse.double().sum())
        if best is None or err < best[1]:
            best = (g, err)
    assert best is not None
    return best[0]


# ---------------------------------------------------------------------------------------------------------------
# preparing batches
# ---------------------------------------------------------------------------------------------------------------


def _hessian_key(h: torch.Tensor) -> tuple:
    """Identity of a Hessian tensor (layers handed the same tensor object / storage share one factor)."""
    return (h.untyped_storage().data_ptr(), h.storage_offset(), tuple(h.shape), tuple(h.stride()), h.device)


def default_max_bytes(device: torch.device) -> int:
    """Working memory of one batch when none is configured: ``AUTO_FREE_FRACTION`` of the free CUDA memory (at most
    ``AUTO_MAX_GIB``), ``CPU_BATCH_GIB`` on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(free * AUTO_FREE_FRACTION, AUTO_MAX_GIB * GIB))
    return int(CPU_BATCH_GIB * GIB)


def plan_batches(shapes: Mapping[str, tuple[int, int]], keys: Mapping[str, tuple], max_bytes: int
                 ) -> list[list[str]]:
    """Layer names (in the given order) cut into batches of one ``[out, in]`` shape whose weights, codes and
    distinct inverse-Hessian factors take at most ``max_bytes`` (a single layer may exceed it)."""
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, shape in shapes.items():
        by_shape.setdefault(shape, []).append(name)
    batches: list[list[str]] = []
    for (rows, cols), names in by_shape.items():
        cur: list[str] = []
        seen: set[tuple] = set()
        used = 0
        for name in names:
            need = rows * cols * 5 + rows * (cols // NVFP4_BLOCK) + (0 if keys[name] in seen else cols * cols * 4)
            if cur and used + need > max_bytes:
                batches.append(cur)
                cur, seen, used = [], set(), 0
                need = rows * cols * 5 + rows * (cols // NVFP4_BLOCK) + cols * cols * 4
            cur.append(name)
            seen.add(keys[name])
            used += need
        if cur:
            batches.append(cur)
    return batches


def _prepare_batch(names: list[str], weights: Mapping[str, torch.Tensor], hessians: Mapping[str, torch.Tensor],
                   keys: Mapping[str, tuple], fmt: NumberFormat, cfg: GPTQWeight) -> _Batch:
    """Stack the batch's weights, factor each distinct Hessian once (``gptq.prepare_hessian`` +
    ``gptq.inverse_cholesky_upper``, as the per-layer path) and choose the initial scales per layer."""
    dev = weights[names[0]].device
    rows, cols = weights[names[0]].shape
    order: dict[tuple, int] = {}
    for name in names:
        order.setdefault(keys[name], len(order))
    hinv = torch.empty(len(order), cols, cols, dtype=torch.float32, device=dev)
    diag = torch.empty(len(order), cols, dtype=torch.float32, device=dev)
    first = {u: next(n for n in names if order[keys[n]] == u) for u in range(len(order))}
    for u, name in first.items():  # one factorisation per distinct Hessian (streamed to the device one at a time)
        H = gptq.prepare_hessian(hessians[name].to(dev), cfg.damp)
        diag[u] = torch.diagonal(H)
        hinv[u] = gptq.inverse_cholesky_upper(H, cfg.damp)
        del H
    hidx = [order[keys[n]] for n in names]
    W = torch.empty(len(names), rows, cols, dtype=torch.float32, device=dev)
    for k, name in enumerate(names):
        W[k] = weights[name].detach()
    batch = _Batch(names, W, hidx, torch.tensor(hidx, dtype=torch.int64, device=dev), hinv, diag)
    SWEEPERS[fmt.scale_scheme].init_scales(batch, weights, fmt, cfg)
    return batch


def _results(batch: _Batch, fmt: NumberFormat) -> dict[str, QuantizedWeight]:
    sweeper = SWEEPERS[fmt.scale_scheme]
    return {name: sweeper.result(batch, k, fmt) for k, name in enumerate(batch.names)}


# ---------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def gptq_quantize_many(
    weights: Mapping[str, torch.Tensor],
    hessians: Mapping[str, torch.Tensor],
    fmt: NumberFormat,
    cfg: GPTQWeight,
    *,
    max_bytes: int | None = None,
    cuda_graphs: bool = True,
    progress: bool = False,
    on_done: Callable[[str, QuantizedWeight], None] | None = None,
) -> dict[str, QuantizedWeight]:
    """GPTQ of every ``weights[name] [out, in]`` (layer name -> weight, all on one device) with
    ``hessians[name]`` float32 ``[in, in]``: what ``gptq.quantize_gptq`` returns for each layer, computed in
    batches. Returns name -> QuantizedWeight (in the order given); with ``on_done`` each result is handed over
    as its batch finishes instead (and not kept). ``max_bytes``: working memory per batch (default
    :func:`default_max_bytes`)."""
    if not weights:
        return {}
    why = unsupported(fmt)
    if why is not None:
        raise ValueError(why)
    if cfg.scales not in gptq.GPTQ_SCALE_METHODS:
        raise ValueError(f"GPTQ scale method {cfg.scales!r}: expected one of {gptq.GPTQ_SCALE_METHODS}")
    for name, w in weights.items():
        if hessians.get(name) is None:
            raise ValueError(f"{name}: weight method 'gptq' needs the layer's input Hessian (calibrate with "
                             "LinearInputObserver(hessian=True) and pass hessians= to quantize_)")
        fmt.check_weight(w, f"{name}.weight")
    devices = {w.device for w in weights.values()}
    if len(devices) != 1:
        raise ValueError(f"gptq_quantize_many: weights on several devices {sorted(map(str, devices))}")
    device = devices.pop()
    keys = {n: _hessian_key(hessians[n]) for n in weights}
    shapes = {n: (int(w.shape[0]), int(w.shape[1])) for n, w in weights.items()}
    batches = plan_batches(shapes, keys, default_max_bytes(device) if max_bytes is None else max_bytes)
    total_cols = sum(shapes[b[0]][1] for b in batches)
    results: dict[str, QuantizedWeight] = {}
    with tqdm(total=total_cols, desc=f"gptq {fmt.name} ({len(weights)} layers)", disable=not progress,
              leave=False, unit="col") as bar:
        for names in batches:
            batch = _prepare_batch(names, weights, hessians, keys, fmt, cfg)
            SWEEPERS[fmt.scale_scheme](batch, fmt, cfg.block_size, cfg.scales, cuda_graphs).run(bar)
            for name, qw in _results(batch, fmt).items():
                if on_done is not None:
                    on_done(name, qw)
                else:
                    results[name] = qw
            del batch
    return {n: results[n] for n in weights if n in results}


__all__ = ["SWEEPERS", "default_max_bytes", "e2m1_round_fast", "gptq_quantize_many", "mse_global_scale", "plan_batches",
           "unsupported"]
