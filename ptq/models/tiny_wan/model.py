"""A small WAN 2.2-style text-to-video model (same diffusers classes as WAN 2.2 TI2V-5B, tiny sizes).

Components (a diffusers-style folder, see :func:`save_tiny_wan` / :func:`load_tiny_wan`):

- ``transformer``: :class:`diffusers.WanTransformer3DModel` in the 5B's family (patch (1, 2, 2), 48 latent
  channels, ``rms_norm_across_heads``, cross-attn norm, freq_dim 256), 4 heads x 64 = width 256.
- ``vae``: :class:`SpaceToDepthVAE`, a fixed parameter-free pixel-unshuffle "VAE" (x4 spatial, x1 temporal,
  z_dim 48) so the transformer sees the same channel count as the 5B's.
- ``text_encoder``: a tiny :class:`transformers.UMT5EncoderModel` (WAN uses UMT5-XXL).
- ``tokenizer``: a word-level :class:`transformers.PreTrainedTokenizerFast` over :data:`TINY_VOCAB`.
- ``scheduler``: :class:`diffusers.UniPCMultistepScheduler` with flow sigmas (the 5B's settings; flow_shift 3.0).

Everything runs on CPU. The packaged trained model lives in :data:`TINY_WAN_PATH`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ModelMixin, UniPCMultistepScheduler, WanTransformer3DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config

from ptq.models.tiny_wan.world import EOS_TOKEN, PAD_TOKEN, TINY_VOCAB, UNK_TOKEN

TINY_WAN_PATH: Path = Path(__file__).resolve().parents[2] / "assets" / "tiny_wan"

# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------

#: Width of the tiny text encoder (= transformer ``text_dim``).
TINY_TEXT_DIM = 256
#: Text length (tokens, incl. the end-of-sequence token); prompt embeddings are zero-padded to it like WAN's.
TINY_MAX_SEQUENCE_LENGTH = 32

#: kwargs for :class:`diffusers.WanTransformer3DModel`; same family as WAN 2.2 TI2V-5B (24 x 128, 30 layers).
#: Every nn.Linear has in_features in {48*4=192 (conv), 256, 1024}: multiples of 16 (NVFP4 blocks).
TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,
    "attention_head_dim": 64,
    "in_channels": 48,
    "out_channels": 48,
    "text_dim": TINY_TEXT_DIM,
    "freq_dim": 256,
    "ffn_dim": 1024,
    "num_layers": 5,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
    "pos_embed_seq_len": None,
}

#: kwargs for :class:`transformers.UMT5Config` (``vocab_size`` is set from the tokenizer).
TINY_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "d_model": TINY_TEXT_DIM,
    "d_kv": 64,
    "d_ff": 512,
    "num_layers": 2,
    "num_decoder_layers": 0,
    "num_heads": 4,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.0,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
    "use_cache": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
    "tie_word_embeddings": False,
}

#: UniPC settings of ``Wan-AI/Wan2.2-TI2V-5B-Diffusers/scheduler/scheduler_config.json`` (diffusers defaults
#: plus flow_prediction / use_flow_sigmas / flow_shift 5.0).
WAN_5B_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "solver_order": 2,
    "prediction_type": "flow_prediction",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
    "disable_corrector": [],
    "solver_p": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": True,
    "flow_shift": 5.0,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "final_sigmas_type": "zero",
    "rescale_betas_zero_snr": False,
}
#: The tiny model's flow shift: 64x64x9 videos have far fewer tokens than the 5B's 704x1280 (WAN uses 3.0 at
#: 480p, 5.0 at 720p); a smaller shift spends fewer steps at very high noise.
TINY_FLOW_SHIFT = 3.0

#: Sampling defaults written into ``model_index.json``.
TINY_SAMPLE_DEFAULTS: dict[str, Any] = {
    "height": 64,
    "width": 64,
    "num_frames": 9,
    "num_inference_steps": 20,
    "guidance_scale": 3.0,
    "max_sequence_length": TINY_MAX_SEQUENCE_LENGTH,
    "flow_shift": TINY_FLOW_SHIFT,
    "fps": 8,
}

# ---------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------


class SpaceToDepthVAE(ModelMixin, ConfigMixin):
    """Fixed, parameter-free "VAE": per-frame pixel-unshuffle (space-to-depth).

    ``encode``: video ``[B, 3, F, H, W]`` in [-1, 1] -> latents ``[B, 3*s*s, F, H/s, W/s]``
    (``(x - shift) * scaling_factor``); ``decode`` is the exact inverse. Channel ``c*s*s + i*s + j`` of a latent
    pixel holds colour ``c`` at sub-pixel ``(i, j)`` (torch's ``pixel_unshuffle`` order).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        spatial_factor: int = 4,
        scale_factor_spatial: int = 4,
        scale_factor_temporal: int = 1,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ) -> None:
        super().__init__()
        if scale_factor_spatial != spatial_factor:
            raise ValueError("scale_factor_spatial must equal spatial_factor")
        if scale_factor_temporal != 1:
            raise ValueError("SpaceToDepthVAE has no temporal compression")
        # A tiny non-persistent buffer so ModelMixin's .dtype/.device work; nothing is saved.
        self.register_buffer("_anchor", torch.zeros(1), persistent=False)

    @property
    def z_dim(self) -> int:
        """Latent channels: ``in_channels * spatial_factor**2`` (48 by default, as the 5B's VAE)."""
        return int(self.config.in_channels * self.config.spatial_factor**2)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, C, F, H, W]`` -> ``[B, C*s*s, F, H/s, W/s]``; H and W must be multiples of s."""
        s = self.config.spatial_factor
        b, c, f, h, w = video.shape
        if c != self.config.in_channels or h % s or w % s:
            raise ValueError(f"expected [B, {self.config.in_channels}, F, H, W] with H, W % {s} == 0")
        x = video.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        x = F.pixel_unshuffle(x, s)
        x = x.reshape(b, f, c * s * s, h // s, w // s).permute(0, 2, 1, 3, 4)
        if self.config.shift_factor != 0.0:
            x = x - self.config.shift_factor
        if self.config.scaling_factor != 1.0:
            x = x * self.config.scaling_factor
        return x.contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C*s*s, F, h, w]`` -> ``[B, C, F, h*s, w*s]`` (no clamping)."""
        s = self.config.spatial_factor
        b, z, f, h, w = latents.shape
        if z != self.z_dim:
            raise ValueError(f"expected {self.z_dim} latent channels, got {z}")
        x = latents
        if self.config.scaling_factor != 1.0:
            x = x / self.config.scaling_factor
        if self.config.shift_factor != 0.0:
            x = x + self.config.shift_factor
        x = x.permute(0, 2, 1, 3, 4).reshape(b * f, z, h, w)
        x = F.pixel_shuffle(x, s)
        c = self.config.in_channels
        return x.reshape(b, f, c, h * s, w * s).permute(0, 2, 1, 3, 4).contiguous()

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Round trip ``decode(encode(video))``."""
        return self.decode(self.encode(video))

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Writes only ``config.json`` (there are no weights)."""
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        self.save_config(save_directory)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> SpaceToDepthVAE:
        """Builds from ``config.json`` alone (local folders only)."""
        return cls.from_config(cls.load_config(pretrained_model_name_or_path))


def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """``[B, 3, F, H, W]`` in [-1, 1] -> uint8 ``[B, F, H, W, 3]`` in [0, 255]."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).contiguous()


# ---------------------------------------------------------------------------------------------------------
# Tokenizer, text encoder, scheduler
# ---------------------------------------------------------------------------------------------------------


def build_tokenizer(
    vocab_words: Sequence[str] = TINY_VOCAB, model_max_length: int = TINY_MAX_SEQUENCE_LENGTH
):
    """Word-level fast tokenizer: lowercase, whitespace/punctuation split, ids ``<pad>``=0, ``</s>``=1,
    ``<unk>``=2, then ``vocab_words``; appends ``</s>`` like T5. Returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1, UNK_TOKEN: 2}
    for word in vocab_words:
        word = word.lower()
        if word not in vocab:
            vocab[word] = len(vocab)
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
    )


def build_text_encoder(vocab_size: int, seed: int = 0):
    """A randomly initialised tiny :class:`transformers.UMT5EncoderModel` (float32)."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=vocab_size, **TINY_TEXT_ENCODER_CONFIG)
    return UMT5EncoderModel(config).eval()


def build_scheduler(flow_shift: float = TINY_FLOW_SHIFT) -> UniPCMultistepScheduler:
    """UniPC with the 5B's settings (:data:`WAN_5B_SCHEDULER_CONFIG`) except ``flow_shift``."""
    return UniPCMultistepScheduler(**{**WAN_5B_SCHEDULER_CONFIG, "flow_shift": flow_shift})


def build_transformer(seed: int = 0, config: dict[str, Any] | None = None) -> WanTransformer3DModel:
    """A randomly initialised (float32) tiny :class:`WanTransformer3DModel`, deterministic for ``seed``."""
    torch.manual_seed(seed)
    return WanTransformer3DModel(**(config or TINY_TRANSFORMER_CONFIG)).eval()


@dataclass
class TinyWanComponents:
    """The five components of a tiny WAN model (plus the sample defaults of ``model_index.json``)."""

    transformer: WanTransformer3DModel
    text_encoder: Any  # transformers.UMT5EncoderModel
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    scheduler: UniPCMultistepScheduler
    vae: SpaceToDepthVAE
    sample_defaults: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.sample_defaults is None:
            self.sample_defaults = dict(TINY_SAMPLE_DEFAULTS)


def build_random_tiny_wan(seed: int = 0) -> TinyWanComponents:
    """Random-weight tiny WAN (float32), deterministic for ``seed``."""
    tokenizer = build_tokenizer(TINY_VOCAB)
    return TinyWanComponents(
        transformer=build_transformer(seed),
        text_encoder=build_text_encoder(len(tokenizer), seed + 1),
        tokenizer=tokenizer,
        scheduler=build_scheduler(),
        vae=SpaceToDepthVAE(),
    )


# ---------------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------------


def save_tiny_wan(
    components: TinyWanComponents, path: str | os.PathLike, weights_dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Write a diffusers-style folder (atomically: temp dir, then rename); weights stored in ``weights_dtype``.

    Layout: ``transformer/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``vae/``, ``model_index.json``.
    The in-memory modules are not modified.
    """
    import copy

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
    try:
        for name, module in (
            ("transformer", components.transformer),
            ("text_encoder", components.text_encoder),
        ):
            module = copy.deepcopy(module).cpu()
            for t in (*module.parameters(), *module.buffers()):
                if t.is_floating_point():
                    t.data = t.data.to(weights_dtype)
            module.save_pretrained(tmp / name, safe_serialization=True)
        components.tokenizer.save_pretrained(tmp / "tokenizer")
        components.scheduler.save_pretrained(tmp / "scheduler")
        components.vae.save_pretrained(tmp / "vae")
        index = {
            "_ptq_model": "tiny_wan",
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "text_encoder": ["transformers", "UMT5EncoderModel"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "scheduler": ["diffusers", "UniPCMultistepScheduler"],
            "vae": ["ptq.models.tiny_wan", "SpaceToDepthVAE"],
            "expand_timesteps": True,
            "weights_dtype": str(weights_dtype).replace("torch.", ""),
            **(components.sample_defaults or TINY_SAMPLE_DEFAULTS),
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if path.exists():
            old = path.parent / f".{path.name}.old"
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def load_tiny_wan(
    path: str | os.PathLike = TINY_WAN_PATH,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> TinyWanComponents:
    """Load a folder written by :func:`save_tiny_wan` (offline). The transformer gets ``dtype`` (diffusers keeps
    its ``_keep_in_fp32_modules`` in float32 for bf16/fp16, like the 5B); the text encoder is loaded in float32."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no tiny WAN model at {path}")
    index = json.loads((path / "model_index.json").read_text())
    transformer = (
        WanTransformer3DModel.from_pretrained(path / "transformer", torch_dtype=dtype).to(device).eval()
    )
    text_encoder = (
        UMT5EncoderModel.from_pretrained(path / "text_encoder", dtype=torch.float32).to(device).eval()
    )
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    scheduler = UniPCMultistepScheduler.from_pretrained(path / "scheduler")
    vae = SpaceToDepthVAE.from_pretrained(path / "vae").to(device)
    defaults = {k: index[k] for k in TINY_SAMPLE_DEFAULTS if k in index}
    return TinyWanComponents(
        transformer, text_encoder, tokenizer, scheduler, vae, {**TINY_SAMPLE_DEFAULTS, **defaults}
    )


# ---------------------------------------------------------------------------------------------------------
# Running the model
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_prompts(
    components: TinyWanComponents,
    prompts: Sequence[str],
    max_sequence_length: int = TINY_MAX_SEQUENCE_LENGTH,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Prompts -> text embeddings ``[B, max_sequence_length, text_dim]``, zero past each prompt's length (as
    ``WanPipeline._get_t5_prompt_embeds``). The empty prompt "" is the unconditional (CFG) prompt."""
    return encode_text(components.text_encoder, components.tokenizer, prompts, max_sequence_length, dtype, device)


def encode_text(
    text_encoder: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_sequence_length: int = TINY_MAX_SEQUENCE_LENGTH,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """:func:`encode_prompts` for a text encoder and tokenizer outside a :class:`TinyWanComponents`, with autograd
    (training the text encoder): prompts -> ``[B, max_sequence_length, text_dim]``, zero past each prompt's length;
    ``dtype`` / ``device`` of the result default to the encoder's."""
    enc_device = next(text_encoder.parameters()).device
    inputs = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    ids, mask = inputs.input_ids.to(enc_device), inputs.attention_mask.to(enc_device)
    emb = text_encoder(ids, mask).last_hidden_state
    emb = emb * mask.unsqueeze(-1).to(emb.dtype)
    return emb.to(dtype=dtype or emb.dtype, device=device or emb.device)


def expand_timestep(
    t: torch.Tensor | float, latents: torch.Tensor, patch_size: Sequence[int] = (1, 2, 2)
) -> torch.Tensor:
    """Per-token timestep ``[B, seq_len]`` (WAN 2.2 TI2V ``expand_timesteps``) for latents ``[B, C, F, H, W]``;
    ``t`` is a scalar or ``[B]`` tensor in [0, 1000]."""
    b, _, f, h, w = latents.shape
    seq_len = (f // patch_size[0]) * (h // patch_size[1]) * (w // patch_size[2])
    t = torch.as_tensor(t, dtype=torch.float32, device=latents.device)
    t = t.reshape(-1, 1) if t.ndim else t.reshape(1, 1)
    return t.expand(b, seq_len).contiguous()


@torch.no_grad()
def generate_latents(
    components: TinyWanComponents,
    prompts: Sequence[str],
    *,
    negative_prompt: str = "",
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    seed: int = 0,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """WanPipeline-style sampling with WAN's denoising loop (:func:`ptq.models.wan.sampling.denoise`: UniPC,
    per-token timesteps, CFG as two forwards, cond then uncond). Returns latents ``[B, 48, F, H/4, W/4]`` (float32).
    Initial noise is drawn on CPU from ``seed``."""
    from ptq.models.base import SampleSpec
    from ptq.models.wan.loading import WanComponents
    from ptq.models.wan.sampling import denoise

    d = components.sample_defaults or TINY_SAMPLE_DEFAULTS
    spec = SampleSpec(height=int(height or d["height"]), width=int(width or d["width"]),
                      num_frames=int(num_frames or d["num_frames"]),
                      num_steps=int(num_inference_steps or d["num_inference_steps"]),
                      guidance_scale=float(d["guidance_scale"] if guidance_scale is None else guidance_scale),
                      seed=seed)
    if prompt_embeds is None:
        prompt_embeds = encode_prompts(components, prompts, d["max_sequence_length"])
    if negative_prompt_embeds is None and spec.guidance_scale > 1.0:
        negative_prompt_embeds = encode_prompts(components, [negative_prompt] * prompt_embeds.shape[0],
                                                d["max_sequence_length"])
    comps = WanComponents(components.transformer, components.scheduler, components.vae, None, None,
                          defaults={**d, "vae_scale_factor_spatial": components.vae.config.spatial_factor,
                                    "vae_scale_factor_temporal": 1})
    return denoise(comps, prompt_embeds, negative_prompt_embeds, spec)
