"""The small WAN 2.2-style model ptq ships and tests with: model (``model``), its synthetic world (``world``), its
training objective (``training``) and its adapter (``adapter``)."""

from ptq.models.tiny_wan.model import (
    TINY_FLOW_SHIFT,
    TINY_MAX_SEQUENCE_LENGTH,
    TINY_SAMPLE_DEFAULTS,
    TINY_TEXT_DIM,
    TINY_TEXT_ENCODER_CONFIG,
    TINY_TRANSFORMER_CONFIG,
    TINY_WAN_PATH,
    WAN_5B_SCHEDULER_CONFIG,
    SpaceToDepthVAE,
    TinyWanComponents,
    build_random_tiny_wan,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_transformer,
    encode_prompts,
    encode_text,
    expand_timestep,
    generate_latents,
    load_tiny_wan,
    save_tiny_wan,
    video_to_uint8,
)
from ptq.models.tiny_wan.training import flow_matching_loss, heldout_batch, heldout_loss
from ptq.models.tiny_wan.world import (
    BACKGROUND_STYLES,
    COLORS,
    DIRECTIONS,
    SCALINGS,
    SHAPES,
    SIZES,
    TINY_VOCAB,
    ObjectSpec,
    SceneSpec,
    parse_prompt,
    read_prompts,
    render_scenes,
    sample_scene,
    scene_to_prompt,
)

__all__ = [
    "BACKGROUND_STYLES", "COLORS", "DIRECTIONS", "SCALINGS", "SHAPES", "SIZES", "TINY_FLOW_SHIFT",
    "TINY_MAX_SEQUENCE_LENGTH", "TINY_SAMPLE_DEFAULTS", "TINY_TEXT_DIM", "TINY_TEXT_ENCODER_CONFIG",
    "TINY_TRANSFORMER_CONFIG", "TINY_VOCAB", "TINY_WAN_PATH", "WAN_5B_SCHEDULER_CONFIG", "ObjectSpec", "SceneSpec",
    "SpaceToDepthVAE", "TinyWanComponents", "build_random_tiny_wan", "build_scheduler", "build_text_encoder",
    "build_tokenizer", "build_transformer", "encode_prompts", "encode_text", "expand_timestep", "flow_matching_loss",
    "generate_latents", "heldout_batch", "heldout_loss", "load_tiny_wan", "parse_prompt", "read_prompts",
    "render_scenes", "sample_scene", "save_tiny_wan", "scene_to_prompt", "video_to_uint8",
]
