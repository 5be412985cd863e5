"""Hydra structured configs: presets compose, typos and out-of-range values are errors naming the key."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ptq.config import RunConfig, register_configs, validate_config
from ptq.run import CONFIG_DIR, PromptError, load_prompts


def _compose(*overrides: str) -> RunConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("ptq", overrides=list(overrides))
    return OmegaConf.to_object(cfg)


@pytest.mark.parametrize("preset,fmt,model", [("tiny_nvfp4", "nvfp4", "tiny_wan"), ("tiny_fp8", "fp8", "tiny_wan"),
                                              ("wan_nvfp4", "nvfp4", "wan22_ti2v_5b"),
                                              ("wan_fp8", "fp8", "wan22_ti2v_5b")])
def test_presets_compose(preset: str, fmt: str, model: str) -> None:
    cfg = _compose(f"config={preset}")
    assert isinstance(cfg, RunConfig)
    assert cfg.quant.format == fmt and cfg.model.name == model and cfg.preset == preset
    validate_config(cfg)


def test_wan_preset_uses_real_5b_settings() -> None:
    cfg = _compose("config=wan_nvfp4")
    assert cfg.model.path == "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
    assert (cfg.calib.height, cfg.calib.width, cfg.calib.num_frames) == (480, 832, 33)
    assert cfg.calib.num_prompts == 16 and cfg.calib.num_steps == 8 and cfg.calib.guidance_scale == 5.0


def test_command_line_overrides_beat_preset() -> None:
    cfg = _compose("config=tiny_nvfp4", "quant=fp8", "calib.num_prompts=3")
    assert cfg.quant.format == "fp8" and cfg.calib.num_prompts == 3


def test_typo_in_override_is_an_error() -> None:
    with pytest.raises(ConfigCompositionException, match="num_prmpts"):
        _compose("calib.num_prmpts=3")
    with pytest.raises(ConfigCompositionException):
        _compose("quant.formt=fp8")


def test_wrong_type_is_an_error() -> None:
    with pytest.raises(ConfigCompositionException, match="num_prompts"):
        _compose("calib.num_prompts=many")


@pytest.mark.parametrize("override,match", [
    ("quant.format=int3", "quant.format"),
    ("calib.num_prompts=0", "calib.num_prompts"),
    ("eval.num_steps=-2", "eval.num_steps"),
    ("export.unquantized_dtype=float16", "export.unquantized_dtype"),
    ("quant/activation=mse calib.samples_per_call=-1", "samples_per_call"),
    ("quant/activation=percentile quant.activation.percentile=120", "quant.activation.percentile"),
])
def test_out_of_range_values_name_the_key(override: str, match: str) -> None:
    cfg = _compose(*override.split())
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        validate_config(cfg)


def test_prompt_errors(tmp_path) -> None:
    cfg = _compose("calib.prompts_file=" + str(tmp_path / "missing.txt"))
    with pytest.raises(PromptError, match="missing.txt"):
        load_prompts(cfg.calib, "calib")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    cfg = _compose(f"calib.prompts_file={empty}")
    with pytest.raises(PromptError, match="no prompts"):
        load_prompts(cfg.calib, "calib")


def test_prompts_from_a_datasets_dataset(tmp_path) -> None:
    csv = tmp_path / "prompts.csv"
    csv.write_text("caption,id\na red circle moving left,0\na blue square moving up,1\n  ,2\na cat,3\n")
    cfg = _compose("calib.dataset.name=csv", f"calib.dataset.data_files={csv}", "calib.dataset.column=caption",
                   "calib.num_prompts=2")
    assert load_prompts(cfg.calib, "calib") == ["a red circle moving left", "a blue square moving up"]
    cfg = _compose("calib.dataset.name=csv", f"calib.dataset.data_files={csv}", "calib.dataset.column=text")
    with pytest.raises(PromptError, match="column='text' not in"):
        load_prompts(cfg.calib, "calib")


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (CONFIG_DIR / "quant").glob("*.yaml")))
def test_every_quant_recipe_composes(recipe: str) -> None:
    """Each configs/quant/*.yaml is a valid recipe on top of both presets; sample-based activation methods come
    with calibration samples."""
    for preset in ("tiny_nvfp4", "wan_nvfp4"):
        cfg = _compose(f"config={preset}", f"quant={recipe}")
        validate_config(cfg)
        assert cfg.quant.format in recipe
        if cfg.quant.activation != "max" and not cfg.quant.weight_only:
            samples = cfg.quant.needs().with_samples_per_call(cfg.calib.samples_per_call).samples
            assert samples > 0, f"{recipe}: activation={cfg.quant.activation} needs samples"


@pytest.mark.parametrize("overrides,samples", [((), 4096), (("calib.samples_per_call=512",), 512)])
def test_sample_based_recipes_state_their_samples(overrides: tuple[str, ...], samples: int) -> None:
    """quant=nvfp4_act_mse sets no calib key: the activation method asks for 4096 |x| samples per call in runs of
    NVFP4's 16-input blocks; an explicit calib.samples_per_call still wins."""
    cfg = _compose("config=tiny_nvfp4", "quant=nvfp4_act_mse", *overrides)
    validate_config(cfg)
    assert cfg.calib.samples_per_call == (samples if overrides else 0)
    needs = cfg.quant.needs().with_samples_per_call(cfg.calib.samples_per_call)
    assert (needs.samples, needs.sample_block) == (samples, 16)
    assert _compose("config=tiny_nvfp4", "quant=fp8", "quant/activation=mse").quant.needs().sample_block == 16
    assert _compose("config=tiny_nvfp4").quant.needs().samples == 0
