"""FP8 E4M3: bit-exact agreement with comfy-kitchen, round trips, edge cases, error messages."""

from __future__ import annotations

import pytest
import torch

from ptq.formats import (
    FORMATS,
    FP8_DTYPE,
    FP8_E4M3_MAX,
    FP8_SCALE_FOR_ZERO,
    FormatError,
    dequantize_fp8,
    fake_quantize_fp8,
    fp8_scale_from_amax,
    get_format,
    quantize_fp8,
    quantize_fp8_weight,
)


@pytest.fixture(scope="module")
def ck():
    return pytest.importorskip("comfy_kitchen")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _inputs(kind: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(shape, generator=g)
    if kind == "student_t":  # heavy tails: t with 2 degrees of freedom = normal / sqrt(chi2_2 / 2)
        z = torch.randn(shape, generator=g)
        chi2 = -2.0 * torch.log(torch.rand(shape, generator=g).clamp_min(1e-12))
        return z / torch.sqrt(chi2 / 2.0)
    if kind == "outliers":
        x = torch.randn(shape, generator=g) * 0.02
        idx = torch.randint(0, x.numel(), (max(1, x.numel() // 500),), generator=g)
        x.view(-1)[idx] = torch.randn(idx.shape, generator=g) * 50.0
        return x
    raise ValueError(kind)


KINDS = ["normal", "student_t", "outliers"]
SHAPES = [(128, 64), (256, 192), (300, 48)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ------------------------------------------------------------------------------------------------
# comfy-kitchen agreement
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_comfy_kitchen(ck, kind, shape, dtype):
    x = _inputs(kind, shape, seed=sum(shape) + len(kind)).to(dtype)
    for scale in (fp8_scale_from_amax(x.abs().amax()), fp8_scale_from_amax(x.abs().amax()) * 0.3):
        # default mode "ck_eager": ck's eager backend bit for bit, whatever the input dtype
        eager = quantize_fp8(x, scale)
        theirs = ck.quantize_per_tensor_fp8(x, scale)
        assert eager.dtype == FP8_DTYPE and eager.shape == x.shape
        assert torch.equal(_bytes(eager), _bytes(theirs))
        assert torch.equal(_bytes(quantize_fp8(x, scale, mode="ck_eager")), _bytes(theirs))
        # "float32" (ck's CUDA backend) = the product in float32 = ck eager on the exactly widened input
        ours32 = quantize_fp8(x, scale, mode="float32")
        theirs32 = ck.quantize_per_tensor_fp8(x.float(), scale)
        assert torch.equal(_bytes(ours32), _bytes(theirs32))
        # default dequantization: float32 product, one rounding (= ck eager for float32 output)
        dq = dequantize_fp8(eager, scale, torch.float32)
        assert torch.equal(dq, ck.dequantize_per_tensor_fp8(theirs, scale, torch.float32))
        assert torch.equal(fake_quantize_fp8(x, scale), dq.to(dtype))
        dq32 = ck.dequantize_per_tensor_fp8(theirs32, scale, torch.float32)
        assert torch.equal(fake_quantize_fp8(x, scale, mode="float32"), dq32.to(dtype))
        assert torch.equal(
            dequantize_fp8(theirs, scale, dtype, mode="ck_eager"),
            ck.dequantize_per_tensor_fp8(theirs, scale, dtype),
        )


def test_quantize_matches_comfy_kitchen_adversarial(ck):
    s = torch.tensor(0.5)
    grid = torch.tensor(
        [
            0.0,
            -0.0,
            448.0,
            -448.0,
            464.0,
            479.0,
            480.0,
            1e6,
            -1e6,
            2.0**-9,
            2.0**-10,
            2.0**-11,
            3 * 2.0**-11,
            1.0625,
            1.0625 + 2**-20,
            1.0625 - 2**-20,
            1e-40,
            -1e-40,
        ]
    )
    for x in (grid * 0.5, grid, torch.nextafter(grid, torch.tensor(float("inf")))):
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            theirs = ck.quantize_per_tensor_fp8(xd, s)
            assert torch.equal(_bytes(quantize_fp8(xd, s, mode="ck_eager")), _bytes(theirs))
            assert torch.equal(_bytes(quantize_fp8(xd, s)), _bytes(theirs))
            theirs32 = ck.quantize_per_tensor_fp8(xd.float(), s)
            assert torch.equal(_bytes(quantize_fp8(xd, s, mode="float32")), _bytes(theirs32))
    big = torch.tensor([500.0, -1e30, 448.0 * 0.5])
    assert torch.equal(quantize_fp8(big, s).float(), torch.tensor([448.0, -448.0, 448.0]))


def test_reciprocal_intermediate_is_what_ck_does(ck):
    """ck (eager, and CUDA) multiplies by fl(1/scale); exact division differs at crafted midpoints."""
    scale = torch.tensor(7.0)  # fl(1/7) is rounded up
    x = torch.tensor([10.9375])  # x/7 == 1.5625 exactly: the midpoint between FP8 1.5 and 1.625
    recip = quantize_fp8(x, scale, mode="float32")
    exact = quantize_fp8(x, scale, mode="divide")
    assert recip.float().item() == 1.625  # x * fl(1/7) lands just above the midpoint
    assert exact.float().item() == 1.5  # exact tie -> even mantissa
    assert torch.equal(_bytes(recip), _bytes(ck.quantize_per_tensor_fp8(x, scale)))
    assert torch.equal(_bytes(recip), _bytes(quantize_fp8(x, scale)))


def test_bf16_intermediate_of_ck_eager(ck):
    """For bf16 input ck eager computes x*(1/s) in bf16; the default mode matches it, mode="float32"
    (= ck's CUDA backend, measured on an H100) differs from it by one FP8 step in a few % of elements."""
    x = _inputs("normal", (256, 256), 3).to(torch.bfloat16)
    s = fp8_scale_from_amax(x.abs().amax())
    eager, ours, exact = (quantize_fp8(x, s, mode=m) for m in ("ck_eager", "float32", "divide"))
    assert torch.equal(_bytes(quantize_fp8(x, s)), _bytes(eager))
    assert torch.equal(_bytes(eager), _bytes(ck.quantize_per_tensor_fp8(x, s)))
    frac = (_bytes(ours) != _bytes(eager)).float().mean().item()
    assert 0.001 < frac < 0.1
    assert ((ours.float() - eager.float()).abs() <= ours.float().abs() * 2**-3 + 2**-9).all()
    # for bf16 inputs (8 significant bits) the float32 reciprocal and exact division agree here
    assert torch.equal(_bytes(ours), _bytes(exact))


def test_dequantize_bf16_rounds_once(ck):
    """Default = (q.float()*s).to(bf16) (one rounding, ck CUDA/Triton); ck eager rounds twice."""
    x = _inputs("normal", (128, 128), 4)
    s = torch.tensor(0.0123)
    q = quantize_fp8(x, s)
    ours = dequantize_fp8(q, s, torch.bfloat16)
    assert torch.equal(ours, (q.to(torch.float64) * s.double()).to(torch.float32).to(torch.bfloat16))
    eager = ck.dequantize_per_tensor_fp8(q, s, torch.bfloat16)
    diff = (ours.float() - eager.float()).abs()
    assert (diff > 0).any()  # known difference: ck eager does q.to(bf16) * s.to(bf16) in bf16
    assert (diff <= ours.float().abs() * 2**-7).all()  # ... by at most about one bf16 ulp
    assert torch.equal(dequantize_fp8(q, s, torch.bfloat16, mode="ck_eager"), eager)


def test_per_channel_equals_per_row_ck(ck):
    w = _inputs("student_t", (64, 96), 5).to(torch.bfloat16)
    w[7] = 0.0  # an all-zero row
    q, scale = quantize_fp8_weight(w, per_channel=True)
    assert scale.shape == (64, 1) and scale.dtype == torch.float32
    assert scale[7].item() == FP8_SCALE_FOR_ZERO
    amax = w.float().abs().amax(dim=1, keepdim=True)
    nz = amax[:, 0] > 0
    assert torch.equal(scale[nz], amax[nz] / 448.0)
    q32, _ = quantize_fp8_weight(w, per_channel=True, mode="float32")
    for r in range(w.shape[0]):
        assert torch.equal(_bytes(q[r]), _bytes(ck.quantize_per_tensor_fp8(w[r], scale[r, 0])))
        assert torch.equal(_bytes(q32[r]), _bytes(ck.quantize_per_tensor_fp8(w[r].float(), scale[r, 0])))
    assert torch.equal(q[7].float(), torch.zeros(96))


def test_per_tensor_weight(ck):
    w = _inputs("outliers", (96, 64), 6)
    q, scale = quantize_fp8_weight(w)
    assert scale.shape == () and scale.item() == (w.abs().amax() / 448.0).item()
    assert q.float().abs().max().item() == FP8_E4M3_MAX  # amax maps exactly onto 448
    assert torch.equal(_bytes(q), _bytes(ck.quantize_per_tensor_fp8(w, scale)))


# ------------------------------------------------------------------------------------------------
# round trips and scales
# ------------------------------------------------------------------------------------------------


def _all_finite_fp8() -> torch.Tensor:
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    q = bits.view(FP8_DTYPE)
    return q[~torch.isnan(q.float())]


def test_all_fp8_bit_patterns_round_trip():
    q = _all_finite_fp8()
    assert q.numel() == 254  # 0x7F and 0xFF are the NaNs of E4M3FN; there is no Inf
    for scale in (torch.tensor(1.0), torch.tensor(2.0**-7), torch.tensor(8.0)):
        x = dequantize_fp8(q, scale)
        assert torch.equal(_bytes(quantize_fp8(x, scale)), _bytes(q))
        for mode in ("divide", "ck_eager"):
            assert torch.equal(_bytes(quantize_fp8(x, scale, mode=mode)), _bytes(q))
        xb = dequantize_fp8(q, scale, torch.bfloat16)  # every E4M3 value is exact in bf16
        assert torch.equal(xb.float(), x)


def test_fp8_value_grid():
    vals = _all_finite_fp8().float()
    pos = vals[vals > 0].unique()
    assert pos.max().item() == 448.0 and pos.min().item() == 2.0**-9 and pos.numel() == 126


def test_scale_from_amax():
    amax = torch.tensor([[0.0], [448.0], [1.0], [1e-40], [3e38]])
    s = fp8_scale_from_amax(amax)
    assert s.dtype == torch.float32 and s.shape == amax.shape
    assert s[0].item() == 1.0 and s[1].item() == 1.0
    assert s[2].item() == (torch.tensor(1.0) / 448.0).item()
    assert s[3].item() == torch.finfo(torch.float32).tiny  # reciprocal stays finite
    assert torch.isfinite(1.0 / s).all() and (s > 0).all()
    assert fp8_scale_from_amax(torch.tensor(0.0, dtype=torch.bfloat16)).item() == 1.0
    with pytest.raises(FormatError, match="amax"):
        fp8_scale_from_amax(torch.tensor(float("nan")))
    with pytest.raises(FormatError, match=">= 0"):
        fp8_scale_from_amax(torch.tensor(-1.0))


def test_zero_tensor_gives_zero_not_nan(ck):
    w = torch.zeros(16, 32, dtype=torch.bfloat16)
    q, s = quantize_fp8_weight(w)
    assert s.item() == 1.0 and torch.equal(q.float(), torch.zeros(16, 32))
    assert torch.equal(fake_quantize_fp8(w, s), w)
    # comfy-kitchen's own recalculated scale would be 0 and give NaN: the reason for the zero-safe scale
    assert torch.isnan(ck.quantize_per_tensor_fp8(w.float(), torch.tensor(0.0)).float()).all()


def test_fake_quantize_fp8_shapes_and_saturation():
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    s = torch.tensor(0.001)
    y = fake_quantize_fp8(x, s)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert y.float().abs().max().item() == pytest.approx(448 * 0.001, rel=1e-2)
    assert torch.isnan(fake_quantize_fp8(torch.tensor([1.0, float("nan")]), torch.tensor(1.0))).tolist() == [
        False,
        True,
    ]


def test_format_registry():
    assert set(FORMATS) == {"fp8", "nvfp4", "int8", "int8_convrot", "mxfp8", "convrot_w4a4", "convrot_w4a8"}
    assert get_format("fp8").weight_bits == 8.0 and get_format("fp8").block_size is None
    assert get_format("fp8").storage_dtype == torch.float8_e4m3fn
    nv = get_format("nvfp4")
    assert nv.weight_bits == 4.5 and nv.block_size == 16 and nv.storage_dtype == torch.uint8
    with pytest.raises(ValueError, match="fp8, int8, int8_convrot, mxfp8, nvfp4"):
        get_format("int4")


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

LAYER = "blocks.3.ffn.net.0.proj.weight"


def test_nan_and_inf_raise_with_name_count_and_index():
    w = torch.randn(8, 16)
    w[2, 5] = float("nan")
    w[6, 1] = float("inf")
    w[7, 0] = float("nan")
    with pytest.raises(FormatError) as e:
        quantize_fp8_weight(w, name=LAYER)
    msg = str(e.value)
    assert LAYER in msg and "3 non-finite" in msg and "2 NaN" in msg and "1 Inf" in msg and "(2, 5)" in msg
    with pytest.raises(FormatError, match=LAYER):
        quantize_fp8(w, torch.tensor(1.0), name=LAYER)


def test_wrong_dtype_rank_and_scale():
    with pytest.raises(FormatError, match="floating-point.*int32"):
        quantize_fp8_weight(torch.ones(4, 4, dtype=torch.int32), name=LAYER)
    with pytest.raises(FormatError, match="2-D.*3-D"):
        quantize_fp8_weight(torch.ones(2, 4, 4), per_channel=True, name=LAYER)
    with pytest.raises(FormatError, match=r"\[4, 1\]"):
        quantize_fp8(torch.ones(4, 8), torch.ones(8, 1), name=LAYER)
    with pytest.raises(FormatError, match="> 0"):
        quantize_fp8(torch.ones(4, 8), torch.tensor(0.0), name=LAYER)
    with pytest.raises(FormatError, match="float8_e4m3fn"):
        dequantize_fp8(torch.ones(4, 8), torch.tensor(1.0))
    with pytest.raises(ValueError, match="ck_eager"):
        quantize_fp8(torch.ones(4, 8), torch.tensor(1.0), mode="bf16")
    with pytest.raises(FormatError, match="torch.Tensor"):
        quantize_fp8([1.0, 2.0], torch.tensor(1.0))  # type: ignore[arg-type]


@pytest.mark.parametrize(("shape", "chunk"), [((640, 320), None), ((97, 320), 1000), ((33, 48), 16)])
def test_cpu_row_chunking_is_invisible(ck, monkeypatch, shape, chunk):
    """CPU code runs over row chunks (cache locality); results must equal ck's one-shot eager code."""
    import ptq.formats.fp8 as fp8_module

    if chunk is not None:
        monkeypatch.setattr(fp8_module, "CPU_CHUNK_ELEMENTS", chunk)
    else:
        assert shape[0] * shape[1] > fp8_module.CPU_CHUNK_ELEMENTS
    for dtype in (torch.float32, torch.bfloat16):
        x = _inputs("outliers", shape, 32).to(dtype)
        s = fp8_scale_from_amax(x.abs().amax())
        theirs = ck.quantize_per_tensor_fp8(x.float(), s)
        assert torch.equal(_bytes(quantize_fp8(x, s, mode="float32")), _bytes(theirs))
        assert torch.equal(_bytes(quantize_fp8(x.reshape(-1), s, mode="float32")), _bytes(theirs.reshape(-1)))
        assert torch.equal(fake_quantize_fp8(x, s, mode="float32"), (theirs.float() * s).to(dtype))
        eager = ck.quantize_per_tensor_fp8(x, s)
        assert torch.equal(_bytes(quantize_fp8(x, s)), _bytes(eager))
        assert torch.equal(_bytes(quantize_fp8(x.reshape(-1), s)), _bytes(eager.reshape(-1)))  # 1-D
        assert torch.equal(fake_quantize_fp8(x, s), (eager.float() * s).to(dtype))
        q, sc = quantize_fp8_weight(x, per_channel=True)
        ref = torch.stack([_bytes(ck.quantize_per_tensor_fp8(x[r], sc[r, 0])) for r in range(shape[0])])
        assert torch.equal(_bytes(q), ref)
        assert torch.equal(fake_quantize_fp8(x, sc), (q.float() * sc).to(dtype))
        exact = quantize_fp8(x, sc, mode="divide")
        assert torch.equal(_bytes(exact), _bytes(torch.clamp(x.float() / sc, -448, 448).to(FP8_DTYPE)))
