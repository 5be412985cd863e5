"""The WAN adapter: diffusers ``WanTransformer3DModel`` folders of the family's single-transformer models (WAN 2.2
TI2V-5B, WAN 2.1 T2V 1.3B / 14B and I2V 14B), with their image conditioning, LoRA merges, scheduler overrides and
offloading; :mod:`ptq.models.wan.a14b` adds the two-expert WAN 2.2 A14B models."""

from __future__ import annotations

import gc
import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from ptq.algorithms.layers import LayerRules
from ptq.models.base import (
    Forward,
    LoraSpec,
    ModelAdapter,
    QuantTarget,
    ReferenceCheckpoint,
    SampleSpec,
    StepCallback,
)
from ptq.models.files import FileFamily
from ptq.models.wan import family, loading, sampling
from ptq.models.wan.comfyui import comfyui_header_metadata
from ptq.models.wan.files import WAN_FILES
from ptq.models.wan.names import diffusers_to_original, try_original_to_diffusers

#: Block numbering of ``WanTransformer3DModel`` and the layers kept in high precision by default (patch and
#: condition embedders, output projection: the sensitive ends of the network).
WAN_LAYER_RULES = LayerRules(block_pattern=r"^blocks\.(\d+)\.",
                             high_precision=("patch_embedding", "condition_embedder.*", "proj_out"))


class WanAdapter(ModelAdapter):
    """A WAN diffusers folder: UMT5 text encoder, one ``WanTransformer3DModel``, UniPC scheduler, VAE (and, for
    WAN 2.1 I2V, a CLIP image encoder). ``model_name``: a :mod:`ptq.models.wan.family` spec name (its sampling
    defaults; default: the spec the folder matches); ``loras``: merged into the weights on :meth:`load`;
    ``scheduler`` / ``flow_shift``: another diffusers scheduler class / flow shift than the folder's;
    ``offload``: keep the weights on the CPU and stream blocks to the GPU (diffusers' group offloading)."""

    name: ClassVar[str] = "wan"
    layer_rules: ClassVar[LayerRules] = WAN_LAYER_RULES
    module_classes: ClassVar[tuple[str, ...]] = ("WanTransformer3DModel",)
    file_family: ClassVar[FileFamily] = WAN_FILES
    #: quantization target name -> the folder's component (sub-folder) holding it
    components_by_target: ClassVar[dict[str, str]] = {"transformer": "transformer"}

    def __init__(self, path: str | os.PathLike[str] | None, *, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", vae_device: str | torch.device = "cpu",
                 model_name: str | None = None, loras: tuple[LoraSpec, ...] | list[LoraSpec] = (),
                 scheduler: str | None = None, flow_shift: float | None = None, offload: bool = False) -> None:
        self.path_arg = path
        self.root = self.resolve(path)
        self.dtype = dtype
        self.device = torch.device(device)
        self.vae_device = torch.device(vae_device)
        self.spec = family.spec_for_folder(self.root, None if path is None else str(path), model_name)
        self._defaults = loading.read_sample_defaults(self.root, None if self.spec is None
                                                      else self.spec.sample_defaults)
        self._index = loading.read_pipeline_config(self.root)
        self.loras = [LoraSpec(str(lo.path), float(lo.scale), lo.expert) for lo in loras]
        self.scheduler_class, self.flow_shift, self.offload = scheduler, flow_shift, bool(offload)
        self.merged_loras: list[dict[str, Any]] = []
        self._conditions: dict[int, tuple[torch.Tensor, sampling.WanImageCondition]] = {}
        self._component_hashes: dict[str, str] = {}
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

    @classmethod
    def weight_problems(cls, root: Path) -> list[str]:
        """The transformer(s), text encoder and (when present) VAE and image encoder weights."""
        from ptq.models.weight_files import component_problems

        parts = ["transformer", "transformer_2", "text_encoder", "vae", "image_encoder"]
        required = {"transformer", "text_encoder"}
        return [p for part in parts if part in required or (root / part).is_dir()
                for p in component_problems(root / part, required=part != "vae")]

    # -- identity -------------------------------------------------------------------------------------------
    @property
    def display_name(self) -> str:
        return loading.model_display_name(self.path_arg, self.root)

    def content_hash(self, cache_dir: Path | None = None) -> str:
        """sha256 of the quantized components' files (one component: its hash; several: a hash of theirs, and each
        component's own is recorded in its exports, see :meth:`export_metadata`)."""
        self._component_hashes = {c: loading.transformer_content_hash(self.root, cache_dir, c)
                                  for c in self.components_by_target.values()}
        hashes = list(self._component_hashes.values())
        return hashes[0] if len(hashes) == 1 else hashlib.sha256("".join(hashes).encode()).hexdigest()

    def fingerprint(self) -> str:
        """Weights (names, sizes, mtimes), merged LoRAs and scheduler overrides: what the bf16 outputs depend on."""
        parts = [loading.weights_fingerprint(self.root, c) for c in self.components_by_target.values()]
        if self.loras or self.scheduler_class or self.flow_shift is not None:
            lora_ids = [(lo.path, os.path.getsize(lo.path) if os.path.isfile(lo.path) else -1, lo.scale, lo.expert)
                        for lo in self.loras]
            parts.append(repr((lora_ids, self.scheduler_class, self.flow_shift)))
        return parts[0] if len(parts) == 1 else hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    # -- sampling -------------------------------------------------------------------------------------------
    @property
    def sample_defaults(self) -> dict[str, Any]:
        return self._defaults

    def sample_spec(self, *, height: int | None = None, width: int | None = None, num_frames: int | None = None,
                    num_steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                    guidance_scale_2: float | None = None) -> SampleSpec:
        d = self._defaults
        g2 = d.get("guidance_scale_2") if guidance_scale_2 is None else guidance_scale_2
        return SampleSpec(height=int(height or d["height"]), width=int(width or d["width"]),
                          num_frames=int(num_frames or d["num_frames"]),
                          num_steps=int(num_steps or d["num_inference_steps"]),
                          guidance_scale=float(d["guidance_scale"] if guidance_scale is None else guidance_scale),
                          seed=int(seed), guidance_scale_2=None if g2 is None else float(g2))

    def _patch(self) -> tuple[int, ...]:
        cfg = loading._read_json(self.root / "transformer" / "config.json")
        return tuple(cfg.get("patch_size", (1, 2, 2)))

    def check_spec(self, spec: SampleSpec) -> dict[str, str]:
        d = self._defaults
        spatial, temporal = loading.vae_factors(self.root, d)
        return sampling.spec_problems(spec, spatial=spatial, temporal=temporal, patch=self._patch())

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

    @property
    def boundary_ratio(self) -> float | None:
        """Two experts: the switch point as a fraction of the training timesteps (``model_index.json``, else the
        spec's)."""
        return self._index.get("boundary_ratio", None if self.spec is None else self.spec.boundary_ratio)

    @property
    def expand_timesteps(self) -> bool:
        """Per-token timesteps (TI2V-5B and the tiny models) or one per video (WAN 2.1, A14B)."""
        return bool(self._index.get("expand_timesteps", True if self.spec is None else self.spec.expand_timesteps))

    def load(self, *, decoder: bool = True) -> None:
        load_device = "cpu" if self.offload else self.device
        modules = {c: loading.load_transformer(self.root, dtype=self.dtype, device=load_device, subfolder=c)
                   for c in self.components_by_target.values()}
        image_encoder = processor = None
        if decoder and (self.root / "image_encoder").exists():
            image_encoder, processor = loading.load_image_encoder(self.root, device=self.vae_device)
        self.components = loading.WanComponents(
            transformer=modules["transformer"],
            scheduler=loading.load_scheduler(self.root, class_name=self.scheduler_class, flow_shift=self.flow_shift),
            vae=loading.load_vae(self.root, device=self.vae_device) if decoder else None,
            text_encoder=None, tokenizer=None, defaults=self._defaults, path=str(self.root),
            transformer_2=modules.get("transformer_2"), boundary_ratio=self.boundary_ratio,
            expand_timesteps=self.expand_timesteps, image_encoder=image_encoder, image_processor=processor,
            device=self.device)
        if self.loras:
            from ptq.models.wan.lora import merge_loras

            by_target = {t: modules[c] for t, c in self.components_by_target.items()}
            self.merged_loras = merge_loras(by_target, self.loras)
        if self.offload:
            from ptq.models.wan.offload import enable_offload

            for module in modules.values():
                enable_offload(module, self.device)

    def _loaded(self) -> loading.WanComponents:
        if self.components is None:
            raise RuntimeError(f"{type(self).__name__}: call load() first")
        return self.components

    def _target_timesteps(self, target: str) -> tuple[float, float] | None:
        comps = self._loaded()
        boundary = comps.boundary_timestep()
        if boundary is None:
            return None
        top = float(comps.scheduler.config.num_train_timesteps) + 1.0
        return (boundary, top) if self.components_by_target[target] == "transformer" else (0.0, boundary)

    def targets(self) -> dict[str, QuantTarget]:
        experts = self._loaded().experts()
        return {t: QuantTarget(t, experts[c], self._target_timesteps(t)) for t, c in self.components_by_target.items()}

    def denoise(self, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None, spec: SampleSpec, *,
                condition: Any = None, forward: Mapping[str, Forward] | None = None,
                on_step_start: Callable[[int], None] | None = None, on_step_end: StepCallback | None = None,
                ) -> torch.Tensor:
        forwards = {self.components_by_target[t]: f for t, f in (forward or {}).items()}
        return sampling.denoise(self._loaded(), prompt_embeds, negative_embeds, spec, condition_latents=condition,
                                on_step_start=on_step_start, on_step_end=on_step_end, forwards=forwards)

    def after_quantize(self, target_name: str) -> None:
        if self.offload:
            from ptq.models.wan.offload import refresh_offload

            refresh_offload(self.targets()[target_name].module)

    @property
    def compute_device(self) -> torch.device | None:
        return self.device if self.offload and self.device.type != "cpu" else None

    def step_timesteps(self, spec: SampleSpec) -> list[float]:
        scheduler = self._loaded().scheduler
        scheduler = type(scheduler).from_config(scheduler.config)
        scheduler.set_timesteps(spec.num_steps)
        return [float(t) for t in scheduler.timesteps]

    @property
    def conditioning(self) -> str:
        """``first_frame`` (TI2V, the tiny models), ``concat`` (WAN 2.2 I2V) or ``concat_clip`` (WAN 2.1 I2V);
        ``none`` for text-to-video-only models."""
        if self.expand_timesteps:
            return "first_frame"
        cfg = loading._read_json(self.root / "transformer" / "config.json")
        if cfg.get("in_channels") == cfg.get("out_channels"):
            return "none"
        return "concat_clip" if cfg.get("image_dim") else "concat"

    def encode_condition(self, image: torch.Tensor) -> Any:
        """TI2V: the normalised first-frame latent ``[1, C, 1, H/s, W/s]`` of the image; WAN 2.1 / 2.2 I2V: a
        :class:`~ptq.models.wan.sampling.WanImageCondition` (the image, and its CLIP embeddings for WAN 2.1)."""
        kind = self.conditioning
        if kind == "first_frame":
            return sampling.encode_image(self._loaded(), image)
        if kind == "none":
            raise ValueError(f"{self.display_name} is a text-to-video model: remove calib.images / eval.images")
        cached = self._conditions.get(id(image))
        if cached is None or cached[0] is not image:  # the VAE / CLIP encodings of an image are built once
            embeds = sampling.clip_image_embeds(self._loaded(), image) if kind == "concat_clip" else None
            cached = self._conditions[id(image)] = (image, sampling.WanImageCondition(image.float(), embeds))
        return cached[1]

    @property
    def can_decode(self) -> bool:
        return self.components is not None and self.components.vae is not None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return sampling.decode_latents(self._loaded(), latents)

    # -- export ---------------------------------------------------------------------------------------------
    def export_stem(self, target_name: str) -> str:
        return "model" if len(self.components_by_target) == 1 else target_name

    def export_component(self, target_name: str) -> str:
        return self.components_by_target[target_name]

    def export_info(self) -> dict[str, Any]:
        return {"ptq_loras": self.merged_loras} if self.merged_loras else {}

    def export_metadata(self, target_name: str) -> dict[str, Any]:
        """Two experts: each file names its expert and component, and records its own component's sha256 (what
        ``ptq verify`` checks against ``--model``)."""
        if len(self.components_by_target) == 1:
            return {}
        c = self.components_by_target[target_name]
        out: dict[str, Any] = {"ptq_expert": target_name, "ptq_component": c}
        if c in self._component_hashes:
            out["ptq_source_sha256"] = self._component_hashes[c]
        return out

    @classmethod
    def reference(cls, model_path: Any, *, file_name: str, metadata: Mapping[str, str],
                  component: str | None = None) -> ReferenceCheckpoint:
        from ptq.models.wan.reference import wan_reference

        return wan_reference(model_path, file_name=file_name, metadata=metadata, component=component)

    @classmethod
    def target_key(cls, key: str, target: str) -> str:
        """ComfyUI and diffusers' BFL single-file loader both read the original Wan names."""
        return diffusers_to_original(key)

    @classmethod
    def module_key(cls, key: str, target: str) -> str | None:
        return try_original_to_diffusers(key)

    @classmethod
    def target_header(cls, target: str, module_config: Mapping[str, Any]) -> dict[str, str]:
        """ComfyUI: the header ``config`` override when its shape detection would build the model wrong (head
        width other than 128, text_dim other than 4096, ...; :mod:`ptq.models.wan.comfyui`)."""
        if target != "comfyui" or "num_attention_heads" not in module_config:
            return {}
        return comfyui_header_metadata(module_config)
