"""WAN 2.2 model family: configs, name map, loading, the denoising loop and the adapter.

The modules are importable one by one (``ptq.models.wan.names`` is what file tools need); the names below are the
family's public API.
"""

from ptq.algorithms.layers import register_layer_rules
from ptq.models.base import ModelLoadError, SampleSpec
from ptq.models.wan.adapter import WAN_LAYER_RULES, WanAdapter
from ptq.models.wan.configs import (
    UMT5_XXL_ENCODER_CONFIG,
    WAN22_TI2V_5B_HUB_ID,
    WAN22_TI2V_5B_PARAMS,
    WAN22_TI2V_5B_SAMPLE_DEFAULTS,
    WAN22_TI2V_5B_SCHEDULER_CONFIG,
    WAN22_TI2V_5B_TRANSFORMER_CONFIG,
)
from ptq.models.wan.loading import (
    WanComponents,
    build_meta_transformer,
    build_random_transformer,
    cast_parameters,
    fp32_module_names,
    load_scheduler,
    load_text_encoder,
    load_transformer,
    load_vae,
    load_wan,
    read_sample_defaults,
    resolve_model_path,
)
from ptq.models.wan.sampling import decode_latents, denoise, encode_image, encode_prompts, latent_shape

register_layer_rules("WanTransformer3DModel", WAN_LAYER_RULES)

__all__ = [
    "UMT5_XXL_ENCODER_CONFIG",
    "WAN22_TI2V_5B_HUB_ID",
    "WAN22_TI2V_5B_PARAMS",
    "WAN22_TI2V_5B_SAMPLE_DEFAULTS",
    "WAN22_TI2V_5B_SCHEDULER_CONFIG",
    "WAN22_TI2V_5B_TRANSFORMER_CONFIG",
    "WAN_LAYER_RULES",
    "ModelLoadError",
    "SampleSpec",
    "WanAdapter",
    "WanComponents",
    "build_meta_transformer",
    "build_random_transformer",
    "cast_parameters",
    "decode_latents",
    "denoise",
    "encode_image",
    "encode_prompts",
    "fp32_module_names",
    "latent_shape",
    "load_scheduler",
    "load_text_encoder",
    "load_transformer",
    "load_vae",
    "load_wan",
    "read_sample_defaults",
    "resolve_model_path",
]
