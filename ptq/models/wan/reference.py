"""The unquantized WAN transformer a quantized file was made from (``ptq verify --model``): a diffusers model folder
(its ``transformer/``, or the component the file holds), the transformer folder itself, a hub id in the HF cache,
the packaged tiny model by default (``tiny_wan_moe``: the packaged two-expert one)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptq.models.base import ModelLoadError, ReferenceCheckpoint


def model_component(path: str | Path, metadata: Mapping[str, str], root: Path, component: str | None) -> str:
    """Which component of the model folder a file holds: ``component`` if given, else the file's ``ptq_component``
    header entry, else ``transformer_2`` for a ``*low_noise*`` file of a two-expert folder, else ``transformer``."""
    recorded = metadata.get("ptq_component")
    if component and recorded and component != recorded:
        raise ModelLoadError(f"--component {component}: {Path(path).name} holds {recorded} (its ptq_component "
                             f"header entry); drop --component or pass --component {recorded}")
    if component:
        chosen, why = component, "--component"
    elif recorded:
        chosen, why = recorded, "its ptq_component header entry"
    elif "low_noise" in Path(path).name and (root / "transformer_2").is_dir():
        chosen, why = "transformer_2", "a low_noise file of a two-expert folder"
    else:
        chosen, why = "transformer", "the default"
    if not (root / chosen / "config.json").is_file():
        raise ModelLoadError(f"--model {root} has no {chosen}/config.json, the component {Path(path).name} holds "
                             f"({why}): pass the model folder the file was made from"
                             + ("" if chosen == "transformer" else " (a two-expert model's folder)"))
    return chosen


def transformer_folder(model_path: str | os.PathLike[str] | None, *, file: str | Path = "",
                       metadata: Mapping[str, str] | None = None, component: str | None = None) -> Path:
    """The transformer folder of ``--model`` (see the module docstring)."""
    from ptq.models import get_adapter
    from ptq.models.wan import loading

    if model_path in ("tiny_moe", "tiny_wan_moe"):
        root = get_adapter("tiny_wan_moe").resolve(model_path)
    elif model_path is None:
        root = get_adapter("tiny_wan").resolve(None)
    else:
        root = loading.resolve_model_path(model_path, key="--model")
    if (root / "transformer" / "config.json").is_file():
        return root / model_component(file, metadata or {}, root, component)
    if (root / "config.json").is_file():
        return root
    raise ModelLoadError(f"--model={str(model_path)!r} ({root}) has neither transformer/config.json nor config.json: "
                         "pass the diffusers model folder or its transformer folder")


class WanReference(ReferenceCheckpoint):
    """One transformer folder (``config.json`` + weights) of a WAN model."""

    label = "diffusers WanTransformer3DModel"

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def content_hash(self, cache_dir: Path | None = None) -> str:
        from ptq.models.wan import loading

        return loading.transformer_content_hash(self.folder.parent, cache_dir, component=self.folder.name)

    def load(self, device: str) -> nn.Module:
        from diffusers import WanTransformer3DModel

        model = WanTransformer3DModel.from_pretrained(self.folder, torch_dtype=torch.bfloat16).to(device).eval()
        return model.requires_grad_(False)

    def empty(self, module: nn.Module) -> nn.Module:
        from diffusers import WanTransformer3DModel

        config = WanTransformer3DModel.load_config(self.folder)
        with torch.device("meta"):
            return WanTransformer3DModel.from_config(config)

    def example_inputs(self, module: nn.Module) -> tuple[tuple, dict[str, Any]]:
        """Seeded random latents (3 frames of 4x4 patches) and text (an image-conditioned model, WAN 2.1 I2V, gets
        257 image tokens + 512 text tokens), per-token timestep 500."""
        cfg = module.config
        device = next(module.parameters()).device
        g = torch.Generator("cpu").manual_seed(0)
        p = cfg.patch_size
        frames, h, w = 3, 4 * p[1], 4 * p[2]
        x = torch.randn(1, cfg.in_channels, frames, h, w, generator=g).to(device, module.dtype)
        text = torch.randn(1, 512 if cfg.image_dim else 32, cfg.text_dim, generator=g).to(device, module.dtype)
        extra = {} if not cfg.image_dim else {
            "encoder_hidden_states_image": torch.randn(1, 257, cfg.image_dim, generator=g).to(device, module.dtype)}
        seq = frames * (h // p[1]) * (w // p[2])
        return (x, torch.full((1, seq), 500.0, device=device), text), extra

    def unquantized_problems(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        fp16 = [k for k, t in state.items() if t.dtype == torch.float16]
        if not fp16:
            return []
        return [f"{len(fp16)} unquantized tensors are float16 (e.g. {fp16[0]}): WAN's unquantized "
                "tensors must be bf16 or float32 (fp16 overflows in the modulation/norm paths)"]


def wan_reference(model_path: Any, *, file_name: str, metadata: Mapping[str, str],
                  component: str | None = None) -> WanReference:
    """:meth:`ptq.models.base.ModelAdapter.reference` of the WAN adapters (ModelLoadError for broken weights)."""
    from ptq.models.weight_files import component_problems

    folder = transformer_folder(model_path, file=file_name, metadata=metadata, component=component)
    problems = component_problems(folder)
    if problems:
        raise ModelLoadError(f"--model {folder.parent}: {problems[0]}")
    return WanReference(folder)


__all__ = ["WanReference", "model_component", "transformer_folder", "wan_reference"]
