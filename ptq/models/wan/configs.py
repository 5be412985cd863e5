"""Published configs of WAN 2.2 TI2V-5B (diffusers ``Wan-AI/Wan2.2-TI2V-5B-Diffusers``), as stored in its folder."""

from __future__ import annotations

from typing import Any

# diffusers `Wan-AI/Wan2.2-TI2V-5B-Diffusers` transformer config (see shared/README.md).
WAN22_TI2V_5B_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "in_channels": 48,
    "out_channels": 48,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 14336,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}
WAN22_TI2V_5B_PARAMS = 4_999_787_712
# Sampling defaults of the 5B (diffusers' own WanPipeline defaults, 480x832x81, are not the 5B's).
WAN22_TI2V_5B_SAMPLE_DEFAULTS: dict[str, Any] = {
    "height": 704,
    "width": 1280,
    "num_frames": 121,
    "num_inference_steps": 50,
    "guidance_scale": 5.0,
    "max_sequence_length": 512,
    "vae_scale_factor_spatial": 16,
    "vae_scale_factor_temporal": 4,
}
WAN22_TI2V_5B_HUB_ID = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
# scheduler/scheduler_config.json of the 5B (UniPC, flow prediction, flow_shift 5.0)
WAN22_TI2V_5B_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000, "solver_order": 2,
    "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 5.0, "predict_x0": True,
    "solver_type": "bh2", "lower_order_final": True, "final_sigmas_type": "zero", "timestep_spacing": "linspace",
    "steps_offset": 0, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
}
# text_encoder/config.json: UMT5-XXL encoder (5.7B parameters, 11.4 GB bf16)
UMT5_XXL_ENCODER_CONFIG: dict[str, Any] = {
    "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 256384,
    "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6, "dropout_rate": 0.0, "tie_word_embeddings": False, "is_encoder_decoder": False,
    "use_cache": False, "pad_token_id": 0, "eos_token_id": 1,
}
