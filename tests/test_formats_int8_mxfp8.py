"""int8 (ComfyUI int8_tensorwise), int8_convrot and mxfp8: bit-exact agreement with comfy-kitchen's own quantize,
dequantize and linear functions (eager backend), the CUDA-kernel arithmetic variants, and the format objects."""

from __future__ import annotations

import pytest
import torch

from ptq.formats import FORMATS, FormatError, UnsupportedShapeError, get_format
from ptq.formats.base import QuantizedWeight
from ptq.formats.int8 import (
    dequantize_int8,
    int8_gemm,
    int8_linear,
    int8_rowwise_activation,
    int8_scale_from_amax,
    quantize_int8_weight,
)
from ptq.formats.int8_convrot import hadamard, rotate_activation, rotate_hessian, rotate_weight
from ptq.formats.mxfp8 import dequantize_mxfp8, e8m0_from_amax, e8m0_to_float, quantize_mxfp8
from ptq.formats.nvfp4 import from_tiled, to_tiled

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def eager():
    pytest.importorskip("comfy_kitchen")
    from comfy_kitchen.backends.eager import quantization

    return quantization


def _inputs(kind: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(shape, generator=g) * 0.05
    if kind == "channels":  # per-input-channel ranges over 5 decades (activation-like outliers)
        return torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[1])
    x = torch.randn(shape, generator=g)
    x[:, 7] *= 300.0  # one outlier channel
    x[3] = 0.0  # an all-zero row
    return x


KINDS = ("normal", "channels", "outliers")


# ------------------------------------------------------------------------------------------------ int8


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_weight_quantizer_is_comfy_kitchens(eager, kind: str, per_channel: bool) -> None:
    w = _inputs(kind, (96, 320), 1).to(torch.bfloat16)
    q, s = quantize_int8_weight(w, per_channel=per_channel)
    ref = eager.quantize_int8_rowwise(w.float()) if per_channel else eager.quantize_int8_tensorwise(w.float())
    assert q.dtype == torch.int8 and torch.equal(q, ref[0]) and torch.equal(s, ref[1])
    assert s.shape == ((96, 1) if per_channel else ())
    for dtype in DTYPES:
        assert torch.equal(dequantize_int8(q, s, dtype), eager.dequantize_int8_simple_dtype(q, s, CODES[dtype]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_int8_activation_rows_are_comfy_kitchens(eager, dtype: torch.dtype, kind: str) -> None:
    x = _inputs(kind, (77, 320), 2).to(dtype)
    q, s = int8_rowwise_activation(x, mode="ck_eager")
    rq, rs = eager.quantize_int8_rowwise(x)
    assert torch.equal(q, rq) and torch.equal(s, rs) and s.shape == (77, 1)
    if kind == "outliers":  # the zero row: zero codes, clamped scale
        assert int(q[3].abs().max()) == 0 and float(s[3]) == pytest.approx(1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("rows", [1, 77])
def test_int8_linear_is_comfy_kitchens_eager_linear(eager, dtype: torch.dtype, per_channel: bool, rows: int) -> None:
    w = _inputs("normal", (96, 320), 3)
    x = _inputs("channels", (rows, 320), 4).to(dtype)
    bias = torch.randn(96).to(dtype)
    q, s = quantize_int8_weight(w, per_channel=per_channel)
    for b in (None, bias):
        y = int8_linear(x, q, s, b, mode="ck_eager")
        assert y.dtype == dtype and torch.equal(y, eager.int8_linear(x, q, s, b, out_dtype=dtype))
    x3 = x.reshape(1, rows, 320)  # leading dims are flattened and restored
    assert torch.equal(int8_linear(x3, q, s, bias, mode="ck_eager")[0], int8_linear(x, q, s, bias, mode="ck_eager"))


def test_int8_gemm_is_exact_beyond_float32_integers() -> None:
    a = torch.full((3, 4096), 127, dtype=torch.int8)
    b = torch.full((5, 4096), -128, dtype=torch.int8)
    assert int(int8_gemm(a, b)[0, 0]) == 127 * -128 * 4096  # |sum| = 66.6M > 2**24: exact in int32 only


def test_int8_cuda_arithmetic_variant() -> None:
    """mode="float32" is comfy-kitchen's CUDA kernel: scale = amax * fl(1/127) and one rounding of
    (acc * row_scale) * weight_scale + bias; it differs from the eager division for some amax values."""
    amax = torch.arange(1, 20001, dtype=torch.float32) * 0.0137
    eager_s, cuda_s = int8_scale_from_amax(amax), int8_scale_from_amax(amax, mode="float32")
    assert torch.equal(eager_s, amax / 127.0)
    assert torch.equal(cuda_s, amax * torch.tensor(1.0 / 127.0, dtype=torch.float32))
    assert 0 < int((eager_s != cuda_s).sum()) < amax.numel()
    x = _inputs("channels", (16, 64), 5).to(torch.bfloat16)
    q, s = quantize_int8_weight(_inputs("normal", (8, 64), 6))
    bias = torch.randn(8).to(torch.bfloat16)
    xq, xs = int8_rowwise_activation(x, mode="float32")
    acc = (xq.double() @ q.double().t()).float()
    want = (acc * xs * s + bias.float()).to(torch.bfloat16)
    assert torch.equal(int8_linear(x, q, s, bias, mode="float32"), want)


# ------------------------------------------------------------------------------------------------ ConvRot


def test_hadamard_is_comfy_kitchens_and_orthogonal() -> None:
    pytest.importorskip("comfy_kitchen")
    from comfy_kitchen.tensor.int8_utils import _build_hadamard

    for n in (4, 16, 64, 256):
        h = hadamard(n)
        assert torch.equal(h, _build_hadamard(n)) and torch.equal(h, h.T)
        assert torch.allclose(h @ h, torch.eye(n), atol=1e-6)
    with pytest.raises(ValueError, match="power of 4"):
        hadamard(32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_convrot_matches_comfy_kitchen(eager, dtype: torch.dtype) -> None:
    fmt = get_format("int8_convrot")
    w = _inputs("outliers", (96, 512), 7).to(torch.bfloat16)
    qw = fmt.quantize_weight(w)
    rq, rs = eager.quantize_int8_convrot_weight(w.float(), 256)
    assert torch.equal(qw.weight, rq) and torch.equal(qw.scale, rs) and qw.scale.shape == (96, 1)
    deq = fmt.dequantize_weight(qw, dtype)
    assert torch.equal(deq, eager.dequantize_int8_convrot_weight_dtype(rq, rs, 256, CODES[dtype]))
    x = _inputs("channels", (33, 512), 8).to(dtype)
    bias = torch.randn(96).to(dtype)
    y = fmt.dynamic_linear(x, qw, bias, mode="ck_eager")
    assert torch.equal(y, eager.int8_linear(x, rq, rs, bias, out_dtype=dtype, convrot=True, convrot_groupsize=256))


def test_convrot_rotation_spreads_outliers_and_keeps_the_product() -> None:
    w = _inputs("normal", (64, 512), 9)
    x = _inputs("outliers", (40, 512), 10)
    xr, wr = rotate_activation(x, mode="float32"), rotate_weight(w)
    assert torch.allclose(xr @ wr.t(), x @ w.t(), rtol=1e-4, atol=1e-3)
    assert float(xr.abs().amax() / xr.abs().mean()) < 0.2 * float(x.abs().amax() / x.abs().mean())
    h = x.double().t() @ x.double()
    assert torch.allclose(rotate_hessian(h.float()).double(), xr.double().t() @ xr.double(), rtol=1e-4,
                          atol=1e-2)
    fmt = get_format("int8_convrot")
    wc, hc = fmt.code_domain(w, h.float())
    assert torch.equal(wc, wr) and hc is not None and hc.shape == h.shape
    with pytest.raises(UnsupportedShapeError, match="multiple of 256"):
        fmt.quantize_weight(torch.randn(8, 320))


# ------------------------------------------------------------------------------------------------ MXFP8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(256, 512), (96, 64), (300, 96)])
def test_mxfp8_quantizer_is_comfy_kitchens(eager, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    x = _inputs("channels", shape, 11).to(dtype)
    x[3, :32] = 0.0  # a zero block
    q, codes = quantize_mxfp8(x)
    rq, rs = eager.quantize_mxfp8(x)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(to_tiled(codes), rs.view(torch.uint8)) and rs.dtype == torch.float8_e8m0fnu
    assert int(codes[3, 0]) == 0 and int(q[3, :32].view(torch.uint8).max()) == 0
    for out in DTYPES:
        assert torch.equal(dequantize_mxfp8(q, codes, out), eager.dequantize_mxfp8(rq, rs, out))
    assert torch.equal(from_tiled(rs.view(torch.uint8), *codes.shape), codes)


def test_mxfp8_scale_is_the_power_of_two_ceiling() -> None:
    """E8M0 codes: the smallest power of two >= amax/448. The eager backend takes ceil(log2(.)) in float32, which
    misses the ceiling a few ulps above a power of two (the block max then saturates at 448); "float32" (CUDA)
    is exact."""
    base = 448.0 * 2.0**-10
    amax = torch.tensor([0.0, base, base * (1 + 2**-23), base * (1 + 2**-22), base * 1.5, 3e38])
    assert e8m0_from_amax(amax, mode="float32").tolist() == [0, 117, 118, 118, 118, 247]
    assert e8m0_from_amax(amax).tolist() == [0, 117, 117, 117, 118, 247]
    assert e8m0_to_float(torch.tensor([0, 1, 127, 130], dtype=torch.uint8)).tolist() == [0.0, 2.0**-126, 1.0, 8.0]
    x = torch.zeros(1, 32)
    x[0, 0] = base * (1 + 2**-22)
    q_eager, _ = quantize_mxfp8(x)
    q_cuda, _ = quantize_mxfp8(x, mode="float32")
    assert float(q_eager[0, 0]) == 448.0 and float(q_cuda[0, 0]) == 224.0


def test_mxfp8_rejects_unaligned_shapes() -> None:
    with pytest.raises(UnsupportedShapeError, match="multiple of 32"):
        quantize_mxfp8(torch.randn(4, 48))
    fmt = get_format("mxfp8")
    assert fmt.unsupported(64, 48) is not None and fmt.unsupported(64, 64) is None
    with pytest.raises(UnsupportedShapeError):
        fmt.quantize_weight(torch.randn(48, 64))


# ------------------------------------------------------------------------------------------------ format objects


def test_registered_format_objects() -> None:
    for name in ("int8", "int8_convrot", "mxfp8"):
        fmt = FORMATS[name]
        assert fmt.name == name and fmt.dynamic_activations
        with pytest.raises(FormatError, match="run time"):
            fmt.input_scale_from_amax(torch.tensor(1.0))
    assert get_format("int8").storage_bits(96, 320) == 96 * 320 * 8 + 32
    assert get_format("int8").storage_bits(96, 320, per_channel=True) == 96 * 320 * 8 + 32 * 96
    assert get_format("int8_convrot").storage_bits(96, 512) == 96 * 512 * 8 + 32 * 96
    assert get_format("mxfp8").storage_bits(96, 320) == 96 * 320 * 8 + 96 * 10 * 8 and FORMATS["mxfp8"].weight_bits == 8.25
    assert get_format("int8").native_min_capability == (7, 5) and get_format("int8").portable_kernel
    assert get_format("mxfp8").native_min_capability == (10, 0) and not get_format("mxfp8").portable_kernel
    assert not FORMATS["nvfp4"].dynamic_activations and not FORMATS["fp8"].dynamic_activations


def test_mxfp8_format_object_round_trip() -> None:
    fmt = get_format("mxfp8")
    w = _inputs("channels", (64, 128), 12)
    qw = fmt.quantize_weight(w)
    assert qw.weight.dtype == torch.float8_e4m3fn and qw.scale.dtype == torch.uint8 and qw.scale.shape == (64, 4)
    deq = fmt.dequantize_weight(qw)
    assert torch.equal(fmt.gemm_operand(qw), deq) and float(fmt.gemm_alpha(qw)) == 1.0
    assert float((deq - w).norm() / w.norm()) < 0.04
    assert torch.equal(fmt.dequantize_weight(fmt.from_codes(qw.weight, qw.scale)), deq)
    stored, value = fmt.block_scale_candidates(w.reshape(64, 4, 32))[0]
    assert torch.equal(stored, qw.scale) and torch.equal(value, e8m0_to_float(stored))
    x = _inputs("channels", (5, 128), 13).to(torch.bfloat16)
    y = fmt.dynamic_linear(x, qw, None, mode="ck_eager")
    xq, xc = quantize_mxfp8(x)
    assert torch.equal(y, (dequantize_mxfp8(xq, xc) @ deq.t()).to(torch.bfloat16))


def test_int8_gptq_round_matches_the_quantizer() -> None:
    fmt = get_format("int8")
    w = _inputs("outliers", (32, 64), 14)
    qw = fmt.quantize_weight(w, per_channel=True)
    codes, values = fmt.gptq_round(w, qw.scale)
    assert torch.equal(codes, qw.weight) and torch.equal(values, dequantize_int8(qw.weight, qw.scale))
    big = fmt.gptq_round(torch.tensor([1000.0, -1000.0]), torch.tensor(1.0))[0]
    assert big.tolist() == [127, -128]  # comfy-kitchen clamps to [-128, 127]
    assert isinstance(fmt.from_codes(codes, qw.scale), QuantizedWeight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_arithmetic_matches_comfy_kitchens_cuda_backend() -> None:
    """GPU only: mode="float32" equals comfy-kitchen's CUDA backend (int8 row quantizer and int8_linear; MXFP8
    quantizer). Run on a GPU with comfy-kitchen's CUDA backend available (torch built for CUDA >= 13)."""
    ck = pytest.importorskip("comfy_kitchen")
    if "cuda" not in ck.list_backends() or not ck.list_backends()["cuda"].get("available", False):
        pytest.skip("comfy-kitchen's CUDA backend is not available")
    dev = "cuda"
    x = _inputs("channels", (320, 1024), 15).to(dev, torch.bfloat16)  # the CUDA MXFP8 quantizer needs rows % 32
    q, s = quantize_int8_weight(_inputs("normal", (512, 1024), 16).to(dev))
    bias = torch.randn(512, device=dev).to(torch.bfloat16)
    with ck.use_backend("cuda"):
        rq, rs = ck.quantize_int8_rowwise(x)
        ry = ck.int8_linear(x, q, s, bias, torch.bfloat16)
        mq, ms = ck.quantize_mxfp8(x)
    xq, xs = int8_rowwise_activation(x, mode="float32")
    assert torch.equal(xq, rq) and torch.equal(xs, rs.reshape(xs.shape))
    y = int8_linear(x, q, s, bias, mode="float32")
    ulp = (ry.float().abs() * 2.0**-7).clamp_min(2.0**-126)  # one bf16 step at the output's magnitude
    diff = (y.float() - ry.float()).abs()
    assert bool((diff <= ulp).all()), f"{int((diff > 0).sum())} of {y.numel()} outputs differ, max {float(diff.max())}"
    print(f"int8_linear vs comfy-kitchen CUDA: {int((diff > 0).sum())} of {y.numel()} outputs one bf16 step apart")
    pq, pc = quantize_mxfp8(x, mode="float32")
    assert torch.equal(pq.view(torch.uint8), mq.view(torch.uint8)) and torch.equal(to_tiled(pc), ms.view(torch.uint8))
