"""WAN 2.2 model adapter: loading (real 5B or the packaged tiny model), prompt encoding and the denoising loop.

The loop mirrors diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline`` with ``expand_timesteps=True`` (per-token
timesteps, TI2V-5B): CFG runs cond and uncond as two batch-1 forwards, latents stay float32 between steps, the
transformer sees them in its own dtype. Written as plain functions so calibration and evaluation can hook each step.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

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


class ModelLoadError(RuntimeError):
    """The model path is missing, incomplete or not a WAN diffusers folder."""


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

    @property
    def vae_scale_spatial(self) -> int:
        return int(self.defaults.get("vae_scale_factor_spatial", 16))

    @property
    def vae_scale_temporal(self) -> int:
        return int(self.defaults.get("vae_scale_factor_temporal", 4))

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
    # keep diffusers' fp32 modules (time_embedder, scale_shift_table, norm2) in fp32, like from_pretrained does
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, module in model.named_modules():
        if any(part in keep for part in name.split(".")):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if not any(part in keep for part in f"{name}.{pname}".split(".")):
                p.data = p.data.to(dtype)
    return model.eval().requires_grad_(False)


def resolve_model_path(path: str | os.PathLike[str] | None) -> Path:
    """A local diffusers folder, or a hub id found in the local HF cache (offline). ``None``: the packaged tiny model."""
    if path is None or str(path) in {"", "tiny", "tiny_wan"}:
        from ptq.models.tiny_wan import TINY_WAN_PATH

        return Path(TINY_WAN_PATH)
    p = Path(os.path.expanduser(str(path)))
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"model.path={path!r} is a file; expected a diffusers folder with transformer/")
        return p
    if str(path).count("/") == 1 and not str(path).startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(path), local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - any hub error means "not available offline"
            raise ModelLoadError(
                f"model.path={path!r}: not a local folder, and not found in the Hugging Face cache "
                f"(offline: {type(exc).__name__}). Download it on a machine with internet "
                f"(`huggingface-cli download {path}`) or pass model.path=/local/diffusers/folder."
            ) from exc
    raise ModelLoadError(f"model.path={path!r} does not exist")


def model_display_name(path: str | os.PathLike[str] | None, root: Path) -> str:
    """What an export records as its source model: the hub id as given, the packaged model's name, or the local
    folder's name (never an absolute local path)."""
    if path is None or str(path) in {"", "tiny", "tiny_wan"}:
        return "tiny_wan"
    p = Path(os.path.expanduser(str(path)))
    if not p.exists() and str(path).count("/") == 1:
        return str(path)
    return root.resolve().name


def transformer_content_hash(root: Path, cache_dir: Path | None = None) -> str:
    """sha256 (hex) of the transformer's files (``transformer/*`` in name order, name and bytes), cached in
    ``cache_dir/model_hashes.json`` by path, size and modification time so a multi-GB model is read once."""
    import hashlib

    files = sorted(f for f in (root / "transformer").iterdir() if f.is_file())
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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"missing {path}") from exc
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc


def _vae_class(name: str) -> Any:
    if name == "SpaceToDepthVAE":
        from ptq.models.tiny_wan import SpaceToDepthVAE

        return SpaceToDepthVAE
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ModelLoadError(f"unknown VAE class {name!r} in vae/config.json")
    return cls


def read_sample_defaults(root: Path) -> dict[str, Any]:
    """The 5B's sampling defaults, overridden by the folder's ``model_index.json`` (the tiny model stores its own)."""
    index = _read_json(root / "model_index.json") if (root / "model_index.json").exists() else {}
    defaults = dict(WAN22_TI2V_5B_SAMPLE_DEFAULTS)
    defaults.update({k: index[k] for k in WAN22_TI2V_5B_SAMPLE_DEFAULTS if k in index})
    vae_cfg = root / "vae" / "config.json"
    if vae_cfg.exists():
        cfg = _read_json(vae_cfg)
        if "scale_factor_spatial" in cfg:
            defaults["vae_scale_factor_spatial"] = int(cfg["scale_factor_spatial"])
            defaults["vae_scale_factor_temporal"] = int(cfg["scale_factor_temporal"])
    defaults["_ptq_model"] = index.get("_ptq_model")
    return defaults


def load_transformer(root: Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """``WanTransformer3DModel`` in ``dtype`` (diffusers keeps time_embedder, scale_shift_table, norm2 in fp32)."""
    from diffusers import WanTransformer3DModel

    if not (root / "transformer" / "config.json").exists():
        raise ModelLoadError(f"{root} has no transformer/config.json: not a WAN diffusers folder")
    model = WanTransformer3DModel.from_pretrained(root, subfolder="transformer", torch_dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def load_scheduler(root: Path) -> Any:
    """The folder's scheduler (UniPC flow-prediction for WAN 2.2)."""
    import diffusers

    cfg = _read_json(root / "scheduler" / "scheduler_config.json")
    return getattr(diffusers, cfg.get("_class_name", "UniPCMultistepScheduler")).from_config(cfg)


def load_vae(root: Path, *, device: str | torch.device = "cpu") -> torch.nn.Module | None:
    """The folder's VAE in float32 (``AutoencoderKLWan`` for the 5B, ``SpaceToDepthVAE`` for the tiny model)."""
    if not (root / "vae" / "config.json").exists():
        return None
    cfg = _read_json(root / "vae" / "config.json")
    cls = _vae_class(cfg.get("_class_name", "AutoencoderKLWan"))
    kwargs = {} if cls.__name__ == "SpaceToDepthVAE" else {"torch_dtype": torch.float32}
    vae = cls.from_pretrained(root / "vae", **kwargs)
    return vae.to(device).eval().requires_grad_(False)


def load_text_encoder(root: Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """(UMT5 encoder, tokenizer). The packaged tiny model's encoder was trained in float32; UMT5-XXL runs in bf16."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    for sub in ("text_encoder", "tokenizer"):
        if not (root / sub).exists():
            raise ModelLoadError(f"{root} has no {sub}/ folder")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    te_dtype = torch.float32 if read_sample_defaults(root).get("_ptq_model") else dtype
    te = UMT5EncoderModel.from_pretrained(root, subfolder="text_encoder", dtype=te_dtype)
    return te.to(device).eval().requires_grad_(False), tokenizer


def load_wan(
    path: str | os.PathLike[str] | None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    load_text_encoder_: bool = True,
    load_vae_: bool = True,
    vae_device: str | torch.device | None = None,
) -> WanComponents:
    """Load every component at once (convenient for small models; the pipeline loads them one at a time to keep
    peak memory low). ``path``: local diffusers folder, hub id from the HF cache, or ``None`` for the tiny model."""
    root = resolve_model_path(path)
    transformer = load_transformer(root, dtype=dtype, device=device)
    te, tok = load_text_encoder(root, dtype=dtype, device=device) if load_text_encoder_ else (None, None)
    vae = load_vae(root, device=vae_device or "cpu") if load_vae_ else None
    return WanComponents(transformer, load_scheduler(root), vae, te, tok, read_sample_defaults(root), str(root))


@torch.no_grad()
def encode_prompts(
    components: WanComponents, prompts: Sequence[str], *, max_sequence_length: int | None = None, batch_size: int = 8
) -> torch.Tensor:
    """UMT5 embeddings ``[N, L, text_dim]`` as WanPipeline makes them (padding to L, zeros past each prompt's length)."""
    if components.text_encoder is None or components.tokenizer is None:
        raise RuntimeError("the text encoder was already freed; encode every prompt before calibration")
    if len(prompts) == 0:
        raise ValueError("no prompts to encode")
    length = int(max_sequence_length or components.defaults.get("max_sequence_length", 512))
    te = components.text_encoder
    device = next(te.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = [" ".join(p.strip().split()) for p in prompts[i : i + batch_size]]
        tok = components.tokenizer(
            chunk, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
            return_attention_mask=True, return_tensors="pt",
        )
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        hidden = te(ids, mask).last_hidden_state
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)  # == WanPipeline's zero padding after seq_len
        out.append(hidden.float().cpu())
    return torch.cat(out)


@dataclass(frozen=True)
class SampleSpec:
    """One video to denoise. Latent shape follows the VAE factors: ``[C, (F-1)//t+1, H//s, W//s]``."""

    height: int
    width: int
    num_frames: int
    num_steps: int
    guidance_scale: float
    seed: int


def latent_shape(components: WanComponents, spec: SampleSpec) -> tuple[int, int, int, int]:
    """``[C, F_lat, H_lat, W_lat]`` for ``spec``; raises if H/W do not divide into whole patches."""
    cfg = components.transformer.config
    s, t = components.vae_scale_spatial, components.vae_scale_temporal
    p = tuple(cfg.patch_size)
    if spec.height % (s * p[1]) or spec.width % (s * p[2]):
        raise ValueError(f"height/width must be multiples of {s * p[1]} (VAE x{s} times patch {p[1]}), "
                         f"got {spec.height}x{spec.width}")
    if (spec.num_frames - 1) % t:
        raise ValueError(f"num_frames must be 1 + a multiple of {t}, got {spec.num_frames}")
    return (int(cfg.in_channels), (spec.num_frames - 1) // t + 1, spec.height // s, spec.width // s)


StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def denoise(
    components: WanComponents,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    spec: SampleSpec,
    *,
    condition_latents: torch.Tensor | None = None,
    on_step_start: Callable[[int], None] | None = None,
    on_step_end: StepCallback | None = None,
    forward: Callable[..., Any] | None = None,
) -> torch.Tensor:
    """Sample one video; returns the final latents ``[1, C, F, H, W]`` float32 on the transformer's device.

    prompt_embeds / negative_embeds: ``[1, L, text_dim]``. ``condition_latents`` (``[1, C, 1, H, W]``, normalised)
    switches to image-to-video: the first latent frame is pinned to it and gets timestep 0, as in TI2V.
    ``on_step_start(i)`` runs before step i's forwards (cond then uncond); ``on_step_end(i, t, latents)`` after it.
    ``forward``: called instead of the transformer with the same arguments (e.g. a
    :class:`ptq.calibration.cuda_graph.CudaGraphForward` of it).
    """
    transformer = components.transformer
    call = forward if forward is not None else transformer
    device = next(transformer.parameters()).device
    tdtype = transformer.dtype
    scheduler = type(components.scheduler).from_config(components.scheduler.config)
    scheduler.set_timesteps(spec.num_steps, device=device)
    shape = (1, *latent_shape(components, spec))
    gen = torch.Generator("cpu").manual_seed(int(spec.seed))
    latents = torch.randn(shape, generator=gen, dtype=torch.float32).to(device)
    mask = torch.ones(shape, dtype=torch.float32, device=device)
    if condition_latents is not None:
        mask[:, :, 0] = 0
        condition_latents = condition_latents.to(device, torch.float32)
    p = tuple(transformer.config.patch_size)
    cond = prompt_embeds.to(device, tdtype)
    uncond = negative_embeds.to(device, tdtype) if negative_embeds is not None else None
    do_cfg = uncond is not None and spec.guidance_scale > 1.0
    scheduler.set_begin_index(0)
    for i, t in enumerate(scheduler.timesteps):
        if on_step_start is not None:
            on_step_start(i)
        x = latents if condition_latents is None else (1 - mask) * condition_latents + mask * latents
        x = x.to(tdtype)
        timestep = (mask[0][0][:: p[0], :: p[1], :: p[2]] * t).flatten().unsqueeze(0)
        noise_pred = call(hidden_states=x, timestep=timestep, encoder_hidden_states=cond,
                          return_dict=False)[0].float()
        if do_cfg:
            noise_uncond = call(hidden_states=x, timestep=timestep, encoder_hidden_states=uncond,
                                return_dict=False)[0].float()
            noise_pred = noise_uncond + spec.guidance_scale * (noise_pred - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if on_step_end is not None:
            on_step_end(i, t, latents if condition_latents is None else (1 - mask) * condition_latents + mask * latents)
    if condition_latents is not None:
        latents = (1 - mask) * condition_latents + mask * latents
    return latents


def _latent_norm(vae: torch.nn.Module, z_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    cfg = getattr(vae, "config", {})
    mean = cfg.get("latents_mean") if hasattr(cfg, "get") else None
    std = cfg.get("latents_std") if hasattr(cfg, "get") else None
    if mean is None or std is None:
        return None
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, z_dim, 1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, z_dim, 1, 1, 1)
    return m, s


def _first(out: Any) -> torch.Tensor:
    """diffusers VAEs return output objects / tuples; the tiny VAE returns the tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


@torch.no_grad()
def decode_latents(components: WanComponents, latents: torch.Tensor) -> torch.Tensor:
    """Latents ``[1, C, F, H, W]`` -> video ``[F, H*s, W*s, 3]`` float32 in [0, 1] (VAE on its own device)."""
    vae = components.vae
    if vae is None:
        raise RuntimeError("no VAE loaded: set eval.decode=false or use a model folder with vae/")
    z = latents.to(getattr(vae, "device", "cpu"), torch.float32)
    norm = _latent_norm(vae, z.shape[1], z.device)
    if norm is not None:
        z = z * norm[1] + norm[0]
    out = _first(vae.decode(z))
    video = (out[0].float().clamp(-1, 1) + 1) / 2  # [3, F, H, W]
    return video.permute(1, 2, 3, 0).cpu()


@torch.no_grad()
def encode_image(components: WanComponents, image: torch.Tensor) -> torch.Tensor:
    """Image ``[3, H, W]`` in [0, 1] -> normalised first-frame latents ``[1, C, 1, H/s, W/s]`` for image-to-video."""
    vae = components.vae
    if vae is None:
        raise RuntimeError("image-to-video needs the VAE")
    x = (image.float() * 2 - 1).unsqueeze(0).unsqueeze(2)
    enc = vae.encode(x.to(getattr(vae, "device", "cpu")))
    z = enc.latent_dist.mode() if hasattr(enc, "latent_dist") else _first(enc)
    norm = _latent_norm(vae, z.shape[1], z.device)
    if norm is not None:
        z = (z - norm[0]) / norm[1]
    return z.float()
