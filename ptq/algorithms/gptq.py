"""GPTQ for every format: error-compensating rounding with the layer's input Hessian ``H = E[x x^T]``.

Minimises ``||X W^T - X Q^T||^2`` column by column (Frantar et al., "GPTQ", 2022): column ``j`` is rounded to the
format's grid with its (fixed) scales, and its rounding error, weighted by the inverse-Hessian row
``Hinv[j, j:] / Hinv[j, j]``, is subtracted from the columns not yet rounded; updates are applied lazily in batches
of ``block_size`` columns. The scales are chosen first and kept, so the result is an ordinary NVFP4 / FP8 tensor
(same layout as round-to-nearest, nothing new for the loaders):

* NVFP4: the global scale and the per-16 block scales come from ``scales`` ("max", "mse" = float8 neighbour
  search weighted by ``diag(H)``, "four_over_six"). ``dynamic_scales=True`` (default) chooses each block's scale
  when GPTQ reaches the block's first column, from the weights as updated by the error feedback so far (GPTQ's
  "groups"); False chooses all block scales from the original weights (required for ``act_order``).
* FP8: one scale per tensor (or per output channel) from "max" or "mse" clipping; elements are rounded in float32.
  int8 the same (int8_convrot in its rotated basis: the rotated weight with the rotated Hessian ``R^T H R``).
* Other block formats (MXFP8): each block's scale chosen when GPTQ reaches it (:func:`gptq_block_scaled`).

The column rounding itself is the format's (:meth:`ptq.formats.NumberFormat.gptq_round`); the solver is chosen by the
format's weight-scale layout (:attr:`ptq.formats.NumberFormat.scale_scheme`, :data:`GPTQ_SOLVERS`): "tensor" formats
(fixed per-tensor / per-channel scales) share :func:`gptq_fixed_scale`, "block" formats :func:`gptq_block_scaled`,
NVFP4's "global_block" scales (per-16 block scales chosen on the fly) are :func:`gptq_nvfp4`. :func:`quantize_gptq`
is the weight-method entry point (``GPTQWeight``).

Memory: ``W`` and ``H`` in float32 plus ``[out, block_size]`` work buffers; a 14336x3072 layer takes ~0.5 GB.
Layer-by-layer processing with Hessians collected in several calibration passes is
:func:`ptq.algorithms.quantize.gptq_sequential_`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ptq.algorithms import weight_search as ws
from ptq.algorithms.recipe import GPTQWeight, WeightMethod
from ptq.algorithms.weight_quant import WeightContext, quantize_rtn
from ptq.formats import FP8, NVFP4, NumberFormat, QuantizedWeight
from ptq.formats import fp8 as fp8_fmt
from ptq.formats import nvfp4 as nvfp4_fmt
from ptq.formats.fp8 import FP8_DTYPE, FP8_E4M3_MAX, divide_exact
from ptq.formats.nvfp4 import E2M1_MAX, NVFP4_BLOCK

log = logging.getLogger(__name__)

GPTQ_SCALE_METHODS = ("max", "mse", "four_over_six")


def prepare_hessian(h: torch.Tensor, damp: float) -> torch.Tensor:
    """float32 copy of ``h`` with dead inputs (``H_jj == 0``: never non-zero in calibration) set to ``H_jj = 1`` and
    ``damp * mean(diag(H))`` added to the diagonal (GPTQ's dampening, relative)."""
    h = h.detach().float().clone()
    d = torch.diagonal(h)  # a view: edits below change h
    dead = d <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    d[dead] = 1.0
    d += damp * float(d.mean())
    return h


def inverse_cholesky_upper(h: torch.Tensor, damp: float = 0.01, tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1`` (GPTQ's ``Hinv``); retries with 10x more dampening if ``H`` is not
    positive definite in float32."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    extra = damp * float(torch.diagonal(h).mean())
    for attempt in range(tries):
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            up, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info2) == 0:
                return up
        log.debug("GPTQ: Hessian not positive definite (attempt %d), adding dampening", attempt)
        h = h + extra * (10.0 ** attempt) * eye
    raise RuntimeError("GPTQ: the Hessian stays singular after dampening; check the calibration data")


def _nvfp4_group_scales(cols: torch.Tensor, g: torch.Tensor, method: str, cw: torch.Tensor | None) -> torch.Tensor:
    """Block scales (float8 ``[out, 1]``) of one 16-column group ``cols [out, 16]`` for a fixed global scale."""
    if method == "max":
        return ws.nvfp4_max_scales(cols, g)
    if method == "mse":
        return ws.nvfp4_mse_scales(cols, g, col_weight=cw)[0]
    # four_over_six: the better of the x6 and x4 scales per block
    bmax = cols.float().abs().amax(-1, keepdim=True)
    best = None
    for m in (E2M1_MAX, 4.0):
        s = torch.clamp(divide_exact(bmax, m) / g, max=FP8_E4M3_MAX).to(FP8_DTYPE)
        e = ws.nvfp4_block_sse(cols, g, s, cw)
        if best is None:
            best = (s, e)
        else:
            better = e < best[1]
            best = (torch.where(better, s.view(torch.uint8), best[0].view(torch.uint8)).view(FP8_DTYPE),
                    torch.minimum(e, best[1]))
    assert best is not None
    return best[0]


def nvfp4_initial_scales(w: torch.Tensor, method: str, cw: torch.Tensor | None,
                         num_global: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(global scale float32 ``[]``, block scales float8 ``[out, in/16]``) chosen by ``method`` from the original
    weights ``w`` (``cw``: column weights, the Hessian diagonal) before the column sweep."""
    if method == "max":
        g = nvfp4_fmt.nvfp4_global_scale(w.abs().amax())
        return g, ws.nvfp4_max_scales(w, g)
    if method == "mse":
        g, s, _ = ws.search_global_and_blocks(w, num_global=num_global, col_weight=cw)
        return g, s
    if method == "four_over_six":
        return ws.nvfp4_four_over_six_scales(w, col_weight=cw)
    raise ValueError(f"GPTQ scale method {method!r}: expected one of {GPTQ_SCALE_METHODS}")


def _gptq_sweep(W: torch.Tensor, hinv: torch.Tensor, block_size: int,
                quantize_column: Callable[[int, torch.Tensor, int], torch.Tensor]) -> None:
    """GPTQ's column sweep with lazy batch updates over ``W`` (float32 ``[out, in]``, updated in place).

    ``quantize_column(j, w1, i)`` rounds column ``j`` (= ``i1 + i``; ``w1`` holds the error-updated columns of the
    current batch, ``w1[:, i]`` is column j) and returns its dequantized value ``[out]``; the rounding error,
    scaled by the inverse-Hessian row, is pushed onto the columns not yet rounded."""
    cols = W.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q = quantize_column(i1 + i, w1, i)
            e = (w1[:, i] - q) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]


@torch.no_grad()
def gptq_nvfp4(
    w: torch.Tensor,
    hessian: torch.Tensor,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    scales: str = "mse",
    dynamic_scales: bool = True,
    num_global: int = 8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ rounding of ``w [out, in]`` (in % 16 == 0) to NVFP4 given ``hessian [in, in]`` (float32, ``E[x x^T]``
    or any positive multiple). Returns ``(codes uint8 [out, in] unpacked E2M1, block_scales float8_e4m3fn
    [out, in/16], global_scale float32 [])``."""
    if scales not in GPTQ_SCALE_METHODS:
        raise ValueError(f"GPTQ scale method {scales!r}: expected one of {GPTQ_SCALE_METHODS}")
    rows, cols = w.shape
    if cols % NVFP4_BLOCK:
        raise ValueError(f"gptq_nvfp4: in_features={cols} is not a multiple of {NVFP4_BLOCK}")
    dev = w.device
    W = w.detach().float().clone()
    H = prepare_hessian(hessian.to(dev), damp)
    diag = torch.diagonal(H).clone()
    g, S = nvfp4_initial_scales(W, scales, diag, num_global)
    dynamic = dynamic_scales and not act_order
    if act_order:
        perm = torch.argsort(diag, descending=True, stable=True)
        W, H, diag = W[:, perm], H[perm][:, perm], diag[perm]
        col_group = perm // NVFP4_BLOCK
    else:
        perm = None
        col_group = torch.arange(cols, device=dev) // NVFP4_BLOCK
    hinv = inverse_cholesky_upper(H, damp)
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=dev)
    bs = max(NVFP4_BLOCK, (block_size // NVFP4_BLOCK) * NVFP4_BLOCK)
    col_group_list = col_group.tolist()

    def quantize_column(j: int, w1: torch.Tensor, i: int) -> torch.Tensor:
        if dynamic and j % NVFP4_BLOCK == 0:
            S[:, j // NVFP4_BLOCK : j // NVFP4_BLOCK + 1] = _nvfp4_group_scales(
                w1[:, i : i + NVFP4_BLOCK], g, scales, diag[j : j + NVFP4_BLOCK])
        c, value = NVFP4.gptq_round(w1[:, i], g * S[:, col_group_list[j]].float())
        codes[:, j] = c
        return value

    _gptq_sweep(W, hinv, bs, quantize_column)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, S, g


@torch.no_grad()
def gptq_fixed_scale(
    w: torch.Tensor,
    hessian: torch.Tensor,
    fmt: NumberFormat,
    scale: torch.Tensor,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> torch.Tensor:
    """GPTQ rounding of ``w [out, in]`` to ``fmt`` with a fixed float32 scale (``[]`` per tensor or ``[out, 1]``
    per output channel); returns the codes ``[out, in]`` (``fmt.gptq_round``'s dtype)."""
    rows, cols = w.shape
    dev = w.device
    W = w.detach().float().clone()
    H = prepare_hessian(hessian.to(dev), damp)
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    hinv = inverse_cholesky_upper(H, damp)
    scale = scale.to(dev)
    s_col = scale.reshape(-1) if scale.dim() else scale
    codes: torch.Tensor | None = None

    def quantize_column(j: int, w1: torch.Tensor, i: int) -> torch.Tensor:
        nonlocal codes
        c, value = fmt.gptq_round(w1[:, i], s_col)
        if codes is None:
            codes = torch.empty(rows, cols, dtype=c.dtype, device=dev)
        codes[:, j] = c
        return value

    _gptq_sweep(W, hinv, block_size, quantize_column)
    assert codes is not None
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes


@torch.no_grad()
def gptq_fp8(
    w: torch.Tensor,
    hessian: torch.Tensor,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    scales: str = "mse",
    per_channel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ rounding of ``w [out, in]`` to FP8 E4M3 with a fixed scale (``scales``: "max" = amax/448, "mse" =
    MSE-clipped; per tensor ``[]`` or per output channel ``[out, 1]``). Returns ``(codes float8_e4m3fn [out, in],
    scale float32)``; elements are rounded as ``fp8(clamp(w * (1/scale), +-448))`` in float32."""
    if scales == "mse":
        scale = ws.fp8_mse_scale(w, per_channel)
    elif scales in ("max", "four_over_six"):
        amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
        scale = fp8_fmt.fp8_scale_from_amax(amax)
    else:
        raise ValueError(f"GPTQ scale method {scales!r}: expected one of {GPTQ_SCALE_METHODS}")
    codes = gptq_fixed_scale(w, hessian, FP8, scale, damp=damp, block_size=block_size, act_order=act_order)
    return codes, scale.to(torch.float32)


@torch.no_grad()
def gptq_block_scaled(
    w: torch.Tensor,
    hessian: torch.Tensor,
    fmt: NumberFormat,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    scales: str = "mse",
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ rounding of ``w [out, in]`` to a block format with one scale per ``fmt.block_size`` inputs chosen when
    GPTQ reaches the block's first column, from the weights as updated by the error feedback so far: "max" takes the
    format's round-to-nearest scale, "mse" (and "four_over_six") the candidate of
    :meth:`~ptq.formats.NumberFormat.block_scale_candidates` with the smallest ``diag(H)``-weighted squared error.
    Returns ``(codes [out, in], stored block scales [out, in/block])``."""
    bsz = fmt.block_size
    assert bsz is not None
    rows, cols = w.shape
    dev = w.device
    W = w.detach().float().clone()
    H = prepare_hessian(hessian.to(dev), damp)
    diag = torch.diagonal(H).clone()
    hinv = inverse_cholesky_upper(H, damp)
    codes = torch.empty(rows, cols, dtype=fmt.storage_dtype, device=dev)
    stored: list[torch.Tensor] = []
    value = torch.empty(rows, 1, device=dev)

    def quantize_column(j: int, w1: torch.Tensor, i: int) -> torch.Tensor:
        if j % bsz == 0:
            s, v = _choose_block_scale(fmt, w1[:, i : i + bsz], diag[j : j + bsz], scales)
            stored.append(s)
            value.copy_(v.reshape(rows, 1))
        c, q = fmt.gptq_round(w1[:, i], value[:, 0])
        codes[:, j] = c
        return q

    _gptq_sweep(W, hinv, max(bsz, (block_size // bsz) * bsz), quantize_column)
    return codes, torch.stack(stored, dim=1)


def _choose_block_scale(fmt: NumberFormat, cols: torch.Tensor, cw: torch.Tensor, method: str
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored scale [out], element scale [out]) of one block of columns ``cols [out, block]``."""
    cands = fmt.block_scale_candidates(cols)
    if method == "max" or len(cands) == 1:
        return cands[0]
    best_s, best_v = cands[0]
    best_e = None
    for s, v in cands:
        _, q = fmt.gptq_round(cols, v.unsqueeze(-1))
        e = ((q - cols).pow(2) * cw).sum(-1)
        if best_e is None:
            best_e = e
            continue
        better = e < best_e
        best_s, best_v = torch.where(better, s, best_s), torch.where(better, v, best_v)
        best_e = torch.minimum(e, best_e)
    return best_s, best_v


def tensor_scale_weight(w: torch.Tensor, fmt: NumberFormat, cfg: GPTQWeight, name: str) -> QuantizedWeight:
    """Round-to-nearest of ``w`` on the scales GPTQ keeps for a "tensor" scheme format (``cfg.scales``; Four-over-Six,
    a block-scale idea, takes the amax scale there)."""
    scales = "max" if cfg.scales == "four_over_six" else cfg.scales
    return quantize_rtn(w, fmt, WeightMethod(scales=scales, fp8_per_channel=cfg.fp8_per_channel), WeightContext(name))


def _gptq_global_block(w: torch.Tensor, fmt: NumberFormat, cfg: GPTQWeight, ctx: WeightContext) -> QuantizedWeight:
    """"global_block" (NVFP4): global scale first, block scales chosen on the fly (:func:`gptq_nvfp4`)."""
    codes, s, g = gptq_nvfp4(w, ctx.hessian, damp=cfg.damp, block_size=cfg.block_size, scales=cfg.scales)
    return fmt.from_codes(codes, s, g, ctx.name)


def _gptq_block(w: torch.Tensor, fmt: NumberFormat, cfg: GPTQWeight, ctx: WeightContext) -> QuantizedWeight:
    """"block": each block's scale picked among the format's candidates on the fly (:func:`gptq_block_scaled`)."""
    codes, s = gptq_block_scaled(w, ctx.hessian, fmt, damp=cfg.damp, block_size=cfg.block_size, scales=cfg.scales)
    return fmt.from_codes(codes, s, None, ctx.name)


def _gptq_tensor(w: torch.Tensor, fmt: NumberFormat, cfg: GPTQWeight, ctx: WeightContext) -> QuantizedWeight:
    """"tensor": the round-to-nearest scales (:func:`tensor_scale_weight`), then :func:`gptq_fixed_scale` in the
    basis the format stores its codes in (:meth:`~ptq.formats.NumberFormat.code_domain`: rotated for ConvRot)."""
    initial = tensor_scale_weight(w, fmt, cfg, ctx.name)
    w_c, h_c = fmt.code_domain(w, ctx.hessian)
    assert h_c is not None
    codes = gptq_fixed_scale(w_c, h_c, fmt, initial.scale, damp=cfg.damp, block_size=cfg.block_size)
    return fmt.from_codes(codes, initial.scale, initial.scale_2, ctx.name)


GPTQSolver = Callable[[torch.Tensor, NumberFormat, GPTQWeight, WeightContext], QuantizedWeight]
#: GPTQ by the format's weight-scale layout (:attr:`~ptq.formats.NumberFormat.scale_scheme`).
GPTQ_SOLVERS: dict[str, GPTQSolver] = {
    "global_block": _gptq_global_block,
    "block": _gptq_block,
    "tensor": _gptq_tensor,
}


def quantize_gptq(w: torch.Tensor, fmt: NumberFormat, cfg: GPTQWeight, ctx: WeightContext) -> QuantizedWeight:
    """The ``GPTQWeight`` method: the solver of :data:`GPTQ_SOLVERS` for ``fmt.scale_scheme`` (activation-aware:
    on the least-squares target :func:`quantized_input_target`)."""
    if ctx.hessian is None:
        raise ValueError(f"{ctx.name}: weight method 'gptq' needs the layer's input Hessian (calibrate with "
                         "LinearInputObserver(hessian=True) and pass hessians= to quantize_)")
    solver = GPTQ_SOLVERS.get(fmt.scale_scheme)
    if solver is None:
        raise ValueError(f"{ctx.name}: GPTQ has no solver for format {fmt.name!r} (scale_scheme="
                         f"{fmt.scale_scheme!r}; known: {', '.join(GPTQ_SOLVERS)})")
    fmt.check_weight(w, ctx.weight_name)
    if cfg.act_aware:
        if ctx.input_cross is None:
            raise ValueError(f"{ctx.name}: activation-aware GPTQ needs the quantized-input statistics (H_qq as the "
                             "hessian, H_xq as input_cross: ptq.algorithms.quantize.gptq_act_aware_)")
        w = quantized_input_target(w, ctx.hessian, ctx.input_cross)
    return solver(w, fmt, cfg, ctx)


#: Ridge of the least-squares target, relative to each diagonal entry of ``H_qq`` (scale invariant: GPTQ's
#: dampening relative to the mean diagonal would shrink the weights of small input channels).
TARGET_RIDGE = 1e-3


def quantized_input_target(w: torch.Tensor, h_qq: torch.Tensor, h_xq: torch.Tensor) -> torch.Tensor:
    """float32 ``[out, in]``: the weight ``V`` minimising ``E||x W^T - q(x) V^T||^2`` for the layer's runtime input
    quantizer ``q``: ``V^T = (H_qq + r diag(H_qq))^-1 H_xq^T W^T`` with ``H_qq = E[q(x)^T q(x)]``, ``H_xq =
    E[x^T q(x)]`` and ridge ``r`` = :data:`TARGET_RIDGE` (inputs never non-zero keep their weight). GPTQ then
    rounds ``V`` with ``H_qq``: the part of the activation rounding error that other input channels predict
    linearly is compensated in the weights."""
    d = torch.diagonal(h_qq).double()
    live = d > 0
    h = h_qq.double()[live][:, live]
    h = h + TARGET_RIDGE * torch.diag(d[live])
    v = w.double().clone()
    rhs = h_xq.double()[:, live].t() @ w.double().t()  # [live, out]
    v[:, live] = torch.linalg.solve(h, rhs).t()
    return v.to(torch.float32)


def layer_output_error(w: torch.Tensor, w_q: torch.Tensor, hessian: torch.Tensor) -> float:
    """``trace((W - Q) H (W - Q)^T)``: the mean squared layer-output error ``E||x (W - Q)^T||^2`` for
    ``H = E[x x^T]`` (float)."""
    d = (w.float() - w_q.float())
    return float(((d @ hessian.float()) * d).sum())


__all__ = [
    "GPTQ_SCALE_METHODS",
    "GPTQ_SOLVERS",
    "gptq_block_scaled",
    "gptq_fixed_scale",
    "gptq_fp8",
    "gptq_nvfp4",
    "inverse_cholesky_upper",
    "layer_output_error",
    "nvfp4_initial_scales",
    "prepare_hessian",
    "quantize_gptq",
    "quantized_input_target",
    "tensor_scale_weight",
]
