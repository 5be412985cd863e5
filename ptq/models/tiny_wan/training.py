"""Training objective of the tiny model and its fixed held-out evaluation batch (used by
``scripts/train_tiny_wan.py`` and the tests of the shipped weights)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from ptq.models.tiny_wan.model import SpaceToDepthVAE, TinyWanComponents, encode_prompts, expand_timestep
from ptq.models.tiny_wan.world import parse_prompt, render_scenes


def flow_matching_loss(
    transformer: WanTransformer3DModel,
    x0: torch.Tensor,
    text_embeds: torch.Tensor,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Rectified-flow loss: ``x_s = (1-s) x0 + s noise``, target ``noise - x0``, timestep ``1000 s`` per token.

    x0, noise: ``[B, 48, F, h, w]``; text_embeds ``[B, L, text_dim]``; sigmas ``[B]`` in (0, 1). Returns the
    mean squared error (scalar, float32).
    """
    s = sigmas.float().view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0.float() + s * noise.float()
    ts = expand_timestep(sigmas.float() * 1000.0, xt, transformer.config.patch_size)
    dt = transformer.dtype
    pred = transformer(
        hidden_states=xt.to(dt), timestep=ts, encoder_hidden_states=text_embeds.to(dt), return_dict=False
    )[0]
    return F.mse_loss(pred.float(), (noise - x0).float())



def heldout_batch(
    prompts: Sequence[str], seed: int = 1234, repeats: int = 2, num_frames: int = 9, size: int = 64
) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed evaluation batch for the flow-matching loss: ``repeats`` renderings of each prompt.

    Returns ``(prompts, x0 [N, 48, F, size/4, size/4], noise (same shape), sigmas [N])`` with sigmas evenly
    spread over (0, 1), all drawn on CPU from ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    all_prompts = [p for _ in range(repeats) for p in prompts]
    video = render_scenes([parse_prompt(p) for p in all_prompts], gen, num_frames, size)
    x0 = SpaceToDepthVAE().encode(video)
    noise = torch.randn(x0.shape, generator=gen)
    n = len(all_prompts)
    sigmas = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    sigmas = sigmas[torch.randperm(n, generator=gen)]
    return all_prompts, x0, noise, sigmas


@torch.no_grad()
def heldout_loss(
    components: TinyWanComponents, prompts: Sequence[str], seed: int = 1234, repeats: int = 2
) -> float:
    """Mean flow-matching loss of ``components`` on :func:`heldout_batch` (conditional prompts)."""
    all_prompts, x0, noise, sigmas = heldout_batch(prompts, seed, repeats)
    device = next(components.transformer.parameters()).device
    emb = encode_prompts(components, all_prompts)
    loss = flow_matching_loss(
        components.transformer, x0.to(device), emb.to(device), sigmas.to(device), noise.to(device)
    )
    return float(loss)
