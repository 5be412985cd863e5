"""The WAN family's presets compose against the schema; each names a stored model spec and the adapter of its
family; LoRA, scheduler and expert-trajectory overrides parse; shipped conditioning images exist."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ptq.config import RunConfig, register_configs, validate_config
from ptq.models import ADAPTERS
from ptq.models.base import LoraSpec
from ptq.models.wan.family import wan_models
from ptq.pipeline.prompts import resolve_data_path
from ptq.run import CONFIG_DIR

FAMILY = sorted(p.stem for p in (CONFIG_DIR / "config").glob("wan2*.yaml") if p.stem not in ("wan_nvfp4", "wan_fp8"))


def _compose(*overrides: str) -> RunConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return OmegaConf.to_object(compose("ptq", overrides=list(overrides)))


@pytest.mark.parametrize("preset", FAMILY)
def test_family_presets_compose(preset: str) -> None:
    cfg = _compose(f"config={preset}")
    validate_config(cfg)
    spec = wan_models()[cfg.model.name]
    assert cfg.model.adapter == ("wan22_a14b" if spec.two_experts else "wan") and cfg.model.path == spec.hub_id
    assert cfg.preset == preset and cfg.quant.format in ("nvfp4", "fp8")
    assert (cfg.calib.height, cfg.calib.width, cfg.calib.num_frames) in ((480, 832, 33), (720, 1280, 33))
    assert ("{expert}" in cfg.export.filename) == spec.two_experts
    assert bool(cfg.calib.images) == (spec.conditioning != "none")
    for img in cfg.calib.images:
        assert resolve_data_path(img).is_file()
    if "4step" in preset:
        assert cfg.calib.num_steps == 4 and cfg.calib.guidance_scale == cfg.calib.guidance_scale_2 == 1.0
        assert cfg.model.scheduler == "FlowMatchEulerDiscreteScheduler"
    else:
        assert cfg.calib.negative_prompt is None  # the model's own negative prompt


def test_every_spec_has_a_model_config_and_presets() -> None:
    models = {p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")}
    assert set(wan_models()) <= models
    assert {"wan22_a14b", "tiny_wan_moe", "wan", "tiny_wan"} <= set(ADAPTERS)


def test_lora_and_expert_overrides_parse() -> None:
    cfg = _compose("config=tiny_moe_nvfp4", "model.loras=[{path: /x/hi.safetensors, scale: 0.8, expert: high_noise},"
                   "{path: /x/lo.safetensors}]", "calib.expert_trajectory=bf16", "model.offload=true")
    assert cfg.model.loras == [LoraSpec("/x/hi.safetensors", 0.8, "high_noise"), LoraSpec("/x/lo.safetensors")]
    assert cfg.calib.expert_trajectory == "bf16" and cfg.model.offload and cfg.model.adapter == "tiny_wan_moe"
    with pytest.raises(Exception, match="scael"):
        _compose("config=tiny_moe_nvfp4", "model.loras=[{path: /x.safetensors, scael: 1}]")


@pytest.mark.parametrize("preset,adapter", [("tiny_moe_nvfp4", "tiny_wan_moe"), ("tiny_moe_4step_nvfp4", "tiny_wan_moe"),
                                            ("tiny_i2v_nvfp4", "tiny_wan")])
def test_tiny_family_presets_compose(preset: str, adapter: str) -> None:
    cfg = _compose(f"config={preset}")
    validate_config(cfg)
    assert cfg.model.adapter == adapter and cfg.preset == preset
    for img in cfg.calib.images + cfg.eval.images:
        assert resolve_data_path(img).is_file()


def test_offload_with_gptq_is_a_clear_error() -> None:
    cfg = _compose("config=tiny_moe_nvfp4", "quant=nvfp4_gptq", "model.offload=true")
    with pytest.raises(ValueError, match="model.offload=true with quant/weight=gptq"):
        validate_config(cfg)


def test_offload_with_the_sensitivity_analysis_or_several_processes_is_a_clear_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _compose("config=tiny_moe_nvfp4", "quant=nvfp4_mixed", "quant/weight=mse", "model.offload=true")
    with pytest.raises(ValueError, match=r"model.offload=true with quant.mixed"):
        validate_config(cfg)
    cfg = _compose("config=tiny_moe_nvfp4", "model.offload=true")
    validate_config(cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="model.offload=true with 2 processes"):
        validate_config(cfg)
