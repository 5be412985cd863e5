"""Batched GPTQ (``ptq.algorithms.gptq_batched``) against the per-layer GPTQ of ``ptq.algorithms.gptq``: the same
codes and scales bit for bit on CPU (siblings sharing a Hessian, several shapes, a partial last block, batches cut
by memory), through ``quantize_`` too; on CUDA (GPU tests) the CUDA-graph sweep equals the eager sweep and stays
within a stated tolerance of the per-layer path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ptq.algorithms import gptq
from ptq.algorithms.gptq_batched import gptq_quantize_many, plan_batches
from ptq.algorithms.quantize import quantize_
from ptq.algorithms.recipe import GPTQWeight, QuantRecipe
from ptq.algorithms.weight_quant import WeightContext
from ptq.calibration.observers import LinearInputObserver
from ptq.formats import QuantizedWeight, get_format


def _hessian(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim ** 0.5 + torch.eye(dim)
    x = torch.randn(n, dim, generator=g) @ mix
    x[:, :3] *= 6.0
    return x.t() @ x / n


def _layers() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Three siblings sharing one Hessian object, a fourth layer of their shape with its own, two other shapes;
    in_features 144 = one full 128-column block + a partial one."""
    h_a, h_b, h_c = _hessian(384, 144, 1), _hessian(384, 144, 2), _hessian(384, 64, 3)
    spec = [("q", 32, h_a), ("k", 32, h_a), ("v", 32, h_a), ("o", 32, h_b), ("up", 48, h_b), ("down", 16, h_c)]
    g = torch.Generator().manual_seed(0)
    weights = {n: (torch.randn(r, h.shape[0], generator=g) * 0.02).to(torch.bfloat16) for n, r, h in spec}
    return weights, {n: h for n, _, h in spec}


def _same(a: QuantizedWeight, b: QuantizedWeight) -> bool:
    def bits(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(-1).view(torch.uint8)

    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in ((bits(a.weight), bits(b.weight)), (bits(a.scale), bits(b.scale)),
                            (bits(a.scale_2), bits(b.scale_2))))


@pytest.mark.parametrize(("fmt", "scales", "per_channel"), [
    ("nvfp4", "mse", False), ("nvfp4", "four_over_six", False), ("nvfp4", "max", False),
    ("fp8", "mse", False), ("fp8", "max", True)])
def test_batched_equals_per_layer_gptq(fmt: str, scales: str, per_channel: bool) -> None:
    weights, hessians = _layers()
    number_format = get_format(fmt)
    cfg = GPTQWeight(scales=scales, fp8_per_channel=per_channel)
    ref = {n: gptq.quantize_gptq(w, number_format, cfg, WeightContext(n, hessian=hessians[n]))
           for n, w in weights.items()}
    for max_bytes in (None, 1):  # one batch per shape / one layer per batch
        got = gptq_quantize_many(weights, hessians, number_format, cfg, max_bytes=max_bytes)
        assert list(got) == list(weights)
        different = [n for n in weights if not _same(ref[n], got[n])]
        assert not different, f"{fmt}/{scales} max_bytes={max_bytes}: {different} differ from per-layer GPTQ"


def test_fast_e2m1_rounding_equals_the_format_encoder() -> None:
    """Every float32 within 2**14 steps of each rounding threshold and E2M1 value (both signs), 2**20 random
    magnitudes over 2**-30..2**4, zeros, subnormals and saturating values: same codes and values as
    ``nvfp4._encode_unchecked`` (an exhaustive run over all float32 in [-6, 6] agreed too, docs/benchmarks.md)."""
    from ptq.algorithms.gptq_batched import e2m1_round_fast
    from ptq.formats import nvfp4 as nf

    points = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
    bits = points.view(torch.int32).unsqueeze(1) + torch.arange(-(1 << 14), 1 << 14).unsqueeze(0)
    near = bits.clamp_min(0).view(torch.float32).flatten()
    g = torch.Generator().manual_seed(0)
    rand = torch.exp2(torch.rand(1 << 20, generator=g) * 34 - 30)
    special = torch.tensor([0.0, 1e-45, 1e-40, 1e-38, 6.0001, 7.0, 1e30, float("inf")])
    y = torch.cat([near, rand, special])
    y = torch.cat([y, -y])
    codes, values = e2m1_round_fast(y)
    ref = nf._encode_unchecked(torch.clamp(y, -6.0, 6.0))
    assert torch.equal(codes, ref)
    assert torch.equal(values.view(torch.int32), nf.e2m1_lut("cpu")[ref.to(torch.int32)].view(torch.int32))


def test_plan_batches_groups_shapes_and_bounds_memory() -> None:
    shapes = {"a": (32, 144), "b": (32, 144), "c": (16, 64), "d": (32, 144)}
    keys = {"a": ("h1",), "b": ("h1",), "c": ("h2",), "d": ("h3",)}
    assert plan_batches(shapes, keys, 1 << 30) == [["a", "b", "d"], ["c"]]
    one = 32 * 144 * 5 + 32 * 9 + 144 * 144 * 4  # a layer with its own Hessian factor
    sibling = 32 * 144 * 5 + 32 * 9  # a layer sharing the previous one's
    assert plan_batches(shapes, keys, one + sibling) == [["a", "b"], ["d"], ["c"]]
    assert plan_batches(shapes, keys, 1) == [["a"], ["b"], ["d"], ["c"]]


def test_quantize_batched_equals_per_layer_and_shares_sibling_hessians() -> None:
    """quantize_ with batched GPTQ (default) gives the same layers as batched=False; q/k/v reading one tensor get
    one Hessian object from the observer."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(64, 32), nn.Linear(64, 32), nn.Linear(64, 32)
            self.o = nn.Linear(32, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o(self.q(x) * self.k(x) + self.v(x))

    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).to(torch.bfloat16)
    xs = [torch.randn(4, 16, 64, dtype=torch.bfloat16) for _ in range(3)]
    with LinearInputObserver(model, hessian=True) as obs, torch.no_grad():
        for x in xs:
            model(x)
    stats, hessians = obs.stats(), obs.hessians()
    assert hessians["0.q"] is hessians["0.k"] is hessians["0.v"] and hessians["0.o"] is not hessians["0.q"]
    flat = torch.cat([x.reshape(-1, 64) for x in xs]).float()
    assert torch.allclose(hessians["0.q"], flat.t() @ flat / flat.shape[0], rtol=1e-5, atol=1e-6)
    states = {}
    for batched in (True, False):
        m = nn.Sequential(Block(), Block()).to(torch.bfloat16)
        m.load_state_dict(model.state_dict())
        recipe = QuantRecipe(format="nvfp4", weight=GPTQWeight(scales="four_over_six", batched=batched))
        quantize_(m, recipe, stats, hessians=hessians, progress=False)
        states[batched] = {k: v for k, v in m.state_dict().items()}
    assert states[True].keys() == states[False].keys()
    for key, value in states[True].items():
        assert torch.equal(value.reshape(-1).view(torch.uint8), states[False][key].reshape(-1).view(torch.uint8)), key


def test_sensitivity_with_batched_gptq_equals_per_layer() -> None:
    """The mixed-precision sensitivity analysis precomputes its GPTQ weights in batches: same measured errors."""
    from ptq.algorithms.sensitivity import measure_sensitivity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64))
    xs = [torch.randn(8, 64) for _ in range(2)]
    with LinearInputObserver(model, hessian=True) as obs, torch.no_grad():
        for x in xs:
            model(x)
    inputs = [((x,), {}) for x in xs]
    candidates = {"0": ["nvfp4", "fp8", "bf16"], "2": ["nvfp4", "fp8", "bf16"]}
    errors = []
    for batched in (True, False):
        recipe = QuantRecipe(format="nvfp4", weight=GPTQWeight(scales="mse", batched=batched))
        rep = measure_sensitivity(model, inputs, candidates, recipe, obs.stats(), obs.hessians(), blocks=False,
                                  progress=False)
        errors.append(rep.layer_error)
    assert errors[0] == errors[1] and errors[0]["0"]["nvfp4"] > errors[0]["0"]["fp8"] > 0


def test_batched_errors_name_the_layer() -> None:
    weights, hessians = _layers()
    with pytest.raises(ValueError, match="up: weight method 'gptq' needs the layer's input Hessian"):
        gptq_quantize_many(weights, {**hessians, "up": None}, get_format("nvfp4"), GPTQWeight())


# ---------------------------------------------------------------------------------------------------------------
# GPU (skipped on CPU)
# ---------------------------------------------------------------------------------------------------------------


def _gpu_layers(rows: int, cols: int, n: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, cols, device="cuda", generator=g)
    x = x + 0.5 * x.roll(1, dims=1)
    h = x.t() @ x / x.shape[0]
    weights = {f"l{i}": (torch.randn(rows, cols, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
               for i in range(n)}
    return weights, {name: h if i % 3 else h.clone() for i, name in enumerate(weights)}


@pytest.mark.gpu
@pytest.mark.parametrize("scales", ["mse", "four_over_six"])
def test_gpu_graph_sweep_equals_eager_sweep(scales: str) -> None:
    weights, hessians = _gpu_layers(512, 1024, 4)
    fmt, cfg = get_format("nvfp4"), GPTQWeight(scales=scales)
    eager = gptq_quantize_many(weights, hessians, fmt, cfg, cuda_graphs=False)
    graphed = gptq_quantize_many(weights, hessians, fmt, cfg, cuda_graphs=True)
    assert all(_same(eager[n], graphed[n]) for n in weights)


@pytest.mark.gpu
@pytest.mark.parametrize(("fmt", "scales"), [("nvfp4", "mse"), ("nvfp4", "four_over_six"), ("fp8", "mse")])
def test_gpu_batched_matches_per_layer(fmt: str, scales: str) -> None:
    """On CUDA the batched sweep reduces 16-element sums in kernels launched for larger tensors, which may break
    near-ties of the block-scale searches differently: the codes agree almost everywhere and the layer-output
    error ``trace((W-Q) H (W-Q)^T)`` is the same within 1%."""
    weights, hessians = _gpu_layers(512, 1024, 3)
    number_format, cfg = get_format(fmt), GPTQWeight(scales=scales)
    got = gptq_quantize_many(weights, hessians, number_format, cfg)
    for name, w in weights.items():
        ref = gptq.quantize_gptq(w, number_format, cfg, WeightContext(name, hessian=hessians[name]))
        a, b = number_format.dequantize_weight(ref), number_format.dequantize_weight(got[name])
        agree = float((a == b).float().mean())
        ea = gptq.layer_output_error(w, a, hessians[name])
        eb = gptq.layer_output_error(w, b, hessians[name])
        assert agree > 0.9 and abs(eb / ea - 1) < 0.01, f"{name}: {agree:.4f} equal, error ratio {eb / ea:.4f}"


@pytest.mark.parametrize("fmt", ["int8", "int8_convrot", "mxfp8"])
def test_quantize_with_batched_gptq_on_dynamic_formats_equals_per_layer(fmt: str) -> None:
    """Formats with run-time activation scales need no calibration statistics: quantize_ batches their GPTQ too
    (int8), or leaves it to the per-layer path where the batched sweep cannot go (ConvRot's rotated basis, MXFP8's
    block scales); either way the result equals the per-layer GPTQ bit for bit."""
    torch.manual_seed(1)
    template = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256))
    x = torch.randn(512, 256)
    hessians = {"0": x.t() @ x, "1": template[0](x).detach().t() @ template[0](x).detach()}
    states = []
    for batched in (True, False):
        model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256))
        model.load_state_dict(template.state_dict())
        recipe = QuantRecipe(format=fmt, weight=GPTQWeight(batched=batched), activation="dynamic")
        recipe.layers.exclude = []
        quantize_(model, recipe, hessians=hessians, progress=False)
        states.append([model[i].state() for i in (0, 1)])
    for a, b in zip(*states, strict=True):
        assert a.format == fmt and torch.equal(a.weight, b.weight) and torch.equal(a.weight_scale, b.weight_scale)
