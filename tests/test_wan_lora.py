"""LoRA merges through diffusers' WAN LoRA loading and PEFT fusing: a small LoRA made for the small model, in the
diffusers/PEFT, ComfyUI and kohya layouts; merged weights equal ``W + scale * B @ A``, the merged model equals the
PEFT-applied one, the export and report name the LoRA, and calibration sees the merged weights."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("peft")

from ptq.models.base import LoraSpec, ModelLoadError  # noqa: E402
from ptq.models.tiny_wan import build_transformer  # noqa: E402
from ptq.models.wan.lora import lora_in_original_keys, make_random_lora, merge_lora, merge_loras  # noqa: E402

RANK, SCALE = 4, 0.7


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_transformer(seed=3).requires_grad_(False)


@pytest.fixture(scope="module")
def lora(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return make_random_lora(model, rank=RANK, seed=1)


def _inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(1, 48, 2, 8, 8, generator=g), "timestep": torch.tensor([500.0]),
            "encoder_hidden_states": torch.randn(1, 8, 256, generator=g), "return_dict": False}


@pytest.mark.parametrize("style", ["diffusers", "comfyui", "kohya"])
def test_merge_equals_w_plus_scaled_ba_in_every_layout(model, lora, style: str, tmp_path: Path) -> None:
    state = lora if style == "diffusers" else lora_in_original_keys(lora, alpha=2.0, style=style)
    path = tmp_path / f"lora_{style}.safetensors"
    save_file(state, str(path))
    merged = copy.deepcopy(model)
    layers = merge_lora(merged, path, SCALE)
    assert layers == 5 * 10  # every block Linear of the 5 blocks
    assert all(type(m) is torch.nn.Linear for m in merged.modules() if "Linear" in type(m).__name__)
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        key = f"transformer.{name}.lora_A.weight"
        want = m.weight if key not in lora else m.weight + SCALE * lora[key.replace("lora_A", "lora_B")] @ lora[key]
        assert torch.allclose(merged.get_submodule(name).weight, want, rtol=1e-5, atol=1e-6), name


def test_merged_model_equals_peft_applied_model(model, lora) -> None:
    from diffusers.loaders import WanLoraLoaderMixin

    peft_model = copy.deepcopy(model)
    WanLoraLoaderMixin.load_lora_into_transformer(dict(lora), transformer=peft_model, adapter_name="a")
    peft_model.set_adapters(["a"], weights=[SCALE])
    merged = copy.deepcopy(model)
    merged_state = {k: v.clone() for k, v in lora.items()}
    WanLoraLoaderMixin.load_lora_into_transformer(merged_state, transformer=merged, adapter_name="a")
    merged.fuse_lora(lora_scale=SCALE, adapter_names=["a"])
    merged.unload_lora()
    with torch.no_grad():
        base = model(**_inputs(model))[0]
        want = peft_model(**_inputs(model))[0]  # LoRA branch computed separately by PEFT
        got = merged(**_inputs(model))[0]
    assert (want - base).norm() / base.norm() > 1e-3  # the LoRA changes the output
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()


def test_bad_lora_files_are_clear_errors(model, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        merge_loras({"transformer": model}, [LoraSpec(str(tmp_path / "missing.safetensors"))])
    with pytest.raises(ModelLoadError, match="expert='low_noise'"):
        save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(1, 256),
                   "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(256, 1)}, str(tmp_path / "l.safetensors"))
        merge_loras({"transformer": model}, [LoraSpec(str(tmp_path / "l.safetensors"), expert="low_noise")])


def test_job_merges_lora_before_calibration_and_names_it(random_tiny_dir: Path, tmp_path: Path) -> None:
    """Calibration statistics change with the LoRA (it sees the merged weights), the export and report name it."""
    from safetensors import safe_open

    from ptq.models.tiny_wan.adapter import TinyWanAdapter
    from ptq.pipeline.job import run_job
    from ptq.pipeline.settings import RunConfig

    base = TinyWanAdapter(random_tiny_dir)
    base.load(decoder=False)
    lora = make_random_lora(base.targets()["transformer"].module, rank=RANK, seed=2, std=0.2)
    path = tmp_path / "style_lora.safetensors"
    save_file(lora_in_original_keys(lora, alpha=RANK), str(path))

    def run(loras: list) -> dict:
        cfg = RunConfig()
        cfg.model.path, cfg.model.device, cfg.progress = str(random_tiny_dir), "cpu", False
        cfg.model.loras = loras
        cfg.calib.num_prompts, cfg.calib.num_steps, cfg.eval.enabled = 1, 2, False
        cfg.export.targets = ["comfyui"]
        cfg.eval.cache_dir = str(tmp_path / "cache")
        return run_job(cfg, tmp_path / f"run{len(loras)}")

    plain, merged = run([]), run([LoraSpec(str(path), SCALE)])
    amax = {r["name"]: r["input_amax"] for r in plain["layers"]}
    # blocks.0.attn1.to_q reads the (unchanged) modulated input; the Linears after a LoRA'd layer see new inputs
    changed = [r["name"] for r in merged["layers"] if r["input_amax"] and r["input_amax"] != amax[r["name"]]]
    assert "blocks.0.attn1.to_out.0" in changed and "blocks.0.ffn.net.2" in changed
    assert merged["run"]["loras"][0]["name"] == "style_lora.safetensors"
    assert merged["run"]["loras"][0]["scale"] == SCALE and merged["run"]["loras"][0]["layers"] == {"transformer": 50}
    with safe_open(merged["exports"][0]["path"], "pt") as f:
        meta = json.loads(f.metadata()["ptq_loras"])
    assert meta[0]["sha256"] == merged["run"]["loras"][0]["sha256"] and len(meta[0]["sha256"]) == 64


def test_expert_lora_merges_into_that_expert_only(random_tiny_moe_dir: Path, tmp_path: Path) -> None:
    """A14B LoRA pairs: ``expert: low_noise`` changes transformer_2 only; the LoRA is part of the fingerprint (the
    bf16 baseline cache key)."""
    from ptq.models.tiny_wan.moe_adapter import TinyWanMoEAdapter

    plain = TinyWanMoEAdapter(random_tiny_moe_dir)
    plain.load(decoder=False)
    path = tmp_path / "low.safetensors"
    save_file(make_random_lora(plain.targets()["low_noise"].module, rank=RANK, seed=4), str(path))
    merged = TinyWanMoEAdapter(random_tiny_moe_dir, loras=[LoraSpec(str(path), 1.0, "low_noise")])
    merged.load(decoder=False)
    assert merged.fingerprint() != plain.fingerprint()
    assert merged.merged_loras[0]["targets"] == ["low_noise"] and merged.merged_loras[0]["layers"] == {"low_noise": 20}
    for name, changed in (("high_noise", False), ("low_noise", True)):
        a = plain.targets()[name].module.state_dict()
        b = merged.targets()[name].module.state_dict()
        assert set(a) == set(b)
        assert any(not torch.equal(a[k], b[k]) for k in a) == changed, name


def test_distillation_lora_bias_deltas_are_merged(model, lora, tmp_path: Path) -> None:
    """Few-step distillation LoRAs (lightx2v-style) also carry ``.diff_b`` bias deltas and zeroed norm ``.diff``s."""
    state = lora_in_original_keys(lora, alpha=4.0)
    g = torch.Generator().manual_seed(9)
    for k in [k for k in state if k.endswith(".lora_up.weight")]:
        state[k.replace(".lora_up.weight", ".diff_b")] = torch.randn(state[k].shape[0], generator=g) * 0.01
    state["diffusion_model.blocks.0.norm3.diff"] = torch.zeros(256)
    path = tmp_path / "distill.safetensors"
    save_file(state, str(path))
    merged = copy.deepcopy(model)
    assert merge_lora(merged, path, 1.0) == 50
    for layer in ("blocks.0.attn1.to_q", "blocks.4.ffn.net.2"):
        from ptq.models.wan.names import diffusers_to_original

        want = model.get_submodule(layer).bias + state[f"diffusion_model.{diffusers_to_original(layer)}.diff_b"]
        assert torch.allclose(merged.get_submodule(layer).bias, want, atol=1e-6)
