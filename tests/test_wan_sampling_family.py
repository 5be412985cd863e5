"""ptq's WAN denoising loop against diffusers' own pipelines on small random models of each family member's
architecture: two experts with their boundary and second guidance scale (WAN 2.2 A14B), one timestep per video
(WAN 2.1), image-to-video by concatenated image latents (WAN 2.2 I2V) and with CLIP image embeddings (WAN 2.1 I2V).
A step routed to the wrong expert changes the result, and the expert each step ran on is checked directly."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

from ptq.models.base import SampleSpec
from ptq.models.wan.loading import WanComponents
from ptq.models.wan.sampling import WanImageCondition, clip_image_embeds, denoise

H = W = 32
FRAMES = 5
STEPS = 6


def small_transformer(seed: int, in_channels: int = 16, image_dim: int | None = None) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=in_channels,
        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=image_dim,
        added_kv_proj_dim=32 if image_dim else None, rope_max_seq_len=64).eval()


def small_vae() -> AutoencoderKLWan:
    torch.manual_seed(7)
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def scheduler() -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                   flow_shift=3.0)


def components(tr, tr2=None, boundary=None, vae=None, **kw) -> WanComponents:
    return WanComponents(tr, scheduler(), vae, None, None, defaults={"vae_scale_factor_spatial": 8,
                                                                     "vae_scale_factor_temporal": 4},
                         transformer_2=tr2, boundary_ratio=boundary, expand_timesteps=False, **kw)


def text(seed: int) -> torch.Tensor:
    return torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(seed))


SPEC = SampleSpec(H, W, FRAMES, STEPS, 4.0, seed=3, guidance_scale_2=2.5)


def _noise(spec: SampleSpec) -> torch.Tensor:
    return torch.randn((1, 16, (FRAMES - 1) // 4 + 1, H // 8, W // 8),
                       generator=torch.Generator("cpu").manual_seed(spec.seed))


@pytest.fixture(scope="module")
def experts() -> tuple[WanTransformer3DModel, WanTransformer3DModel]:
    return small_transformer(0), small_transformer(1)


def test_two_experts_match_diffusers_wan_pipeline(experts) -> None:
    from diffusers import WanPipeline

    hi, lo = experts
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=hi, vae=small_vae(), scheduler=scheduler(),
                       transformer_2=lo, boundary_ratio=0.875)
    want = pipe(prompt_embeds=text(0), negative_prompt_embeds=text(1), height=H, width=W, num_frames=FRAMES,
                num_inference_steps=STEPS, guidance_scale=SPEC.guidance_scale, guidance_scale_2=SPEC.guidance_scale_2,
                latents=_noise(SPEC), output_type="latent").frames
    got = denoise(components(hi, lo, 0.875), text(0), text(1), SPEC)
    assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()
    swapped = denoise(components(lo, hi, 0.875), text(0), text(1), SPEC)  # every step on the wrong expert
    assert (swapped - want).abs().max() > 1e-2


def test_each_step_runs_on_the_expert_serving_its_timestep(experts) -> None:
    hi, lo = experts
    comps = components(hi, lo, 0.875)
    seen: dict[str, list[float]] = {"transformer": [], "transformer_2": []}

    def recorder(name: str, module: torch.nn.Module):
        def call(**kw):
            seen[name].append(float(kw["timestep"][0]))
            return module(**kw)
        return call

    denoise(comps, text(0), text(1), SPEC, forwards={"transformer": recorder("transformer", hi),
                                                     "transformer_2": recorder("transformer_2", lo)})
    sched = scheduler()
    sched.set_timesteps(STEPS)
    ts = [float(t) for t in sched.timesteps]
    high = [t for t in ts if t >= 875.0]
    assert 0 < len(high) < STEPS  # both experts serve part of this schedule
    assert seen["transformer"] == [t for t in high for _ in range(2)]  # cond + uncond
    assert seen["transformer_2"] == [t for t in ts if t < 875.0 for _ in range(2)]


def test_guidance_one_runs_no_uncond_pass(experts) -> None:
    hi, lo = experts
    calls = []

    def counting(**kw):
        calls.append(kw["encoder_hidden_states"].sum().item())
        return hi(**kw)

    spec = SampleSpec(H, W, FRAMES, 4, 1.0, seed=3)
    denoise(components(hi), text(0), text(1), spec, forward=counting)
    assert len(calls) == 4 and len(set(calls)) == 1  # one cond forward per step


def _image() -> torch.Tensor:
    return torch.rand(3, H, W, generator=torch.Generator().manual_seed(5))


def _pil(img: torch.Tensor):
    from PIL import Image

    return Image.fromarray((img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def test_wan22_i2v_two_experts_match_diffusers() -> None:
    from diffusers import WanImageToVideoPipeline

    hi, lo, vae = small_transformer(2, in_channels=36), small_transformer(3, in_channels=36), small_vae()
    img = (_image() * 255).round() / 255
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler(),
                                   transformer=hi, transformer_2=lo, boundary_ratio=0.9)
    want = pipe(image=_pil(img), prompt_embeds=text(0), negative_prompt_embeds=text(1), height=H, width=W,
                num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=3.5, guidance_scale_2=3.5,
                latents=_noise(SPEC), output_type="latent").frames
    spec = SampleSpec(H, W, FRAMES, STEPS, 3.5, seed=3)
    got = denoise(components(hi, lo, 0.9, vae=vae), text(0), text(1), spec,
                  condition_latents=WanImageCondition(img))
    assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()
    no_image = denoise(components(hi, lo, 0.9, vae=vae), text(0), text(1), spec,
                       condition_latents=WanImageCondition(torch.zeros_like(img)))
    assert (no_image - want).abs().max() > 1e-3  # the image reaches the model


def test_wan21_i2v_clip_embeddings_match_diffusers() -> None:
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(11)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=32, patch_size=8)).eval()
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tr, vae = small_transformer(4, in_channels=36, image_dim=24), small_vae()
    img = (_image() * 255).round() / 255
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler(),
                                   image_processor=proc, image_encoder=clip, transformer=tr)
    want = pipe(image=_pil(img), prompt_embeds=text(0), negative_prompt_embeds=text(1), height=H, width=W,
                num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=5.0, latents=_noise(SPEC),
                output_type="latent").frames
    comps = components(tr, vae=vae, image_encoder=clip, image_processor=proc)
    emb = clip_image_embeds(comps, img)
    assert emb.shape == (1, 17, 24)  # 16 patches + class token, hidden_states[-2]
    got = denoise(comps, text(0), text(1), SampleSpec(H, W, FRAMES, STEPS, 5.0, seed=3),
                  condition_latents=WanImageCondition(img, emb))
    assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()
