"""The WAN 2.2 TI2V-5B adapter (diffusers ``WanTransformer3DModel``; the family's single-transformer models)."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from ptq.algorithms.layers import LayerRules
from ptq.models.base import Forward, ModelAdapter, QuantTarget, SampleSpec, StepCallback
from ptq.models.wan import loading, sampling
from ptq.models.wan.comfyui import comfyui_header_metadata
from ptq.models.wan.names import diffusers_to_original, try_original_to_diffusers

#: Block numbering of ``WanTransformer3DModel`` and the layers kept in high precision by default (patch and
#: condition embedders, output projection: the sensitive ends of the network).
WAN_LAYER_RULES = LayerRules(block_pattern=r"^blocks\.(\d+)\.",
                             high_precision=("patch_embedding", "condition_embedder.*", "proj_out"))


class WanAdapter(ModelAdapter):
    """A WAN diffusers folder: UMT5 text encoder, one ``WanTransformer3DModel``, UniPC scheduler, VAE."""

    name: ClassVar[str] = "wan"
    layer_rules: ClassVar[LayerRules] = WAN_LAYER_RULES
    module_classes: ClassVar[tuple[str, ...]] = ("WanTransformer3DModel",)

    def __init__(self, path: str | os.PathLike[str] | None, *, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", vae_device: str | torch.device = "cpu") -> None:
        self.path_arg = path
        self.root = self.resolve(path)
        self.dtype = dtype
        self.device = torch.device(device)
        self.vae_device = torch.device(vae_device)
        self._defaults = loading.read_sample_defaults(self.root)
        self._encoder: loading.WanComponents | None = None
        self.components: loading.WanComponents | None = None

    @classmethod
    def resolve(cls, path: str | os.PathLike[str] | None) -> Path:
        """The model folder for ``path`` (local folder or hub id in the HF cache)."""
        return loading.resolve_model_path(path)

    @classmethod
    def missing_parts(cls, root: Path) -> list[str]:
        """Sub-folders / files a usable folder needs that ``root`` lacks."""
        need = ["transformer/config.json", "scheduler/scheduler_config.json", "text_encoder", "tokenizer"]
        return [p for p in need if not (root / p).exists()]

    # -- identity -------------------------------------------------------------------------------------------
    @property
    def display_name(self) -> str:
        return loading.model_display_name(self.path_arg, self.root)

    def content_hash(self, cache_dir: Path | None = None) -> str:
        return loading.transformer_content_hash(self.root, cache_dir)

    def fingerprint(self) -> str:
        return loading.weights_fingerprint(self.root)

    # -- sampling -------------------------------------------------------------------------------------------
    @property
    def sample_defaults(self) -> dict[str, Any]:
        return self._defaults

    def sample_spec(self, *, height: int | None = None, width: int | None = None, num_frames: int | None = None,
                    num_steps: int | None = None, guidance_scale: float | None = None, seed: int = 0) -> SampleSpec:
        d = self._defaults
        return SampleSpec(height=int(height or d["height"]), width=int(width or d["width"]),
                          num_frames=int(num_frames or d["num_frames"]),
                          num_steps=int(num_steps or d["num_inference_steps"]),
                          guidance_scale=float(d["guidance_scale"] if guidance_scale is None else guidance_scale),
                          seed=int(seed))

    def _patch(self) -> tuple[int, ...]:
        cfg = loading._read_json(self.root / "transformer" / "config.json")
        return tuple(cfg.get("patch_size", (1, 2, 2)))

    def check_spec(self, spec: SampleSpec) -> dict[str, str]:
        d = self._defaults
        return sampling.spec_problems(spec, spatial=int(d.get("vae_scale_factor_spatial", 16)),
                                      temporal=int(d.get("vae_scale_factor_temporal", 4)), patch=self._patch())

    # -- components -----------------------------------------------------------------------------------------
    @property
    def text_encoder_dtype(self) -> torch.dtype:
        return self.dtype

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        if self._encoder is None:
            te, tok = loading.load_text_encoder(self.root, dtype=self.text_encoder_dtype, device=self.device)
            self._encoder = loading.WanComponents(None, None, None, te, tok, defaults=self._defaults)
        return sampling.encode_prompts(self._encoder, prompts)

    def free_text_encoder(self) -> None:
        if self._encoder is not None:
            self._encoder.free_text_encoder()
        self._encoder = None
        gc.collect()

    def load(self, *, decoder: bool = True) -> None:
        self.components = loading.WanComponents(
            transformer=loading.load_transformer(self.root, dtype=self.dtype, device=self.device),
            scheduler=loading.load_scheduler(self.root),
            vae=loading.load_vae(self.root, device=self.vae_device) if decoder else None,
            text_encoder=None, tokenizer=None, defaults=self._defaults, path=str(self.root))

    def _loaded(self) -> loading.WanComponents:
        if self.components is None:
            raise RuntimeError(f"{type(self).__name__}: call load() first")
        return self.components

    def targets(self) -> dict[str, QuantTarget]:
        return {"transformer": QuantTarget("transformer", self._loaded().transformer)}

    def denoise(self, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None, spec: SampleSpec, *,
                condition: Any = None, forward: Mapping[str, Forward] | None = None,
                on_step_start: Callable[[int], None] | None = None, on_step_end: StepCallback | None = None,
                ) -> torch.Tensor:
        return sampling.denoise(self._loaded(), prompt_embeds, negative_embeds, spec, condition_latents=condition,
                                on_step_start=on_step_start, on_step_end=on_step_end,
                                forward=(forward or {}).get("transformer"))

    def encode_condition(self, image: torch.Tensor) -> torch.Tensor:
        """TI2V: the normalised first-frame latent ``[1, C, 1, H/s, W/s]`` of the image."""
        return sampling.encode_image(self._loaded(), image)

    @property
    def can_decode(self) -> bool:
        return self.components is not None and self.components.vae is not None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return sampling.decode_latents(self._loaded(), latents)

    # -- export ---------------------------------------------------------------------------------------------
    @classmethod
    def target_key(cls, key: str, target: str) -> str:
        """ComfyUI and diffusers' BFL single-file loader both read the original Wan names."""
        return diffusers_to_original(key)

    @classmethod
    def module_key(cls, key: str, target: str) -> str | None:
        return try_original_to_diffusers(key)

    @classmethod
    def export_metadata(cls, target: str, module_config: Mapping[str, Any]) -> dict[str, str]:
        """ComfyUI: the header ``config`` override when its shape detection would build the model wrong (head
        width other than 128, text_dim other than 4096, ...; :mod:`ptq.models.wan.comfyui`)."""
        if target != "comfyui" or "num_attention_heads" not in module_config:
            return {}
        return comfyui_header_metadata(module_config)
