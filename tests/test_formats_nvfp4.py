"""NVFP4: bit-exact agreement with comfy-kitchen, nibble order / scale layout, round trips, bad input."""

from __future__ import annotations

import pytest
import torch

from ptq.formats import (
    E2M1_MAX,
    E2M1_VALUES,
    FP8_DTYPE,
    NVFP4_BLOCK,
    FormatError,
    NibbleOrder,
    ScaleLayout,
    UnsupportedShapeError,
    check_block_multiple,
    decode_e2m1,
    dequantize_nvfp4,
    encode_e2m1,
    fake_quantize_nvfp4,
    from_tiled,
    nvfp4_block_values,
    nvfp4_global_scale,
    pack_e2m1,
    quantize_nvfp4,
    quantize_nvfp4_activation,
    tiled_shape,
    to_tiled,
    unpack_e2m1,
)

HI, LO = NibbleOrder.HIGH_FIRST, NibbleOrder.LOW_FIRST


@pytest.fixture(scope="module")
def ck():
    return pytest.importorskip("comfy_kitchen")


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _inputs(kind: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(shape, generator=g)
    if kind == "student_t":  # t with 2 degrees of freedom: heavy tails
        z = torch.randn(shape, generator=g)
        chi2 = -2.0 * torch.log(torch.rand(shape, generator=g).clamp_min(1e-12))
        return z / torch.sqrt(chi2 / 2.0)
    if kind == "outliers":
        x = torch.randn(shape, generator=g) * 0.02
        idx = torch.randint(0, x.numel(), (max(1, x.numel() // 500),), generator=g)
        x.view(-1)[idx] = torch.randn(idx.shape, generator=g) * 50.0
        return x
    raise ValueError(kind)


def _adversarial(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A [160, 64] float32 matrix of nasty blocks and the global scale to use with it (1.0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(160, 64, generator=g)
    x[3] = 0.0  # all-zero row
    x[5, 16:32] = 0.0  # all-zero block
    x[6, 0:16] = -0.0  # negative zeros only
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    up = torch.nextafter(ties, torch.tensor(9.0))
    down = torch.nextafter(ties, torch.tensor(-9.0))
    # with global 1 and block amax 6, the block scale is exactly 1.0 and x/scale is x itself
    x[7, 0:16] = torch.cat([ties, -ties])
    x[7, 16:32] = torch.cat([up, -down])
    x[7, 32:48] = torch.cat([down, -up])
    x[8, 0:16] = torch.cat([ties, -ties]) * 2.0**-5  # ties with a power-of-two scale
    x[9, 0:16] = 6.0 * 448.0  # the largest scale: exactly 448
    x[9, 16:32] = torch.linspace(-1e5, 1e5, 16)  # scale saturates at 448 -> values clip to +-6*448
    x[10, 0:16] = 1e-40  # float32 subnormals: block scale rounds to 0 in E4M3 -> zero block
    x[10, 16:32] = torch.linspace(-1, 1, 16) * 6 * 2.0**-9  # smallest E4M3 subnormal scale
    x[10, 32:48] = torch.linspace(-1, 1, 16) * 6 * 2.0**-7  # subnormal block scale 2**-7
    x[11, 0:16] = torch.tensor([6.0 * 1.0625] + [1.0] * 15)  # block scale 1.0625: E4M3 tie, rounds to 1.0
    x[11, 16:32] = torch.tensor([6.0 * 1.1875] + [0.1] * 15)  # tie between 1.125 and 1.25 -> 1.25
    x[12] = x[12] * 1e-30  # tiny but normal
    return x, torch.tensor(1.0)


KINDS = ["normal", "student_t", "outliers"]
SHAPES = [(128, 64), (256, 192), (300, 48), (16, 16)]


# ------------------------------------------------------------------------------------------------
# comfy-kitchen agreement
# ------------------------------------------------------------------------------------------------


def _assert_matches_ck(ck, x: torch.Tensor, g: torch.Tensor) -> None:
    rows, cols = x.shape
    for order, hi_first in ((HI, True), (LO, False)):
        q, s = quantize_nvfp4(x, g, order)
        cq, cs = ck.quantize_nvfp4(x, g, hi_first=hi_first)
        assert q.dtype == torch.uint8 and q.shape == (rows, cols // 2)
        assert s.dtype == FP8_DTYPE and s.shape == (rows, cols // 16)
        assert torch.equal(q, cq)
        tiled = to_tiled(s)
        assert tiled.shape == cs.shape == tiled_shape(rows, cols // 16)
        assert torch.equal(_u8(tiled), _u8(cs))
        assert torch.equal(_u8(from_tiled(cs, rows, cols // 16)), _u8(s))
        theirs32 = ck.dequantize_nvfp4(cq, g, cs, torch.float32, hi_first=hi_first)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            theirs = ck.dequantize_nvfp4(cq, g, cs, dtype, hi_first=hi_first)
            eager = dequantize_nvfp4(q, cs, g, order, ScaleLayout.TILED, dtype=dtype)  # default ck_eager
            assert eager.dtype == dtype and torch.equal(eager, theirs)
            assert torch.equal(dequantize_nvfp4(q, s, g, order, dtype=dtype, mode="ck_eager"), theirs)
            # mode="float32": ck's float32 result, rounded once to dtype
            ours = dequantize_nvfp4(q, cs, g, order, ScaleLayout.TILED, dtype=dtype, mode="float32")
            assert ours.dtype == dtype and torch.equal(ours, theirs32.to(dtype))
    # fake quantization = ck quantize + dequantize in x.dtype
    cq, cs = ck.quantize_nvfp4(x, g)
    assert torch.equal(fake_quantize_nvfp4(x, g), ck.dequantize_nvfp4(cq, g, cs, x.dtype))
    theirs32 = ck.dequantize_nvfp4(cq, g, cs, torch.float32).to(x.dtype)
    assert torch.equal(fake_quantize_nvfp4(x, g, mode="float32"), theirs32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_comfy_kitchen_random(ck, kind, shape, dtype):
    x = _inputs(kind, shape, seed=sum(shape) + len(kind)).to(dtype)
    _assert_matches_ck(ck, x, nvfp4_global_scale(x.abs().amax()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_comfy_kitchen_adversarial(ck, dtype):
    x, g = _adversarial()
    x = x.to(dtype)
    _assert_matches_ck(ck, x, g)
    _assert_matches_ck(ck, x, nvfp4_global_scale(x.abs().amax()))
    _assert_matches_ck(ck, x, torch.tensor(1e-3))  # static scale far too small: most blocks saturate
    _assert_matches_ck(ck, x[10:11], torch.tensor(1e-45))  # subnormal global scale


def test_adversarial_values_are_as_expected():
    x, g = _adversarial()
    q, s = quantize_nvfp4(x, g)
    codes = unpack_e2m1(q, HI)
    sf = s.float()
    assert (codes[3] == 0).all() and (sf[3] == 0).all()
    assert (codes[5, 16:32] == 0).all() and sf[5, 1] == 0
    assert (codes[6, 0:16] == 0).all()  # -0.0 block: scale 0 -> zero block -> +0 codes (not 8)
    # ties, scale exactly 1: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4, 6->6
    assert sf[7, 0] == 1.0
    expect = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0])
    assert torch.equal(decode_e2m1(codes[7, 0:16]), torch.cat([expect, -expect]))
    above = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 6.0])  # one float32 ulp above each tie
    below = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # one float32 ulp below
    assert torch.equal(decode_e2m1(codes[7, 16:32]), torch.cat([above, -below]))
    assert torch.equal(decode_e2m1(codes[7, 32:48]), torch.cat([below, -above]))
    assert sf[9, 0] == 448.0 and sf[9, 1] == 448.0
    assert torch.equal(decode_e2m1(codes[9, 16:32]).abs().max(), torch.tensor(6.0))
    assert sf[10, 0] == 0 and (codes[10, 0:16] == 0).all()
    assert sf[10, 1] == 2.0**-9 and sf[10, 2] == 2.0**-7
    assert sf[11, 0] == 1.0 and sf[11, 1] == 1.25  # E4M3 ties to even
    assert not torch.isnan(dequantize_nvfp4(q, s, g)).any()


def test_global_scale_zero_is_safe(ck):
    x = torch.zeros(32, 64, dtype=torch.bfloat16)
    g = nvfp4_global_scale(x.abs().amax())
    assert g.item() == 1.0
    q, s = quantize_nvfp4(x, g)
    assert (q == 0).all() and (s.float() == 0).all()
    assert torch.equal(fake_quantize_nvfp4(x, g), x)
    # comfy-kitchen with the naive global scale 0 produces NaN block scales and garbage codes
    _, cs = ck.quantize_nvfp4(x, torch.tensor(0.0))
    assert torch.isnan(cs.float()).any()
    with pytest.raises(FormatError, match="global scale > 0"):
        quantize_nvfp4(x, torch.tensor(0.0), name="w")


def test_global_scale_values():
    amax = torch.tensor([0.0, 2688.0, 1.0, 1e-40])
    g = nvfp4_global_scale(amax)
    assert g.tolist()[:2] == [1.0, 1.0]
    assert g[2].item() == (torch.tensor(1.0) / 2688.0).item()
    assert g[3].item() == torch.finfo(torch.float32).tiny


# ------------------------------------------------------------------------------------------------
# nibble order and scale layout must not be interchangeable
# ------------------------------------------------------------------------------------------------


def test_swapped_nibble_order_is_detected(ck):
    x = _inputs("normal", (256, 64), 11)
    g = nvfp4_global_scale(x.abs().amax())
    cq, cs = ck.quantize_nvfp4(x, g)  # ComfyUI default
    q_lo, _ = quantize_nvfp4(x, g, LO)
    q_hi, _ = quantize_nvfp4(x, g, HI)
    assert torch.equal(q_hi, cq)
    assert (q_lo != cq).float().mean() > 0.5
    assert torch.equal(q_lo, ck.float_utils.swap_nibbles(cq))
    # reading ComfyUI bytes with the wrong order gives a different tensor
    right = dequantize_nvfp4(cq, cs, g, HI, ScaleLayout.TILED)
    wrong = dequantize_nvfp4(cq, cs, g, LO, ScaleLayout.TILED)
    assert (right - wrong).abs().max() > 0.1 * x.abs().max()


def test_defaults_are_comfyui_order(ck):
    """Called without ``order``, every function must use ComfyUI's / comfy-kitchen's high-first packing."""
    import inspect

    import ptq.formats.nvfp4 as nvfp4_module

    x = _inputs("normal", (128, 64), 13)
    g = nvfp4_global_scale(x.abs().amax())
    cq, cs = ck.quantize_nvfp4(x, g)
    q, s = quantize_nvfp4(x, g)
    assert torch.equal(q, cq)
    codes = ck.float_utils.unpack_uint4(cq)  # ck's own unpacking, hi_first=True by default
    assert torch.equal(unpack_e2m1(cq), codes) and torch.equal(pack_e2m1(codes), cq)
    ref = ck.dequantize_nvfp4(cq, g, cs, torch.float32)
    assert torch.equal(dequantize_nvfp4(cq, cs, g, layout=ScaleLayout.TILED), ref)
    assert torch.equal(nvfp4_block_values(cq, s), nvfp4_block_values(cq, s, HI))
    assert ((nvfp4_block_values(cq, s) * g - ref).abs() <= ref.abs() * 2**-23).all()
    for fn_name in ("quantize_nvfp4", "dequantize_nvfp4", "nvfp4_block_values", "pack_e2m1", "unpack_e2m1"):
        default = inspect.signature(getattr(nvfp4_module, fn_name)).parameters["order"].default
        assert default is NibbleOrder.HIGH_FIRST, fn_name


def test_swapped_scale_layout_is_detected(ck):
    x = _inputs("student_t", (256, 64), 12)
    g = nvfp4_global_scale(x.abs().amax())
    q, s = quantize_nvfp4(x, g)
    tiled = to_tiled(s)
    assert tiled.shape == s.shape == (256, 4)  # same shape: only the values tell them apart
    assert not torch.equal(_u8(tiled), _u8(s))
    _, cs = ck.quantize_nvfp4(x, g)
    assert torch.equal(_u8(cs), _u8(tiled)) and not torch.equal(_u8(cs), _u8(s))
    right = dequantize_nvfp4(q, cs, g, HI, ScaleLayout.TILED)
    wrong = dequantize_nvfp4(q, cs, g, HI, ScaleLayout.ROW_MAJOR)
    assert not torch.equal(right, wrong)
    assert (right - x).abs().mean() < 0.5 * (wrong - x).abs().mean()


# ------------------------------------------------------------------------------------------------
# primitives and round trips
# ------------------------------------------------------------------------------------------------


def test_encode_decode_all_codes():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = decode_e2m1(codes)
    expected = torch.tensor(list(E2M1_VALUES) + [-v for v in E2M1_VALUES])
    assert torch.equal(vals, expected)
    assert torch.signbit(vals[8]) and vals[8] == 0  # code 8 is -0.0
    assert torch.equal(encode_e2m1(vals), codes)
    assert torch.equal(encode_e2m1(vals.to(torch.bfloat16)), codes)
    assert E2M1_MAX == max(E2M1_VALUES) == 6.0 and NVFP4_BLOCK == 16


def test_encode_matches_ck_on_ties_and_neighbours(ck):
    from comfy_kitchen.float_utils import _f32_to_floatx_unpacked

    pts = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
    steps = [pts]
    for direction in (9.0, -9.0):
        t = pts
        for _ in range(3):
            t = torch.nextafter(t, torch.tensor(direction))
            steps.append(t)
    grid = torch.cat(steps)
    grid = torch.cat(
        [grid, -grid, torch.linspace(-6, 6, 200001), torch.tensor([1e-45, 1e-40, 1e-30, -1e-40])]
    )
    grid = grid.clamp(-6, 6)
    assert torch.equal(encode_e2m1(grid), _f32_to_floatx_unpacked(grid.contiguous(), 2, 1))
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert decode_e2m1(encode_e2m1(ties)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert encode_e2m1(torch.tensor([7.0, -100.0])).tolist() == [7, 15]  # saturation


@pytest.mark.parametrize("order", [HI, LO])
def test_pack_unpack_round_trip(ck, order):
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (3, 7, 32), generator=g, dtype=torch.uint8)
    packed = pack_e2m1(codes, order)
    assert packed.shape == (3, 7, 16)
    assert torch.equal(unpack_e2m1(packed, order), codes)
    assert torch.equal(packed, ck.float_utils.pack_uint4(codes, hi_first=order is HI))
    everything = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(pack_e2m1(unpack_e2m1(everything, order), order), everything)
    assert unpack_e2m1(torch.tensor([0x1F], dtype=torch.uint8), order).tolist() == (
        [1, 15] if order is HI else [15, 1]
    )


@pytest.mark.parametrize("shape", [(1, 1), (128, 4), (256, 12), (300, 3), (129, 5), (3072, 192)])
def test_tiled_round_trip_and_ck(ck, shape):
    from comfy_kitchen.float_utils import from_blocked, to_blocked

    g = torch.Generator().manual_seed(shape[0])
    s = torch.randint(0, 127, shape, generator=g, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE)
    t = to_tiled(s)
    ref = to_blocked(s, flatten=False)
    assert t.dtype == FP8_DTYPE and t.shape == ref.shape == tiled_shape(*shape)
    assert torch.equal(_u8(t), _u8(ref))
    assert torch.equal(_u8(from_tiled(t, *shape)), _u8(s))
    assert torch.equal(_u8(from_tiled(t.reshape(-1), *shape)), _u8(s))  # flattened input
    assert torch.equal(_u8(from_tiled(ref, *shape)), _u8(from_blocked(ref, *shape)))
    # padding is zero
    pr, pc = tiled_shape(*shape)
    assert _u8(t).bool().sum() == _u8(s).bool().sum()
    assert pr % 128 == 0 and pc % 4 == 0


def test_block_values_and_activation_path():
    x = _inputs("outliers", (48, 96), 21)
    g = nvfp4_global_scale(x.abs().amax())
    for order in (HI, LO):
        q, s = quantize_nvfp4(x, g, order)
        v = nvfp4_block_values(q, s, order)
        assert v.dtype == torch.float32 and v.shape == x.shape
        assert torch.equal(v, nvfp4_block_values(q, to_tiled(s), order, ScaleLayout.TILED))
        assert torch.equal(v, quantize_nvfp4_activation(x, g))
        assert torch.equal(v.to(torch.bfloat16).float(), v)  # exact in bf16
        # code * scale * global in float64 is the exact value; dequantize rounds it at most once more
        exact = v.double() * g.double()
        assert ((dequantize_nvfp4(q, s, g, order).double() - exact).abs() <= exact.abs() * 2**-23).all()
    # leading dims: [..., k] is the same as its 2-D view
    x3 = x.reshape(4, 12, 96).to(torch.bfloat16)
    a3 = quantize_nvfp4_activation(x3, g)
    assert a3.shape == x3.shape and a3.dtype == torch.float32
    assert torch.equal(a3.reshape(48, 96), quantize_nvfp4_activation(x3.reshape(48, 96), g))
    f3 = fake_quantize_nvfp4(x3, g)
    assert f3.dtype == torch.bfloat16 and torch.equal(
        f3.reshape(48, 96), fake_quantize_nvfp4(x3.reshape(48, 96), g)
    )


def test_round_to_e2m1_equals_the_encoder_on_a_float32_sweep():
    """The activation path rounds values without codes: bit for bit what decode(encode(y)) gives, over every 997th
    float32 of both signs (ties, the binade edges 2 / 4, saturation, subnormals, huge values)."""
    from ptq.formats.nvfp4 import round_to_e2m1

    bits = torch.arange(0, 0x7F800000, 997, dtype=torch.int64).to(torch.int32)
    y = torch.cat([bits.view(torch.float32), -bits.view(torch.float32)])
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, -0.25, -5.0, -0.0])
    y = torch.cat([y, ties, torch.nextafter(ties, torch.full_like(ties, 9.0)),
                   torch.nextafter(ties, torch.full_like(ties, -9.0))])
    want = decode_e2m1(encode_e2m1(y))
    before = y.clone()
    got = round_to_e2m1(y)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)) and torch.equal(y, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_activation_path_equals_the_code_path_with_zero_and_tiny_blocks(dtype):
    x = _inputs("outliers", (40, 64), 5).to(dtype)
    x[0, :16] = 0  # an all-zero block
    x[1, 16:32] = 1e-7  # a block whose E4M3 scale rounds to 0
    x[2, 32:48] = -1e-7
    g = nvfp4_global_scale(x.abs().amax())
    q, s = quantize_nvfp4(x, g)
    want = nvfp4_block_values(q, s)
    before = x.clone()
    got = quantize_nvfp4_activation(x, g)
    assert torch.equal(x, before)  # the input is not touched (float32 inputs are not copied by .float())
    assert torch.equal(got, want)  # values equal; zero blocks may give -0.0 where the codes give +0.0
    assert (got[0, :16] == 0).all() and (got[1, 16:32] == 0).all() and (got[2, 32:48] == 0).all()


def test_block_values_exact_in_bf16_for_every_code_and_scale():
    """All 16 E2M1 codes x all 127 finite non-negative E4M3 scales: code*scale is exact in bf16."""
    bits = torch.arange(128, dtype=torch.int32).to(torch.uint8)  # sign bit clear
    scales = bits.view(FP8_DTYPE).float()
    scales = scales[~torch.isnan(scales)]
    assert scales.numel() == 127
    vals = decode_e2m1(torch.arange(16, dtype=torch.uint8))
    prod = (vals[:, None].double() * scales[None, :].double()).reshape(-1)
    assert torch.equal(prod.to(torch.bfloat16).double(), prod)
    assert torch.equal(prod.float().double(), prod)
    # the tensor-core products of two such values (and of two block values) are exact in float32
    nz = prod.unique()
    pair = nz[:, None] * nz[None, :]
    assert torch.equal(pair.float().double(), pair)


def test_tiny_values_in_fp8_subnormal_scales(ck):
    """Blocks whose E4M3 scale is subnormal, or rounds to zero (the block is then dropped to 0)."""
    x = torch.zeros(16, 32)
    x[0, :16] = 1000.0  # sets the global scale
    for r in range(1, 16):
        x[r, :16] = torch.linspace(-1, 1, 16) * 1000.0 * 10.0 ** (-r / 2)
        x[r, 16:] = torch.linspace(1, -1, 16) * 1000.0 * 10.0 ** (-r / 3)
    g = nvfp4_global_scale(x.abs().amax())
    _assert_matches_ck(ck, x, g)
    _, s = quantize_nvfp4(x, g)
    sf = s.float()
    assert ((sf > 0) & (sf < 2.0**-6)).any() and (sf[1:] == 0).any()


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

LAYER = "blocks.3.ffn.net.0.proj.weight"


def test_in_features_not_multiple_of_16():
    with pytest.raises(UnsupportedShapeError) as e:
        quantize_nvfp4(torch.randn(32, 40), torch.tensor(1.0), name=LAYER, fallback="falls back to FP8")
    msg = str(e.value)
    assert LAYER in msg and "40" in msg and "16" in msg and "falls back to FP8" in msg
    with pytest.raises(UnsupportedShapeError, match="keep the layer in FP8/bf16"):
        quantize_nvfp4(torch.randn(32, 40), torch.tensor(1.0), name=LAYER)
    with pytest.raises(UnsupportedShapeError, match=f"{LAYER}.*layer kept in bf16"):
        check_block_multiple(3000, 16, LAYER, "layer kept in bf16")
    check_block_multiple(3072, 16, LAYER, "layer kept in bf16")  # no error
    with pytest.raises(UnsupportedShapeError, match="activation"):
        quantize_nvfp4_activation(torch.randn(2, 3, 24), torch.tensor(1.0))
    assert issubclass(UnsupportedShapeError, FormatError) and issubclass(FormatError, ValueError)


def test_nan_inf_dtype_rank():
    x = torch.randn(16, 32)
    x[4, 17] = float("inf")
    with pytest.raises(FormatError, match=rf"{LAYER}.*1 non-finite.*\(4, 17\)"):
        quantize_nvfp4(x, torch.tensor(1.0), name=LAYER)
    with pytest.raises(FormatError, match="floating-point.*int64"):
        quantize_nvfp4(torch.ones(16, 32, dtype=torch.int64), torch.tensor(1.0), name=LAYER)
    with pytest.raises(FormatError, match="2-D.*3-D"):
        quantize_nvfp4(torch.ones(2, 16, 32), torch.tensor(1.0), name=LAYER)
    with pytest.raises(FormatError, match="non-finite"):
        encode_e2m1(torch.tensor([1.0, float("nan")]))
    with pytest.raises(FormatError, match="0..15"):
        pack_e2m1(torch.tensor([3, 16], dtype=torch.uint8))
    with pytest.raises(FormatError, match="even"):
        pack_e2m1(torch.tensor([3, 1, 2], dtype=torch.uint8))
    with pytest.raises(FormatError, match="ROW_MAJOR shape"):
        dequantize_nvfp4(
            torch.zeros(16, 8, dtype=torch.uint8), torch.zeros(16, 2, dtype=FP8_DTYPE), torch.tensor(1.0)
        )
    with pytest.raises(FormatError, match="tiles to"):
        from_tiled(torch.zeros(16, 4, dtype=FP8_DTYPE), 16, 1)


def test_nan_poisons_only_its_block_in_fake_quant():
    x = torch.randn(2, 48)
    x[1, 20] = float("nan")
    y = fake_quantize_nvfp4(x, nvfp4_global_scale(torch.tensor(5.0)))
    nan = torch.isnan(y)
    assert nan[1, 16:32].all() and nan.sum() == 16


def test_padded_shape_is_stripped(ck):
    x = torch.randn(20, 40)  # ComfyUI pads to (32, 48)
    g = nvfp4_global_scale(x.abs().amax())
    cq, cs = ck.quantize_nvfp4(x, g, pad_16x=True)
    assert cq.shape == (32, 24)
    ours = dequantize_nvfp4(cq, cs, g, HI, ScaleLayout.TILED, shape=(20, 40))
    assert ours.shape == (20, 40)
    assert torch.equal(ours, ck.dequantize_nvfp4(cq, g, cs, torch.float32)[:20, :40])
    xp = torch.nn.functional.pad(x, (0, 8, 0, 12))
    q, s = quantize_nvfp4(xp, g)
    assert torch.equal(q, cq) and torch.equal(_u8(to_tiled(s)), _u8(cs))


@pytest.mark.parametrize(("shape", "chunk"), [((640, 320), None), ((97, 320), 1000), ((33, 48), 16)])
def test_cpu_row_chunking_is_invisible(ck, monkeypatch, shape, chunk):
    """CPU code runs over row chunks (cache locality); results must equal ck's one-shot eager code."""
    import ptq.formats.fp8 as fp8_module

    if chunk is not None:
        monkeypatch.setattr(fp8_module, "CPU_CHUNK_ELEMENTS", chunk)
    else:
        assert shape[0] * shape[1] > fp8_module.CPU_CHUNK_ELEMENTS  # the default chunking kicks in
    x = _inputs("student_t", shape, 31).to(torch.bfloat16)
    x[5] = 0.0
    g = nvfp4_global_scale(x.abs().amax())
    _assert_matches_ck(ck, x, g)
    q, s = quantize_nvfp4(x, g)
    v = nvfp4_block_values(q, s)
    assert torch.equal(v, quantize_nvfp4_activation(x, g))
    assert torch.equal(v.reshape(shape[0], 1, -1), quantize_nvfp4_activation(x.reshape(shape[0], 1, -1), g))
