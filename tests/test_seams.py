"""The extension seams: a new number format and a new model family plug in with their own code plus one registry
entry each, and the rest of ptq (algorithms, QuantLinear, mixed precision, exporters, the job) works with them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from ptq.algorithms.layers import LayerRules
from ptq.algorithms.mixed_precision import layer_bits
from ptq.algorithms.quantize import quantize_, quantized_layers
from ptq.algorithms.recipe import LayerSelection, QuantRecipe
from ptq.calibration.observers import LinearInputObserver
from ptq.formats import FORMATS, NumberFormat, QuantizedWeight, register_format
from ptq.models import ADAPTERS
from ptq.models.base import ModelAdapter, QuantTarget, ReferenceCheckpoint, SampleSpec
from ptq.models.files import Architecture, FileFamily, Naming

# ---------------------------------------------------------------------------------------------------------------
# a throwaway number format: symmetric int8, per-tensor weight and static per-tensor activation scales
# ---------------------------------------------------------------------------------------------------------------


class ToyInt8(NumberFormat):
    name = "toy_int8"
    block_size = None
    storage_dtype = torch.int8
    weight_bits = 8.0

    def storage_bits(self, out_features: int, in_features: int, *, per_channel: bool = False) -> float:
        return out_features * in_features * 8.0 + 32.0

    def _q(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(x.float() / scale), -127, 127)

    def quantize_weight(self, w: torch.Tensor, name: str = "weight", *, per_channel: bool = False) -> QuantizedWeight:
        self.check_weight(w, name)
        scale = (w.float().abs().amax() / 127).clamp_min(1e-12)
        return QuantizedWeight(self._q(w, scale).to(torch.int8), scale)

    def dequantize_weight(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (q.weight.float() * q.scale).to(dtype)

    def gemm_operand(self, q: QuantizedWeight) -> torch.Tensor:
        return q.weight.float()

    def gemm_alpha(self, q: QuantizedWeight) -> torch.Tensor:
        return q.scale

    def input_scale_from_amax(self, amax: torch.Tensor) -> torch.Tensor:
        return (amax.float() / 127).clamp_min(1e-12).reshape(())

    def activation_values(self, x: torch.Tensor, input_scale: torch.Tensor, *, mode: str) -> torch.Tensor:
        return self._q(x, input_scale)

    def fake_quantize_activation(self, x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
        return self._q(x, input_scale) * input_scale

    def gptq_round(self, col: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._q(col, scale)
        return c.to(torch.int8), c * scale


@pytest.fixture()
def toy_format():
    fmt = register_format(ToyInt8())
    yield fmt
    del FORMATS[fmt.name]


def _calibrated_mlp(seed: int = 0, hessian: bool = False) -> tuple[nn.Module, dict, dict, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
    x = torch.randn(256, 64)
    with LinearInputObserver(model, hessian=hessian) as obs, torch.no_grad():
        model(x)
    return model, obs.stats(), obs.hessians() if hessian else {}, x


@pytest.mark.parametrize("weight", ["max", "gptq"])
def test_a_new_format_runs_through_quantize_and_quantlinear(toy_format, weight: str) -> None:
    model, stats, hessians, x = _calibrated_mlp(hessian=weight == "gptq")
    with torch.no_grad():
        ref = model(x)
    recipe = QuantRecipe(format="toy_int8", weight=weight, layers=LayerSelection(exclude=[]))
    records = quantize_(model, recipe, stats, hessians=hessians or None, progress=False)
    assert [r.format for r in records] == ["toy_int8", "toy_int8"]
    assert all(0 < r.weight_rel_error < 0.02 for r in records)
    assert all(r.bits_per_weight == pytest.approx(toy_format.storage_bits(r.out_features, r.in_features)
                                                  / (r.in_features * r.out_features)) for r in records)
    with torch.no_grad():
        out = model(x)
    assert float((out - ref).norm() / ref.norm()) < 0.03
    # the simulated layer equals its definition: int8 codes x int8 codes, scaled once
    layer = quantized_layers(model)["0"]
    xq = torch.clamp(torch.round(x / layer.input_scale), -127, 127)
    want = (xq @ layer.weight_q.float().t()) * (layer.input_scale * layer.weight_scale) + layer.bias
    assert torch.allclose(layer(x), want, rtol=1e-6, atol=1e-6)
    assert layer_bits("toy_int8", 32, 96) == 32 * 96 * 8 + 32


# the ComfyUI target's layer writer, independent reader and ``ptq verify`` decoder of the throwaway format


def write_toy(layer: str, state: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from ptq.targets.comfyui.writer import common_tensors

    return {f"{layer}.weight": state.weight, f"{layer}.weight_scale": state.weight_scale.float().reshape(()),
            **common_tensors(layer, state, dtype)}


def read_toy(get: Any, layer: str, state: Any) -> tuple[torch.Tensor, set[str]]:
    keys = {f"{layer}.weight", f"{layer}.weight_scale"}
    return get(f"{layer}.weight").float() * get(f"{layer}.weight_scale").float(), keys


def decode_toy(g: dict, conf: dict, out: int, inp: int, ref: torch.Tensor, expected: str, device: str) -> Any:
    from ptq.algorithms.qlinear import QuantizedLinearState
    from ptq.targets.file_decoders import FileLayer

    layer = FileLayer("toy_int8", input_scale=g["input_scale"].float().reshape(()), packing="per-tensor")
    layer.weight, _ = read_toy(lambda k: g[k.rpartition(".")[2]], "x", None)
    layer.state = QuantizedLinearState("toy_int8", g["weight"], g["weight_scale"].float().reshape(()), None,
                                       layer.input_scale, g.get("bias"), inp, out)
    return layer


@pytest.fixture()
def toy_in_comfyui(toy_format):
    from ptq.targets.comfyui import COMFYUI

    COMFYUI.register_format("toy_int8", write_toy, read_toy, decoder=decode_toy, comfy_name="toy_int8")
    yield toy_format
    COMFYUI.unregister_format("toy_int8")


def test_a_new_format_goes_through_export_inspect_and_verify(toy_in_comfyui, random_tiny_dir: Path,
                                                             tmp_path: Path) -> None:
    """The throwaway format, with its writer / reader / decoder registered on the ComfyUI target, is exported and
    read back bit for bit, ``ptq inspect`` reads its layers as declared, and ``ptq verify`` decodes and runs them."""
    from ptq.models import wan
    from ptq.targets import export_model
    from ptq.tools.inspect import inspect_file
    from ptq.tools.verify import verify_file

    model = wan.load_transformer(random_tiny_dir)
    torch.manual_seed(0)
    with LinearInputObserver(model) as obs, torch.no_grad():
        model(torch.randn(1, 48, 3, 16, 16).to(torch.bfloat16), torch.full((1, 192), 700.0),
              torch.randn(1, 32, model.config.text_dim).to(torch.bfloat16))
    quantize_(model, QuantRecipe(format="toy_int8"), obs.stats(), progress=False)
    cfg = SimpleNamespace(targets=["comfyui"], unquantized_dtype="bfloat16", filename="toy", verify=True)
    (res,) = export_model(model, cfg, tmp_path, progress=False)
    assert res.verified, res.verify_detail
    report = inspect_file(res.path)
    assert not report.errors, [p.message for p in report.errors]
    quantized = [li for li in report.layers if li.quantized]
    assert quantized and {li.format for li in quantized} == {"toy_int8"}
    assert all(li.metadata_format == "toy_int8" for li in quantized)
    checked = verify_file(res.path, str(random_tiny_dir))
    assert checked.ok, [(c.name, c.problems) for c in checked.layers if not c.ok] + checked.problems
    assert {c.format for c in checked.layers} == {"toy_int8"} and len(checked.layers) == res.quantized_layers
    assert all(c.output_err_file == pytest.approx(c.output_err_ptq, rel=1e-6) for c in checked.layers)


def test_exporters_refuse_a_format_they_cannot_write(toy_format, tmp_path: Path) -> None:
    from ptq.targets import export_model

    model, stats, _, _ = _calibrated_mlp()
    quantize_(model, QuantRecipe(format="toy_int8", layers=LayerSelection(exclude=[])), stats, progress=False)
    cfg = SimpleNamespace(targets=["comfyui", "diffusers"], unquantized_dtype="bfloat16", filename="m", verify=True)
    results = export_model(model, cfg, tmp_path, progress=False, key_maps={"comfyui": str, "diffusers": str})
    assert [r.target for r in results] == ["comfyui", "diffusers"]
    assert all("cannot write format 'toy_int8'" in r.skipped for r in results)
    assert not list(tmp_path.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# a throwaway model family: a two-block MLP denoiser with a hashed-word text encoder and an Euler loop
# ---------------------------------------------------------------------------------------------------------------


class ToyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class ToyDenoiser(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(dim + 1, dim)
        self.layers = nn.ModuleList([ToyBlock(dim) for _ in range(2)])
        self.head = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.embed(torch.cat([x + text, t.expand(*x.shape[:-1], 1)], -1))
        for block in self.layers:
            h = block(h)
        return self.head(h)


class ToyFiles(FileFamily):
    """The toy family's checkpoints: keys named ``toy.<module>``."""

    name = "toy"

    def naming(self, keys: Any) -> Naming:
        keys = list(keys)
        n = sum(k.startswith("toy.") for k in keys)
        return Naming("original" if n else "unknown", "", len(keys), 0, 0, n, {}, {"original": "toy.* names"})

    def architecture(self, layers: Any, params: int, metadata: Any = None) -> Architecture:
        blocks = {k.split(".")[2] for k in layers if k.startswith("toy.layers.")}
        return Architecture("toy", f"toy denoiser, {len(blocks)} blocks", num_layers=len(blocks), params=params)


class ToyReference(ReferenceCheckpoint):
    label = "ToyDenoiser"

    def content_hash(self, cache_dir: Path | None = None) -> str:
        return "0" * 64

    def load(self, device: str) -> nn.Module:
        torch.manual_seed(0)
        return ToyDenoiser().to(torch.bfloat16).eval().requires_grad_(False)

    def example_inputs(self, module: nn.Module) -> tuple[tuple, dict]:
        g = torch.Generator().manual_seed(0)
        x, text = torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g)
        return (x.to(torch.bfloat16), torch.tensor([0.5], dtype=torch.bfloat16), text.to(torch.bfloat16)), {}


class ToyAdapter(ModelAdapter):
    name: ClassVar[str] = "toy"
    layer_rules: ClassVar[LayerRules] = LayerRules(block_pattern=r"^layers\.(\d+)\.", high_precision=("embed",))
    module_classes: ClassVar[tuple[str, ...]] = ("ToyDenoiser",)
    file_family: ClassVar[FileFamily] = ToyFiles()

    @classmethod
    def reference(cls, model_path: Any, *, file_name: str, metadata: Any, component: Any = None) -> ReferenceCheckpoint:
        return ToyReference()

    def __init__(self, path: Any, **_: Any) -> None:
        self.root = Path(path or ".")
        self.model: ToyDenoiser | None = None

    display_name = "toy"

    def content_hash(self, cache_dir: Path | None = None) -> str:
        return "0" * 64

    def fingerprint(self) -> str:
        return "toy"

    sample_defaults = {"num_inference_steps": 4, "guidance_scale": 1.0}

    def sample_spec(self, *, height: int | None = None, width: int | None = None, num_frames: int | None = None,
                    num_steps: int | None = None, guidance_scale: float | None = None, seed: int = 0) -> SampleSpec:
        return SampleSpec(8, 4, 1, num_steps or 4, 1.0 if guidance_scale is None else guidance_scale, seed)

    def check_spec(self, spec: SampleSpec) -> dict[str, str]:
        return {}

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        g = [torch.Generator().manual_seed(sum(map(ord, p))) for p in prompts]
        return torch.stack([torch.randn(8, 32, generator=gi) for gi in g])

    def free_text_encoder(self) -> None:
        pass

    def load(self, *, decoder: bool = True) -> None:
        torch.manual_seed(0)
        self.model = ToyDenoiser().eval().requires_grad_(False)

    def targets(self) -> dict[str, QuantTarget]:
        return {"transformer": QuantTarget("transformer", self.model)}

    def denoise(self, prompt_embeds, negative_embeds, spec, *, condition=None, forward=None, on_step_start=None,
                on_step_end=None) -> torch.Tensor:
        call = (forward or {}).get("transformer", self.model)
        x = torch.randn(prompt_embeds.shape, generator=torch.Generator().manual_seed(spec.seed))
        for i in range(spec.num_steps):
            if on_step_start is not None:
                on_step_start(i)
            t = torch.tensor([1.0 - i / spec.num_steps])
            x = x - call(x, t, prompt_embeds) / spec.num_steps
            if on_step_end is not None:
                on_step_end(i, t, x)
        return x

    @classmethod
    def target_key(cls, key: str, target: str) -> str:
        return f"toy.{key}"

    @classmethod
    def module_key(cls, key: str, target: str) -> str | None:
        return key.removeprefix("toy.")


def test_a_new_model_family_runs_the_whole_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import safe_open

    from ptq.pipeline.job import run_job
    from ptq.pipeline.settings import RunConfig

    monkeypatch.setitem(ADAPTERS, "toy", f"{__name__}:ToyAdapter")
    cfg = RunConfig()
    cfg.model.adapter, cfg.model.device, cfg.progress = "toy", "cpu", False
    cfg.calib.num_prompts, cfg.eval.num_prompts, cfg.eval.decode = 3, 2, False
    cfg.eval.cache_dir = str(tmp_path / "cache")
    cfg.quant = QuantRecipe(format="nvfp4", layers=LayerSelection(keep_last_blocks=1))
    report = run_job(cfg, tmp_path / "run")
    formats = {r["name"]: r["format"] for r in report["layers"]}
    # the adapter's rules: "embed" kept by default, the last block kept by keep_last_blocks, the rest NVFP4
    assert formats == {"embed": "bf16", "layers.0.up": "nvfp4", "layers.0.down": "nvfp4", "layers.1.up": "bf16",
                       "layers.1.down": "bf16", "head": "nvfp4"}
    assert all(e["verified"] for e in report["exports"])
    (path,) = (tmp_path / "run").glob("toy_*_comfyui.safetensors")  # export.filename: {model}_{recipe}
    with safe_open(str(path), "pt") as f:
        assert "toy.layers.0.up.weight_scale" in set(f.keys()) and f.metadata()["ptq_source_model"] == "toy"
    assert 0 < report["accuracy"]["mean_final"]["rel_l2"] < 0.5
    # ptq inspect and ptq verify read the family's file through its adapter (names, architecture, reference model)
    from ptq.tools.inspect import inspect_file
    from ptq.tools.verify import verify_file

    found = inspect_file(path)
    assert (found.architecture.family, found.architecture.num_layers, found.naming.style) == ("toy", 2, "original")
    assert not found.errors and {li.format for li in found.layers if li.quantized} == {"nvfp4"}
    checked = verify_file(path, None)
    assert checked.ok and checked.loads_into_diffusers, checked.to_dict()
    assert {c.name for c in checked.layers} == {"layers.0.up", "layers.0.down", "head"}
