"""Hydra structured configs: a typo in an override is an error.

Groups: ``config`` (presets in ``ptq/configs/config/*.yaml``, package _global_), ``model`` (``configs/model``),
``quant`` (recipes, ``configs/quant``) and, per part of a recipe, ``quant/weight``, ``quant/activation`` and
``quant/smoothing`` (one option per named method of ``ptq.algorithms.recipe``, each its own structured schema).
The schemas themselves are the dataclasses of :mod:`ptq.pipeline.settings`. ``validate_config`` checks value
ranges and the limits of the recipe's quantization strategy (:mod:`ptq.algorithms.strategies`).
"""

from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore

from ptq.algorithms.recipe import ACTIVATION_METHODS, SMOOTHING_METHODS, WEIGHT_METHODS
from ptq.algorithms.strategies import strategy_for, validate_recipe
from ptq.calibration.hessian_store import HESSIAN_STORAGES
from ptq.pipeline.runtime_eval import runtime_list
from ptq.pipeline.settings import (
    CalibConfig,
    DatasetConfig,
    EvalConfig,
    ExportConfig,
    ModelConfig,
    RunConfig,
    SamplingConfig,
)

__all__ = ["CalibConfig", "DatasetConfig", "EvalConfig", "ExportConfig", "ModelConfig", "RunConfig",
           "SamplingConfig", "register_configs", "validate_config"]


def register_configs() -> None:
    """Register the schemas so YAML presets are validated against them."""
    cs = ConfigStore.instance()
    cs.store(name="ptq_schema", node=RunConfig)
    for name, node in WEIGHT_METHODS.items():
        cs.store(group="quant/weight", name=name, node=node)
    for name, node in ACTIVATION_METHODS.items():
        cs.store(group="quant/activation", name=name, node=node)
    for name, node in SMOOTHING_METHODS.items():
        cs.store(group="quant/smoothing", name=name, node=node)


def _check_sampling(prefix: str, s: Any) -> None:
    if s.num_prompts < 1:
        raise ValueError(f"{prefix}.num_prompts={s.num_prompts}: expected >= 1")
    for key in ("height", "width", "num_frames", "num_steps"):
        v = getattr(s, key)
        if v is not None and v < 1:
            raise ValueError(f"{prefix}.{key}={v}: expected >= 1")
    if s.guidance_scale is not None and s.guidance_scale < 0:
        raise ValueError(f"{prefix}.guidance_scale={s.guidance_scale}: expected >= 0")


def validate_config(cfg: RunConfig) -> None:
    """Raise ValueError naming the key for out-of-range values (types are already checked by Hydra)."""
    validate_recipe(cfg.quant)
    _check_sampling("calib", cfg.calib)
    _check_sampling("eval", cfg.eval)
    if cfg.model.dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"model.dtype={cfg.model.dtype!r}: expected bfloat16, float16 or float32")
    if cfg.export.unquantized_dtype not in ("bfloat16", "float32"):
        raise ValueError(f"export.unquantized_dtype={cfg.export.unquantized_dtype!r}: expected bfloat16 or float32 "
                         "(float16 breaks WAN: ComfyUI/diffusers expect bf16/fp32 for unquantized tensors)")
    if cfg.calib.checkpoint_every < 0:
        raise ValueError(f"calib.checkpoint_every={cfg.calib.checkpoint_every}: expected >= 0 (0 = no checkpoints)")
    if cfg.calib.hessian_storage not in HESSIAN_STORAGES:
        raise ValueError(f"calib.hessian_storage={cfg.calib.hessian_storage!r}: expected one of "
                         f"{', '.join(HESSIAN_STORAGES)}")
    from ptq.pipeline.experts import TRAJECTORIES

    if cfg.calib.expert_trajectory not in TRAJECTORIES:
        raise ValueError(f"calib.expert_trajectory={cfg.calib.expert_trajectory!r}: expected one of "
                         f"{', '.join(TRAJECTORIES)}")
    strategy_for(cfg.quant).check_device(cfg.quant, offload=cfg.model.offload)
    from ptq.pipeline.distributed import env_world_size

    world = env_world_size()
    if cfg.model.offload and world > 1:
        raise ValueError(f"model.offload=true with {world} processes (WORLD_SIZE): offloaded models run "
                         "in one process; launch without torchrun / accelerate, or use model.offload=false")
    for i, lora in enumerate(cfg.model.loras):
        if not lora.path:
            raise ValueError(f"model.loras[{i}].path is empty: give the LoRA's .safetensors file")
    runtime_list(list(cfg.eval.runtimes))
    _check_samples(cfg)


def _check_samples(cfg: RunConfig) -> None:
    """``calib.samples_per_call``: 0 (what the recipe asks for) or an override > 0."""
    n, asked = cfg.calib.samples_per_call, cfg.quant.needs().samples
    if n >= 0:
        return
    if asked:
        raise ValueError(f"quant.activation={cfg.quant.activation.label!r} needs calib.samples_per_call > 0, got {n} "
                         f"(0: the {asked} per call it asks for)")
    raise ValueError(f"calib.samples_per_call={n}: expected >= 0 (0 = what the recipe needs)")
