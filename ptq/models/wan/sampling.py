"""The WAN denoising loop (diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline`` with ``expand_timesteps``),
prompt encoding, image conditioning and latent decoding, as plain functions over :class:`WanComponents`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ptq.models.base import SampleSpec, StepCallback
from ptq.models.wan.loading import WanComponents


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


def latent_shape(components: WanComponents, spec: SampleSpec) -> tuple[int, int, int, int]:
    """``[C, F_lat, H_lat, W_lat]`` of the noise (C = the output channels: I2V models take more input channels) for
    ``spec``; raises if H/W do not divide into whole patches."""
    cfg = components.transformer.config
    s, t = components.vae_scale_spatial, components.vae_scale_temporal
    p = tuple(cfg.patch_size)
    if spec.height % (s * p[1]) or spec.width % (s * p[2]):
        raise ValueError(f"height/width must be multiples of {s * p[1]} (VAE x{s} times patch {p[1]}), "
                         f"got {spec.height}x{spec.width}")
    if (spec.num_frames - 1) % t:
        raise ValueError(f"num_frames must be 1 + a multiple of {t}, got {spec.num_frames}")
    return (int(cfg.out_channels), (spec.num_frames - 1) // t + 1, spec.height // s, spec.width // s)


@dataclass
class WanImageCondition:
    """Image-to-video conditioning of WAN 2.1 / 2.2 I2V (``WanImageToVideoPipeline`` without expand_timesteps): the
    image ``[3, H, W]`` in [0, 1] (its video latent is built per spec in :func:`denoise`) and, for WAN 2.1 I2V,
    the CLIP image embeddings ``[1, 257, image_dim]`` (the vision model's second-to-last hidden states)."""

    image: torch.Tensor
    image_embeds: torch.Tensor | None = None
    #: the image-video latents already built, by (frames, height, width)
    latents: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def video_latents(self, components: WanComponents, spec: SampleSpec) -> torch.Tensor:
        """:func:`image_video_condition` for ``spec``, built once per video size."""
        key = (spec.num_frames, spec.height, spec.width)
        if key not in self.latents:
            self.latents[key] = image_video_condition(components, self.image, spec).cpu()
        return self.latents[key]


@torch.no_grad()
def denoise(
    components: WanComponents,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    spec: SampleSpec,
    *,
    condition_latents: torch.Tensor | WanImageCondition | None = None,
    on_step_start: Callable[[int], None] | None = None,
    on_step_end: StepCallback | None = None,
    forward: Callable[..., Any] | None = None,
    forwards: Mapping[str, Callable[..., Any]] | None = None,
    latents_at: Callable[[int], torch.Tensor] | None = None,
    on_prediction: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Sample a batch of videos (WAN's one denoising loop, diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline``);
    returns the final latents ``[B, C, F, H, W]`` float32 on ``components.execution_device()``. The initial noise
    is drawn on the CPU from ``spec.seed``.

    prompt_embeds ``[B, L, text_dim]``, negative_embeds ``[B or 1, L, text_dim]`` (CFG runs cond, then uncond, as
    two forwards; a stage whose guidance scale is 1 runs the cond forward only). Two experts
    (``components.transformer_2``): steps with ``t >= boundary_ratio * 1000`` run ``transformer`` with
    ``spec.guidance_scale``, the rest ``transformer_2`` with ``spec.guidance_scale_2`` (default: the first).
    ``condition_latents``: a tensor ``[B, C, 1, H, W]`` (normalised) pins the first latent frame and gives it
    timestep 0 (TI2V); a :class:`WanImageCondition` concatenates mask + image-video latent to the input channels
    (I2V) and passes its CLIP embeddings. ``on_step_start(i)`` runs before step i's forwards; ``on_step_end(i, t,
    latents)`` after it. ``forwards``: by component name (``transformer``, ``transformer_2``), called instead of
    the module with the same arguments (``forward``: the same for ``transformer``). ``latents_at(i)``: the input of
    step i instead of the loop's own latents (teacher forcing); ``on_prediction(i, noise_pred)``: the guided
    prediction of step i.
    """
    experts = components.experts()
    calls = {name: m for name, m in experts.items()}
    calls.update({k: v for k, v in (forwards or {}).items() if k in experts})
    if forward is not None:
        calls["transformer"] = forward
    transformer = components.transformer
    device = components.execution_device()
    tdtype = transformer.dtype
    scheduler = type(components.scheduler).from_config(components.scheduler.config)
    scheduler.set_timesteps(spec.num_steps, device=device)
    shape = (prompt_embeds.shape[0], *latent_shape(components, spec))
    gen = torch.Generator("cpu").manual_seed(int(spec.seed))
    latents = torch.randn(shape, generator=gen, dtype=torch.float32).to(device)
    mask = torch.ones(shape, dtype=torch.float32, device=device)
    first_frame = concat = image_embeds = None
    if isinstance(condition_latents, WanImageCondition):
        concat = condition_latents.video_latents(components, spec).to(device)
        concat = concat.expand(shape[0], *concat.shape[1:])
        if condition_latents.image_embeds is not None:
            image_embeds = condition_latents.image_embeds.to(device, tdtype).expand(shape[0], -1, -1)
    elif condition_latents is not None:
        mask[:, :, 0] = 0
        first_frame = condition_latents.to(device, torch.float32)
    p = tuple(transformer.config.patch_size)
    cond = prompt_embeds.to(device, tdtype)
    uncond = negative_embeds.to(device, tdtype) if negative_embeds is not None else None
    if uncond is not None and uncond.shape[0] != cond.shape[0]:
        uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
    do_cfg = uncond is not None and spec.guidance_scale > 1.0
    scale_2 = spec.guidance_scale if spec.guidance_scale_2 is None else spec.guidance_scale_2
    extra = {} if image_embeds is None else {"encoder_hidden_states_image": image_embeds}

    def pinned(z: torch.Tensor) -> torch.Tensor:
        return z if first_frame is None else (1 - mask) * first_frame + mask * z

    scheduler.set_begin_index(0)
    for i, t in enumerate(scheduler.timesteps):
        if on_step_start is not None:
            on_step_start(i)
        name = components.component_for(t)
        call, scale = calls[name], (spec.guidance_scale if name == "transformer" else scale_2)
        x = pinned(latents if latents_at is None else latents_at(i).to(device, torch.float32))
        if concat is not None:
            x = torch.cat([x, concat], dim=1)
        x = x.to(tdtype)
        if components.expand_timesteps:
            timestep = (mask[:, 0, :: p[0], :: p[1], :: p[2]] * t).flatten(1)
        else:
            timestep = t.expand(shape[0]).contiguous()
        noise_pred = call(hidden_states=x, timestep=timestep, encoder_hidden_states=cond, return_dict=False,
                          **extra)[0].float()
        if do_cfg and scale != 1.0:
            noise_uncond = call(hidden_states=x, timestep=timestep, encoder_hidden_states=uncond,
                                return_dict=False, **extra)[0].float()
            noise_pred = noise_uncond + scale * (noise_pred - noise_uncond)
        if on_prediction is not None:
            on_prediction(i, noise_pred)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if on_step_end is not None:
            on_step_end(i, t, pinned(latents))
    return pinned(latents)


@torch.no_grad()
def image_video_condition(components: WanComponents, image: torch.Tensor, spec: SampleSpec) -> torch.Tensor:
    """``WanImageToVideoPipeline.prepare_latents`` (no last image): the VAE latent of the video [image, zeros x
    (num_frames - 1)], normalised, after the frame mask (1 on the image's frame, repeated for the VAE's temporal
    factor): ``[1, temporal + z_dim, F_lat, H/s, W/s]`` float32."""
    vae = components.vae
    if vae is None:
        raise RuntimeError("image-to-video needs the VAE (the model folder has no vae/)")
    t = components.vae_scale_temporal
    x = (image.float() * 2 - 1).unsqueeze(0).unsqueeze(2)
    video = torch.cat([x, x.new_zeros(1, 3, spec.num_frames - 1, *x.shape[-2:])], dim=2)
    enc = vae.encode(video.to(getattr(vae, "device", "cpu"), getattr(vae, "dtype", torch.float32)))
    z = (enc.latent_dist.mode() if hasattr(enc, "latent_dist") else _first(enc)).float()
    norm = _latent_norm(vae, z.shape[1], z.device)
    if norm is not None:
        z = (z - norm[0]) * (1.0 / norm[1])
    h, w = z.shape[-2:]
    frames = torch.zeros(1, 1, spec.num_frames, h, w, device=z.device)
    frames[:, :, 0] = 1
    frames = torch.cat([frames[:, :, :1].repeat_interleave(t, dim=2), frames[:, :, 1:]], dim=2)
    frames = frames.view(1, -1, t, h, w).transpose(1, 2)
    return torch.cat([frames, z], dim=1)


@torch.no_grad()
def clip_image_embeds(components: WanComponents, image: torch.Tensor) -> torch.Tensor:
    """WAN 2.1 I2V image embeddings (``WanImageToVideoPipeline.encode_image``): the CLIP vision model's
    second-to-last hidden states ``[1, tokens, image_dim]`` of the image ``[3, H, W]`` in [0, 1]."""
    if components.image_encoder is None or components.image_processor is None:
        raise RuntimeError("WAN 2.1 image-to-video needs image_encoder/ and image_processor/ in the model folder")
    pixels = (image.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    enc = components.image_encoder
    inputs = components.image_processor(images=pixels, return_tensors="pt")
    param = next(enc.parameters())
    inputs = {k: v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device)
              for k, v in inputs.items()}
    return enc(**inputs, output_hidden_states=True).hidden_states[-2].float().cpu()


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


def spec_problems(spec: SampleSpec, *, spatial: int, temporal: int, patch: tuple[int, ...]) -> dict[str, str]:
    """What is wrong with ``spec`` for a WAN model with VAE factors ``spatial`` / ``temporal`` and transformer
    ``patch`` size, by field name (empty when nothing is)."""
    out: dict[str, str] = {}
    for key in ("height", "width"):
        v, m = getattr(spec, key), spatial * patch[1 if key == "height" else 2]
        if v < 1 or v % m:
            out[key] = f"{v}: expected a positive multiple of {m} (VAE x{spatial} times patch {m // spatial})"
    if spec.num_frames < 1 or (spec.num_frames - 1) % temporal:
        out["num_frames"] = f"{spec.num_frames}: expected 1 + a multiple of {temporal} (the VAE's temporal factor)"
    if spec.num_steps < 1:
        out["num_steps"] = f"{spec.num_steps}: expected >= 1"
    if spec.guidance_scale < 0:
        out["guidance_scale"] = f"{spec.guidance_scale}: expected >= 0"
    return out
