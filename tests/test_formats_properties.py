"""Property tests (hypothesis) for the FP8 / NVFP4 formats: derived error bounds and invariants.

Error bounds used below (u = |x| / (global * s8) is the element in units of its block's scale):

* NVFP4, element in range (u <= 6): E2M1 neighbours are 0.5 apart below 2, 1 apart in [2, 4) and 2 apart
  in [4, 6], so round-to-nearest errs by at most h(u) = 0.25 / 0.5 / 1.0 code units, i.e.
  ``|x - deq| <= h(u) * global * s8``.
* NVFP4, element beyond 6 (only possible because the block scale s = amax/6/global was rounded *down* to
  s8 in E4M3): the code saturates at 6 and the error is ``|x| - 6*global*s8 <= 6*global*(s - s8)
  <= 3 * global * ulp8(s)``, with ulp8(v) = 2**(max(floor(log2 v), -6) - 3) the E4M3 spacing at v
  (subnormal spacing 2**-9 below 2**-6). This also covers a block whose scale rounds to 0.
* The E4M3 scale itself obeys ``|s8 - min(s, 448)| <= ulp8(min(s, 448)) / 2``.
* FP8, per channel: with y = |w| / scale <= 448, ``|w - q*scale| <= scale * ulp8(y) / 2`` plus the
  rounding of the intermediate ``w * fl(1/scale)`` (relative 2**-23 in float32; in mode "ck_eager" with bf16 inputs the
  reciprocal and the product are rounded to bf16, unit roundoff u = 2**-8 each, relative <= 2u + u**2).
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptq.formats import (
    FP8_DTYPE,
    FP8_MODES,
    NibbleOrder,
    dequantize_fp8,
    dequantize_nvfp4,
    encode_e2m1,
    fake_quantize_fp8,
    fake_quantize_nvfp4,
    from_tiled,
    nvfp4_block_values,
    nvfp4_global_scale,
    pack_e2m1,
    quantize_fp8_weight,
    quantize_nvfp4,
    to_tiled,
    unpack_e2m1,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ulp8(v: torch.Tensor) -> torch.Tensor:
    """E4M3 spacing at magnitude v (float64)."""
    e = torch.floor(torch.log2(v.clamp_min(2.0**-30))).clamp_min(-6)
    return torch.exp2(e - 3)


def h_code(u: torch.Tensor) -> torch.Tensor:
    """Half the E2M1 spacing around u in [0, 6]."""
    return torch.where(u < 2, 0.25, torch.where(u < 4, 0.5, 1.0)).to(torch.float64)


@st.composite
def block_matrices(draw):
    """[rows, 16*nb] float32 with per-block magnitudes spanning ~1e-12..1e12, zero blocks, special values."""
    rows = draw(st.integers(1, 4))
    nb = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    exps = draw(st.lists(st.integers(-40, 40), min_size=rows * nb, max_size=rows * nb))
    zero = draw(st.lists(st.booleans(), min_size=rows * nb, max_size=rows * nb))
    dist = draw(st.sampled_from(["normal", "uniform", "spiky"]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows * nb, 16, generator=g, dtype=torch.float64)
    if dist == "uniform":
        x = torch.rand(rows * nb, 16, generator=g, dtype=torch.float64) * 2 - 1
    elif dist == "spiky":
        x = x * 1e-3
        x[:, 0] = 1.0
    x = x * torch.tensor([2.0 ** (e * 0.7) for e in exps], dtype=torch.float64)[:, None]
    x[torch.tensor(zero)] = 0.0
    specials = draw(st.lists(st.floats(-1e6, 1e6, width=32), max_size=4))
    x = x.to(torch.float32).reshape(rows, nb * 16)
    for i, v in enumerate(specials):
        x.view(-1)[(i * 37) % x.numel()] = v
    return x


def _check_nvfp4_bound(x: torch.Tensor, gs: torch.Tensor, q: torch.Tensor, s8: torch.Tensor) -> None:
    rows, cols = x.shape
    g = gs.double()
    xd = x.double().reshape(rows, -1, 16)
    deq = (nvfp4_block_values(q, s8).double() * g).reshape(rows, -1, 16)
    assert torch.isfinite(deq).all()
    sf = s8.double()
    amax = xd.abs().amax(-1)
    s = amax / 6.0 / g  # the exact block scale
    s_c = s.clamp(max=448.0)
    # the E4M3 block scale is s rounded to nearest (relative slack for the float32 divisions)
    assert ((sf - s_c).abs() <= ulp8(s_c) / 2 + s_c * 2.0**-21).all()
    err = (deq - xd).abs()
    unit = (g * sf)[..., None]
    u = torch.where(unit > 0, xd.abs() / unit, torch.full_like(xd, math.inf))
    slack = xd.abs() * 2.0**-20 + unit * 2.0**-20 + 1e-300
    in_range = u <= 6.0
    bound_round = h_code(u.clamp(max=6.0)) * unit
    assert (err[in_range] <= bound_round[in_range] + slack[in_range]).all()
    not_saturated = (s <= 448.0)[..., None].expand_as(xd)
    clip = ~in_range & not_saturated
    bound_clip = (3.0 * g * ulp8(s))[..., None].expand_as(xd)
    assert (err[clip] <= bound_clip[clip] + slack[clip]).all()
    # saturated blocks (static scale too small): out-of-range elements land exactly on +-6*448*global
    sat = ~in_range & ~not_saturated
    assert torch.equal(deq[sat].abs(), torch.full_like(deq[sat], 6 * 448.0) * g)
    # all-zero blocks give zero scales and +0 codes, never NaN
    zb = amax == 0
    assert (sf[zb] == 0).all() and (deq[zb] == 0).all()
    assert (unpack_e2m1(q, NibbleOrder.HIGH_FIRST).reshape(rows, -1, 16)[zb] == 0).all()


@SETTINGS
@given(block_matrices())
def test_nvfp4_error_bound_with_tensor_global_scale(x):
    gs = nvfp4_global_scale(x.abs().amax())
    q, s8 = quantize_nvfp4(x, gs)
    _check_nvfp4_bound(x, gs, q, s8)
    # dequantize (ck order) differs from the exact code*scale*global by at most one float32 rounding
    exact = nvfp4_block_values(q, s8).double() * gs.double()
    assert ((dequantize_nvfp4(q, s8, gs).double() - exact).abs() <= exact.abs() * 2.0**-23).all()


@SETTINGS
@given(block_matrices(), st.floats(0.01, 8.0))
def test_nvfp4_error_bound_with_static_global_scale(x, factor):
    """Activation-style: a calibrated global scale that may be too small (blocks saturate) or too large."""
    gs = nvfp4_global_scale(x.abs().amax()) * torch.tensor(factor, dtype=torch.float32)
    q, s8 = quantize_nvfp4(x, gs)
    _check_nvfp4_bound(x, gs, q, s8)
    fq = fake_quantize_nvfp4(x, gs)
    assert torch.equal(fq, dequantize_nvfp4(q, s8, gs))


@SETTINGS
@given(block_matrices())
def test_nvfp4_bf16_inputs(x):
    xb = x.to(torch.bfloat16)
    gs = nvfp4_global_scale(xb.abs().amax())
    q, s8 = quantize_nvfp4(xb, gs)
    _check_nvfp4_bound(xb.float(), gs, q, s8)
    assert torch.equal(fake_quantize_nvfp4(xb, gs), dequantize_nvfp4(q, s8, gs, dtype=torch.bfloat16))


@SETTINGS
@given(block_matrices(), st.sampled_from([torch.float32, torch.bfloat16]), st.sampled_from(FP8_MODES))
def test_fp8_per_channel_error_bound(x, dtype, mode):
    w = x.to(dtype)
    q, scale = quantize_fp8_weight(w, per_channel=True, mode=mode)
    assert q.dtype == FP8_DTYPE and scale.shape == (w.shape[0], 1)
    wd = w.double()
    sd = scale.double()
    deq = q.double() * sd
    assert torch.isfinite(deq).all()
    y = wd.abs() / sd
    bf16_math = dtype == torch.bfloat16 and mode == "ck_eager"
    rel = 2.0**-7 + 2.0**-15 if bf16_math else 2.0**-22  # two roundings: 2u + u^2
    assert (y <= 448.0 * (1 + 2.0**-20)).all()
    bound = sd * (ulp8(y * (1 + rel)) / 2 + y * rel) + 1e-300
    assert ((deq - wd).abs() <= bound).all()
    zero_rows = wd.abs().amax(1) == 0
    assert (scale[zero_rows] == 1.0).all() and (deq[zero_rows] == 0).all()
    # rows reach the top of the FP8 range (amax maps onto +-448), except all-zero rows and rows so tiny
    # (amax < 448 * 2**-126) that their scale was raised to the smallest normal float32
    normal = wd.abs().amax(1) / 448.0 >= torch.finfo(torch.float32).tiny
    top = q.float().abs().amax(1)
    assert (top[normal] >= 416.0).all()
    if not bf16_math:
        assert (top[normal] == 448.0).all()
    # static fake quantization = quantize (same mode) + the default dequantization, in w.dtype
    q_t, s_t = quantize_fp8_weight(w, mode=mode)
    assert torch.equal(fake_quantize_fp8(w, s_t, mode=mode), dequantize_fp8(q_t, s_t, dtype))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=64))
def test_encode_matches_ck_on_any_float(vals):
    from comfy_kitchen.float_utils import _f32_to_floatx_unpacked

    x = torch.tensor(vals, dtype=torch.float32).clamp(-6, 6)
    assert torch.equal(encode_e2m1(x), _f32_to_floatx_unpacked(x, 2, 1))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(1, 20), st.integers(0, 2**31 - 1), st.sampled_from(list(NibbleOrder)))
def test_pack_round_trip(lead, pairs, seed, order):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (lead, 2 * pairs), generator=g, dtype=torch.uint8)
    packed = pack_e2m1(codes, order)
    assert packed.shape == (lead, pairs)
    assert torch.equal(unpack_e2m1(packed, order), codes)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 13), st.integers(0, 2**31 - 1))
def test_tiled_round_trip(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.int32).to(torch.uint8)
    t = to_tiled(s)
    assert t.shape == (-(-rows // 128) * 128, -(-cols // 4) * 4)
    assert torch.equal(from_tiled(t, rows, cols), s)
    assert int(t.sum()) == int(s.sum())  # padding is zeros, nothing lost or duplicated
