"""Merging LoRAs into WAN transformers with diffusers' own WAN LoRA loading and PEFT's fusing.

``diffusers.loaders.WanLoraLoaderMixin.lora_state_dict`` reads the file and converts ComfyUI (``diffusion_model.*``)
and kohya/musubi (``lora_unet_*``) keys to diffusers' (``_convert_non_diffusers_wan_lora_to_diffusers``, alpha
folded into the factors); ``_maybe_expand_t2v_lora_for_i2v`` pads a text-to-video LoRA for an I2V model's image
layers; ``load_lora_into_transformer`` wraps the Linears in PEFT LoRA layers; ``fuse_lora`` merges
``W += scale * B @ A`` (PEFT computes the delta in float32 on the CPU and adds it to the bf16 weight) and
``unload_lora`` puts the plain Linears back. One LoRA at a time, so each gets exactly its own scale.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ptq.models.base import LoraSpec, ModelLoadError

log = logging.getLogger(__name__)


def lora_file_sha256(path: Path) -> str:
    """sha256 (hex) of a LoRA file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _targets_of(lora: LoraSpec, modules: Mapping[str, torch.nn.Module]) -> list[str]:
    if lora.expert is None:
        return list(modules)
    if lora.expert not in modules:
        raise ModelLoadError(f"model.loras: {lora.path}: expert={lora.expert!r}; this model's targets are "
                             f"{', '.join(modules)}")
    return [lora.expert]


def merge_lora(module: torch.nn.Module, path: Path, scale: float, adapter_name: str = "ptq_lora") -> int:
    """Fuse the LoRA file at ``path`` into ``module`` (in place) with strength ``scale``; returns the number of
    Linears it changed. Raises ModelLoadError when the file matches none of the module's layers."""
    from diffusers.loaders import WanLoraLoaderMixin
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        state = WanLoraLoaderMixin.lora_state_dict(str(path))
    except Exception as exc:  # noqa: BLE001 - unreadable or not a WAN LoRA
        raise ModelLoadError(f"model.loras: cannot read {path} as a WAN LoRA: {exc}") from exc
    state = WanLoraLoaderMixin._maybe_expand_t2v_lora_for_i2v(transformer=module, state_dict=state)
    WanLoraLoaderMixin.load_lora_into_transformer(state, transformer=module, adapter_name=adapter_name)
    layers = sum(isinstance(m, BaseTunerLayer) for m in module.modules())
    if layers == 0:
        raise ModelLoadError(f"model.loras: {path} matches no layer of the {type(module).__name__}")
    module.fuse_lora(lora_scale=scale, adapter_names=[adapter_name])
    module.unload_lora()
    return layers


def merge_loras(modules: Mapping[str, torch.nn.Module], loras: Sequence[LoraSpec]) -> list[dict[str, Any]]:
    """Merge every LoRA into the targets it applies to, in order; returns what was merged (file name, sha256,
    scale, targets, layers changed) for the export metadata and the report."""
    merged = []
    for k, lora in enumerate(loras):
        path = Path(lora.path).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"model.loras[{k}].path={lora.path!r}: no such file")
        targets = _targets_of(lora, modules)
        layers = {t: merge_lora(modules[t], path, float(lora.scale), f"ptq_lora_{k}") for t in targets}
        log.info("merged LoRA %s (scale %g) into %s", path.name, lora.scale, ", ".join(targets))
        merged.append({"name": path.name, "sha256": lora_file_sha256(path), "scale": float(lora.scale),
                       "targets": targets, "layers": layers})
    return merged


def make_random_lora(model: torch.nn.Module, rank: int = 4, seed: int = 0, std: float = 0.02,
                     patterns: tuple[str, ...] = ("attn1.", "attn2.", "ffn.")) -> dict[str, torch.Tensor]:
    """A random LoRA for the block Linears of a WAN transformer (names containing one of ``patterns``) in
    diffusers/PEFT keys (``transformer.<layer>.lora_A.weight [rank, in]``, ``lora_B.weight [out, rank]``, float32):
    the small LoRA the tests and docs make for the small models."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks.") and any(p in name for p in patterns):
            out[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * std
            out[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * std
    return out


def lora_in_original_keys(state: dict[str, torch.Tensor], alpha: float, style: str = "comfyui"
                          ) -> dict[str, torch.Tensor]:
    """A diffusers-keyed LoRA in the layouts WAN LoRAs are shared in: ``comfyui`` (``diffusion_model.<original
    name>.lora_down/lora_up.weight`` + ``.alpha``) or ``kohya`` (``lora_unet_<original_name_with_underscores>``).
    ``alpha``: the stored alpha; the factors are rescaled by ``rank / alpha`` so the LoRA's effect is unchanged."""
    from ptq.models.wan.names import diffusers_to_original

    if style not in ("comfyui", "kohya"):
        raise ValueError(f"style={style!r}: expected 'comfyui' or 'kohya'")
    out = {}
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        layer = key[len("transformer."):-len(".lora_A.weight")]
        b = state[key.replace("lora_A", "lora_B")]
        orig = diffusers_to_original(layer)
        prefix = f"diffusion_model.{orig}" if style == "comfyui" else "lora_unet_" + orig.replace(".", "_")
        out[f"{prefix}.lora_down.weight"] = a * (a.shape[0] / alpha)
        out[f"{prefix}.lora_up.weight"] = b.clone()
        out[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return out
