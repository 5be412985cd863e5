"""Error metrics between a reference and a test tensor (latents or frames). Pure functions, float64 reductions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rel_l2(ref: torch.Tensor, test: torch.Tensor) -> float:
    """||test - ref|| / ||ref|| (0 = identical)."""
    r, t = ref.double(), test.double()
    return float((t - r).norm() / r.norm().clamp_min(1e-30))


def cosine(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors (1 = same direction)."""
    r, t = ref.double().flatten(), test.double().flatten()
    return float(torch.dot(r, t) / (r.norm() * t.norm()).clamp_min(1e-30))


def psnr(ref: torch.Tensor, test: torch.Tensor, data_range: float | None = None) -> float:
    """PSNR in dB; data_range defaults to the reference's max - min (latents) — pass 1.0 for frames in [0, 1]."""
    r, t = ref.double(), test.double()
    mse = float((t - r).pow(2).mean())
    if mse == 0.0:
        return math.inf
    rng = float(r.max() - r.min()) if data_range is None else data_range
    return 10.0 * math.log10(rng * rng / mse)


def ssim(ref: torch.Tensor, test: torch.Tensor, data_range: float = 1.0, window: int = 7) -> float:
    """Mean SSIM of frames ``[F, H, W, 3]`` in [0, 1] (uniform window, per channel, luminance+contrast+structure)."""
    if ref.shape != test.shape or ref.dim() != 4:
        raise ValueError(f"ssim expects two [F, H, W, C] tensors of equal shape, got {tuple(ref.shape)} and "
                         f"{tuple(test.shape)}")
    x = ref.double().permute(0, 3, 1, 2)
    y = test.double().permute(0, 3, 1, 2)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    k = min(window, x.shape[-1], x.shape[-2])
    pool = lambda z: F.avg_pool2d(z, k, stride=1)  # noqa: E731
    mx, my = pool(x), pool(y)
    vx = pool(x * x) - mx * mx
    vy = pool(y * y) - my * my
    cxy = pool(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def latent_metrics(ref: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    """rel_l2, cosine and psnr (dB, range of the reference) of two latent tensors."""
    return {"rel_l2": rel_l2(ref, test), "cosine": cosine(ref, test), "psnr": psnr(ref, test)}
