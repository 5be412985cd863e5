"""The WAN family's published models: one JSON per model in ``model_configs/`` (transformer config as diffusers
stores it, scheduler, VAE factors, experts and their boundary, image conditioning, sampling defaults, and where each
value came from), read into :class:`WanModelSpec`.

Which spec a folder is: ``model.name`` when it names one, else the hub id or folder name, else the folder's own
``transformer/config.json`` and ``model_index.json`` (``boundary_ratio`` tells the two-expert A14B from WAN 2.1 14B).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"

#: Transformer config keys that tell models apart (the rest are shared by the family).
_SHAPE_KEYS = ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers", "ffn_dim",
               "image_dim", "added_kv_proj_dim")


@dataclass(frozen=True)
class WanModelSpec:
    """One published WAN model (see the module docstring). ``experts``: target names in schedule order
    (``["transformer"]``, or ``["high_noise", "low_noise"]`` for A14B: ``transformer`` serves timesteps >=
    ``boundary_ratio * 1000``, ``transformer_2`` the rest)."""

    name: str
    hub_id: str
    pipeline: str
    transformer: dict[str, Any]
    scheduler: dict[str, Any]
    vae: dict[str, Any]
    sample_defaults: dict[str, Any]
    experts: tuple[str, ...] = ("transformer",)
    boundary_ratio: float | None = None
    expand_timesteps: bool = False
    image_encoder: dict[str, Any] | None = None
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def two_experts(self) -> bool:
        return self.boundary_ratio is not None

    @property
    def conditioning(self) -> str:
        """How an image conditions the video: ``"none"`` (text-to-video), ``"first_frame"`` (TI2V: the image's
        latent pins latent frame 0), ``"concat"`` (mask + image-video latent concatenated to the noise, WAN 2.2
        I2V), ``"concat_clip"`` (the same plus CLIP image embeddings, WAN 2.1 I2V)."""
        if self.expand_timesteps:
            return "first_frame"
        if self.transformer["in_channels"] == self.transformer["out_channels"]:
            return "none"
        return "concat_clip" if self.transformer.get("image_dim") else "concat"

    def transformer_kwargs(self) -> dict[str, Any]:
        """kwargs for ``WanTransformer3DModel`` (patch size as a tuple)."""
        return {**self.transformer, "patch_size": tuple(self.transformer["patch_size"])}


@functools.cache
def wan_models() -> dict[str, WanModelSpec]:
    """Every stored spec by name."""
    out = {}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        raw = json.loads(path.read_text())
        raw["experts"] = tuple(raw.get("experts", ("transformer",)))
        out[raw["name"]] = WanModelSpec(**raw)
    return out


def get_spec(name: str) -> WanModelSpec:
    """The spec called ``name``; KeyError listing the known names otherwise."""
    try:
        return wan_models()[name]
    except KeyError:
        raise KeyError(f"no WAN model spec {name!r}; known: {', '.join(wan_models())}") from None


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def spec_for_folder(root: Path, path_arg: str | None = None, name: str | None = None) -> WanModelSpec | None:
    """The spec of a model folder (see the module docstring), or None when nothing matches."""
    models = wan_models()
    if name and name in models:
        return models[name]
    for key in (str(path_arg or ""), root.name):
        for spec in models.values():
            if key and key.rstrip("/").split("/")[-1].lower() in (spec.hub_id.lower(), spec.hub_id.split("/")[1].lower()):
                return spec
    cfg = _read(root / "transformer" / "config.json")
    if not cfg:
        return None
    two = _read(root / "model_index.json").get("boundary_ratio") is not None
    for spec in models.values():
        if spec.two_experts == two and all(cfg.get(k) == spec.transformer.get(k) for k in _SHAPE_KEYS):
            return spec
    return None
