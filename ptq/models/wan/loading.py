"""Loading WAN diffusers folders one component at a time (the text encoder is freed before the transformer loads)."""

from __future__ import annotations

import gc
import hashlib
import importlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ptq.models.base import ModelLoadError
from ptq.models.wan.configs import WAN22_TI2V_5B_SAMPLE_DEFAULTS, WAN22_TI2V_5B_TRANSFORMER_CONFIG

log = logging.getLogger(__name__)


@dataclass
class WanComponents:
    """Everything needed to sample: transformer, scheduler config, VAE and (until freed) the text encoder."""

    transformer: torch.nn.Module
    scheduler: Any
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module | None
    tokenizer: Any
    defaults: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    #: A14B: the low-noise expert, serving timesteps below ``boundary_ratio * num_train_timesteps``
    transformer_2: torch.nn.Module | None = None
    boundary_ratio: float | None = None
    #: per-token timesteps (TI2V-5B, the tiny models); False: one timestep per video (WAN 2.1, A14B)
    expand_timesteps: bool = True
    #: WAN 2.1 I2V: CLIP vision model and its image processor (image embeddings for the cross-attention)
    image_encoder: torch.nn.Module | None = None
    image_processor: Any = None
    #: where the denoising loop runs (the GPU of a transformer offloaded to CPU memory); None = the transformer's
    #: parameters' device
    device: torch.device | None = None

    def execution_device(self) -> torch.device:
        """The device the latents live on and the forwards run on."""
        return self.device if self.device is not None else next(self.transformer.parameters()).device

    def experts(self) -> dict[str, torch.nn.Module]:
        """The denoisers by component name (``transformer``, and ``transformer_2`` for two experts)."""
        out = {"transformer": self.transformer}
        if self.transformer_2 is not None:
            out["transformer_2"] = self.transformer_2
        return out

    def boundary_timestep(self) -> float | None:
        """Timesteps ``>=`` this go to ``transformer``, the rest to ``transformer_2`` (None: one transformer)."""
        if self.transformer_2 is None or self.boundary_ratio is None:
            return None
        return float(self.boundary_ratio) * float(self.scheduler.config.num_train_timesteps)

    def component_for(self, t: float) -> str:
        """The component serving timestep ``t`` (diffusers' WanPipeline rule)."""
        boundary = self.boundary_timestep()
        return "transformer" if boundary is None or float(t) >= boundary else "transformer_2"

    @property
    def vae_scale_spatial(self) -> int:
        return int(self.defaults["vae_scale_factor_spatial"])

    @property
    def vae_scale_temporal(self) -> int:
        return int(self.defaults["vae_scale_factor_temporal"])

    def free_text_encoder(self) -> None:
        """Drop the text encoder (11.4 GB for UMT5-XXL) once all prompts are encoded."""
        self.text_encoder = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def build_meta_transformer(config: dict[str, Any] | None = None) -> torch.nn.Module:
    """The WAN transformer on the ``meta`` device (no memory): real shapes and names for tests and planning."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        return WanTransformer3DModel(**(config or WAN22_TI2V_5B_TRANSFORMER_CONFIG))


def build_random_transformer(
    config: dict[str, Any] | None = None, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, device: str = "cuda"
) -> torch.nn.Module:
    """The WAN transformer with seeded random weights (default: the real 5B config), e.g. for GPU benchmarks."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(**(config or WAN22_TI2V_5B_TRANSFORMER_CONFIG))
    return cast_parameters(model, dtype).eval().requires_grad_(False)


def fp32_module_names(model: torch.nn.Module) -> set[str]:
    """Names of the modules diffusers keeps in float32 when loading a model in bf16/fp16 (the model class's
    ``_keep_in_fp32_modules``; WAN: ``time_embedder``, ``scale_shift_table``, ``norm2``): a parameter stays float32
    when a part of its dotted name is one of them."""
    return set(getattr(model, "_keep_in_fp32_modules", None) or [])


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast ``model``'s parameters to ``dtype`` in place, except those of :func:`fp32_module_names`, as
    ``from_pretrained(torch_dtype=dtype)`` does; returns ``model``."""
    keep = fp32_module_names(model)
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not any(part in keep for part in f"{name}.{pname}".split(".")):
                p.data = p.data.to(dtype)
    return model


def resolve_model_path(path: str | os.PathLike[str] | None, key: str = "model.path") -> Path:
    """A local diffusers folder, or a hub id found in the local HF cache (offline). ``key``: how errors name the
    setting (``model.path``, ``--model``)."""
    if path is None or str(path) == "":
        raise ModelLoadError(f"{key} is not set: give a diffusers folder or a hub id")
    p = Path(os.path.expanduser(str(path)))
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{key}={path!r} is a file; expected a diffusers folder with transformer/")
        return p
    if str(path).count("/") == 1 and not str(path).startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(path), local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - any hub error means "not available offline"
            raise ModelLoadError(
                f"{key}={path!r}: not a local folder, and not found in the Hugging Face cache "
                f"(offline: {type(exc).__name__}). Download it on a machine with internet "
                f"(`{_hub_download_command()} {path}`) or pass {key}=/local/diffusers/folder."
            ) from exc
    raise ModelLoadError(f"{key}={path!r} does not exist")


def _hub_download_command() -> str:
    """The download command of the installed huggingface_hub: ``hf download`` (>= 0.34), else the older CLI."""
    try:
        from huggingface_hub import __version__
    except ImportError:
        return "hf download"
    major, minor = (int(x) for x in re.findall(r"\d+", __version__)[:2])
    return "hf download" if (major, minor) >= (0, 34) else "huggingface-cli download"


def model_display_name(path: str | os.PathLike[str] | None, root: Path) -> str:
    """What an export records as its source model: the hub id as given or the local folder's name (never an
    absolute local path)."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists() and str(path).count("/") == 1:
        return str(path)
    return root.resolve().name


def transformer_content_hash(root: Path, cache_dir: Path | None = None, component: str = "transformer") -> str:
    """sha256 (hex) of a component's files (``transformer/*`` in name order, name and bytes), cached in
    ``cache_dir/model_hashes.json`` by path, size and modification time so a multi-GB model is read once."""
    files = sorted(f for f in (root / component).iterdir() if f.is_file())
    key = hashlib.sha256(json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
                         .encode()).hexdigest()[:24]
    cache_file = None if cache_dir is None else Path(cache_dir).expanduser() / "model_hashes.json"
    cached: dict[str, str] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
        except (OSError, json.JSONDecodeError):
            cached = {}
        if key in cached:
            return cached[key]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    digest = h.hexdigest()
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cached[key] = digest
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1, sort_keys=True))
        os.replace(tmp, cache_file)
    return digest


def weights_fingerprint(root: Path, component: str = "transformer") -> str:
    """Identity of a component's weights: file names, sizes and mtimes (cheap; no hashing of GBs)."""
    h = hashlib.sha256()
    for f in sorted((root / component).glob("*")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"missing {path}") from exc
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc


def _component_class(root: Path, component: str, default: str) -> Any:
    """The class of a component as ``model_index.json`` names it (``[library, class]``, as diffusers pipelines
    load them), else the component config's ``_class_name`` from diffusers."""
    index = _read_json(root / "model_index.json") if (root / "model_index.json").exists() else {}
    entry = index.get(component)
    if isinstance(entry, (list, tuple)) and len(entry) == 2:
        library, name = entry
    else:
        library = "diffusers"
        name = _read_json(root / component / "config.json").get("_class_name", default)
    try:
        return getattr(importlib.import_module(library), name)
    except (ImportError, AttributeError):
        raise ModelLoadError(f"{root / 'model_index.json'}: cannot import {component} class {library}.{name}") from None


#: Sampling keys a folder's ``model_index.json`` may override (the tiny models store theirs there).
SAMPLE_KEYS = (*WAN22_TI2V_5B_SAMPLE_DEFAULTS, "guidance_scale_2", "negative_prompt", "fps")


#: The sampling values that shape the problem and have no safe default: the latent size per pixel and per frame.
VAE_FACTORS = ("vae_scale_factor_spatial", "vae_scale_factor_temporal")


def read_sample_defaults(root: Path, spec_defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's sampling defaults (``spec_defaults`` of the published model the folder is, else the 5B's sizes
    and steps), overridden by the folder's ``model_index.json``, with the VAE factors of its ``vae/config.json``
    (diffusers' ``AutoencoderKLWan`` names them ``scale_factor_*``). A folder of no published model without them is
    an error when they are needed (:func:`vae_factors`): a wrong factor silently changes every latent's shape."""
    index = _read_json(root / "model_index.json") if (root / "model_index.json").exists() else {}
    defaults = dict(WAN22_TI2V_5B_SAMPLE_DEFAULTS if spec_defaults is None else spec_defaults)
    if spec_defaults is None:
        for key in VAE_FACTORS:
            defaults.pop(key, None)
    defaults.update({k: index[k] for k in SAMPLE_KEYS if k in index})
    vae_cfg = root / "vae" / "config.json"
    cfg = _read_json(vae_cfg) if vae_cfg.exists() else {}
    if "scale_factor_spatial" in cfg:
        defaults["vae_scale_factor_spatial"] = int(cfg["scale_factor_spatial"])
        defaults["vae_scale_factor_temporal"] = int(cfg["scale_factor_temporal"])
    defaults["_ptq_model"] = index.get("_ptq_model")
    return defaults


def vae_factors(root: Path, defaults: dict[str, Any]) -> tuple[int, int]:
    """(spatial, temporal) VAE scale factors of :func:`read_sample_defaults`; :class:`ModelLoadError` naming what is
    missing when the folder gives none."""
    if all(k in defaults for k in VAE_FACTORS):
        return int(defaults[VAE_FACTORS[0]]), int(defaults[VAE_FACTORS[1]])
    why = "vae/config.json has no scale_factor_spatial" if (root / "vae" / "config.json").exists() else \
        "no vae/config.json"
    raise ModelLoadError(f"{root}: {why}, and the transformer is not a published WAN model's: the VAE's scale "
                         "factors (pixels and frames per latent) cannot be known; add the model's vae/ folder (its "
                         "config.json is enough)")


def read_pipeline_config(root: Path) -> dict[str, Any]:
    """``model_index.json`` (empty when the folder has none)."""
    return _read_json(root / "model_index.json") if (root / "model_index.json").exists() else {}


def load_transformer(root: Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                     subfolder: str = "transformer"):
    """``WanTransformer3DModel`` from ``subfolder`` (``transformer_2``: A14B's low-noise expert) in ``dtype``
    (diffusers keeps time_embedder, scale_shift_table, norm2 in fp32)."""
    from diffusers import WanTransformer3DModel

    if not (root / subfolder / "config.json").exists():
        raise ModelLoadError(f"{root} has no {subfolder}/config.json: not a WAN diffusers folder"
                             + (" with two experts" if subfolder != "transformer" else ""))
    model = WanTransformer3DModel.from_pretrained(root, subfolder=subfolder, torch_dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def load_image_encoder(root: Path, *, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any]:
    """WAN 2.1 I2V: (CLIP vision model in float32, its image processor) from ``image_encoder/`` and
    ``image_processor/``."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    for sub in ("image_encoder", "image_processor"):
        if not (root / sub).exists():
            raise ModelLoadError(f"{root} has no {sub}/ folder (WAN 2.1 image-to-video needs it)")
    enc = CLIPVisionModel.from_pretrained(root, subfolder="image_encoder", dtype=torch.float32)
    return enc.to(device).eval().requires_grad_(False), CLIPImageProcessor.from_pretrained(root / "image_processor")


#: The keyword of the flow shift in each scheduler class that has one.
FLOW_SHIFT_KEYS = {"UniPCMultistepScheduler": "flow_shift", "DPMSolverMultistepScheduler": "flow_shift",
                   "FlowMatchEulerDiscreteScheduler": "shift"}


def load_scheduler(root: Path, *, class_name: str | None = None, flow_shift: float | None = None) -> Any:
    """The folder's scheduler (UniPC flow-prediction for WAN), optionally as another diffusers scheduler class
    (``class_name``, configured from the folder's config: e.g. ``FlowMatchEulerDiscreteScheduler`` for few-step
    distilled schedules) and with another ``flow_shift``."""
    import diffusers

    cfg = _read_json(root / "scheduler" / "scheduler_config.json")
    name = class_name or cfg.get("_class_name", "UniPCMultistepScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ModelLoadError(f"model.scheduler={name!r} is not a diffusers scheduler class")
    overrides: dict[str, Any] = {}
    if flow_shift is not None:
        if name not in FLOW_SHIFT_KEYS:
            raise ModelLoadError(f"model.flow_shift: scheduler {name} has no flow shift "
                                 f"(one of {', '.join(FLOW_SHIFT_KEYS)})")
        overrides[FLOW_SHIFT_KEYS[name]] = float(flow_shift)
    return cls.from_config(cfg, **overrides)


def load_vae(root: Path, *, device: str | torch.device = "cpu") -> torch.nn.Module | None:
    """The folder's VAE in float32 (``AutoencoderKLWan`` for the 5B, ``SpaceToDepthVAE`` for the tiny model)."""
    if not (root / "vae" / "config.json").exists():
        return None
    cls = _component_class(root, "vae", "AutoencoderKLWan")
    kwargs = {"torch_dtype": torch.float32} if cls.__module__.startswith("diffusers") else {}
    vae = cls.from_pretrained(root / "vae", **kwargs)
    return vae.to(device).eval().requires_grad_(False)


def load_text_encoder(root: Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """(UMT5 encoder in ``dtype``, tokenizer)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    for sub in ("text_encoder", "tokenizer"):
        if not (root / sub).exists():
            raise ModelLoadError(f"{root} has no {sub}/ folder")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    te = UMT5EncoderModel.from_pretrained(root, subfolder="text_encoder", dtype=dtype)
    return te.to(device).eval().requires_grad_(False), tokenizer


def load_wan(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    load_text_encoder_: bool = True,
    load_vae_: bool = True,
    vae_device: str | torch.device | None = None,
    text_encoder_dtype: torch.dtype | None = None,
) -> WanComponents:
    """Load every component at once (convenient for small models; the pipeline loads them one at a time to keep
    peak memory low). ``path``: local diffusers folder or hub id from the HF cache."""
    root = resolve_model_path(path)
    transformer = load_transformer(root, dtype=dtype, device=device)
    te, tok = (load_text_encoder(root, dtype=text_encoder_dtype or dtype, device=device) if load_text_encoder_
               else (None, None))
    vae = load_vae(root, device=vae_device or "cpu") if load_vae_ else None
    return WanComponents(transformer, load_scheduler(root), vae, te, tok, read_sample_defaults(root), str(root))
